"""The Redis protocol face of the broker (SPEC section 6), in four layers:
wire.py (bytes to requests, replies to bytes), reads.py (the lease tokens of a
connection's stream reads, bounded across connections), commands.py (what each
command does, through the Engine), connection.py (sockets, the read loop, the
listener). Each imports only the ones before it; nothing here touches storage.
"""

from simplequeue.broker.resp.commands import COMMANDS
from simplequeue.broker.resp.connection import RespServer, RespSettings

__all__ = ["COMMANDS", "RespServer", "RespSettings"]
