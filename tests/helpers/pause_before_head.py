"""A broker's committer that enqueues into a topic whose head is past its
inline bound (so the batch spills a segment), and SIGSTOPs itself after the
segment PUTs and before the head PUT: a broker paused mid-write. Once
continued and told to go on (a line on stdin), it finishes the write and
prints what the write answered.
Usage: pause_before_head.py DIR TOPIC N"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import orjson

from simplequeue import keys
from simplequeue.api import JobSpec
from simplequeue.broker.engine import Engine
from simplequeue.groupcommit import CommitSettings, GroupCommitter
from simplequeue.objstore.localfs import LocalStore


class PausingStore(LocalStore):
    """Stops the process between a batch's object writes and its head write,
    the first time (a retry after a lost race goes on)."""

    head_key = ""
    paused = False

    def _put_if_after_sync(self, objects, key, data, if_match, if_none_match, tries=None):  # type: ignore[no-untyped-def]
        if objects and key == self.head_key and not self.paused:
            self.paused = True
            self._pause_before = key
        return super()._put_if_after_sync(objects, key, data, if_match, if_none_match, tries)

    def _put_sync(self, key, data, if_match, if_none_match, conditional, tries=None):  # type: ignore[no-untyped-def]
        if getattr(self, "_pause_before", None) == key:
            self._pause_before = None
            print("segments written", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
            # The stop is not immediate: this thread could run on into the
            # head's lock first. It waits here for the word to go on instead.
            sys.stdin.readline()
        return super()._put_sync(key, data, if_match, if_none_match, conditional, tries)


async def main(root: str, topic: str, n: int) -> None:
    store = PausingStore(root)
    store.head_key = keys.head(topic)
    engine = Engine(GroupCommitter(store, broker_id="paused", settings=CommitSettings()))
    specs = [JobSpec({"pad": "y" * 1000}, id=f"late{i:03d}") for i in range(n)]
    try:
        answers = await engine.enqueue(topic, specs)
        print(orjson.dumps({"landed": [a["id"] for a in answers]}).decode(), flush=True)
    except Exception as exc:  # a lost race: what should happen
        print(orjson.dumps({"failed": repr(exc)}).decode(), flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
