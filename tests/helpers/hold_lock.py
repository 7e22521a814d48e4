"""Take the localfs lock stripe of one key, say so, then SIGSTOP itself: a broker
paused while it held a lock. Usage: hold_lock.py DIR KEY"""

from __future__ import annotations

import os
import signal
import sys

from simplequeue.objstore.localfs import LocalStore

if __name__ == "__main__":
    store = LocalStore(sys.argv[1])
    store._lock(sys.argv[2])  # the store's own striping picks the file
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    signal.pause()  # if continued, hold on until killed
