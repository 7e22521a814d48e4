"""The RESP wire: requests out of a client's bytes (hiredis), replies into bytes.

It owns the reply types (Simple, NULL_ARRAY, RespError), their encoding in RESP2
and RESP3, and the framing of requests. It never knows what a command means, and
never awaits anything: bytes in, values out, and the reverse.
"""

from __future__ import annotations

import re
from typing import Any, TypeAlias

import hiredis

from simplequeue.errors import SimpleQueueError

# --- replies and errors ---------------------------------------------------------------


class Simple(str):
    """A RESP simple string (`+OK`)."""


class _NullArray:
    """A null array: `*-1` in RESP2 (BLPOP timed out, nothing to read), `_` in RESP3."""


NULL_ARRAY = _NullArray()
OK = Simple("OK")


class RespError(Exception):
    """An error reply: `-CODE message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code, self.message = code, message


Reply: TypeAlias = (
    "int | str | bytes | RespError | _NullArray | list[Reply] | dict[str, Reply] | None"
)


def error_of(exc: SimpleQueueError) -> RespError:
    """The reply for one of our errors: its class's RESP code (simplequeue.errors)."""
    return RespError(exc.resp_code, str(exc))


def _line(text: str) -> bytes:
    """Text for a simple string or an error: one line, whatever it held."""
    return text.replace("\r", " ").replace("\n", " ").encode()


def encode(value: Reply, proto: int, out: bytearray) -> None:
    """Append `value` to `out` as RESP `proto` (2 or 3)."""
    if value is None:
        out += b"_\r\n" if proto == 3 else b"$-1\r\n"
    elif isinstance(value, _NullArray):
        out += b"_\r\n" if proto == 3 else b"*-1\r\n"
    elif isinstance(value, RespError):
        out += b"-" + _line(str(value)) + b"\r\n"
    elif isinstance(value, Simple):
        out += b"+" + _line(value) + b"\r\n"
    elif isinstance(value, int):
        out += b":%d\r\n" % value
    elif isinstance(value, str | bytes):
        data = value.encode() if isinstance(value, str) else value
        out += b"$%d\r\n%b\r\n" % (len(data), data)
    elif isinstance(value, list):
        out += b"*%d\r\n" % len(value)
        for item in value:
            encode(item, proto, out)
    else:
        out += (b"%%%d\r\n" % len(value)) if proto == 3 else (b"*%d\r\n" % (2 * len(value)))
        for key, item in value.items():
            encode(key, proto, out)
            encode(item, proto, out)


# --- requests -----------------------------------------------------------------------------


_BULK = re.compile(rb"\$([0-9]{1,19})\r\n")  # a bulk string's header: its length
_BULK_CUT = re.compile(rb"\$[0-9]{0,19}\r?")  # the start of one, the rest to come
# Bytes a parser may have held at once and still be kept once it holds nothing:
# hiredis keeps its buffer as large as it grew until its next feed, so an idle
# connection that once sent a 1 MB request kept ~1 MiB. Past this it is replaced.
PARSER_KEPT = 64 * 1024


def upper(arg: bytes) -> str:
    """A keyword (a command's name, a subcommand, an option) as upper-case text."""
    return arg.decode("ascii", "replace").upper()


class Requests:
    """Splits a client's byte stream into requests. hiredis parses; a request must
    be exactly the canonical encoding of what was parsed, an array of bulk strings
    (what every client sends), which also says where the next request starts.
    Blank lines between requests are skipped, as redis-cli --pipe sends them.
    Anything else raises RespError: the connection is beyond repair."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # bytes a request may take (--max-body, or less: its reader's)
        self.limit_note = ""  # what its refusal adds, to say why the limit is what it is
        self.buffer = bytearray()  # from the start of the next request on
        self.parser = hiredis.Reader()
        self.fed = 0  # bytes of `buffer` the parser has been given
        self.most_fed = 0  # the most it held at once (PARSER_KEPT)
        self.failed: RespError | None = None  # a malformed request after those fed
        # The next request's headers checked so far (_check_headers): the
        # offset of the next one in `buffer`, and the elements still to come
        # (None: its own header is not checked yet).
        self.checked = 0
        self.elements: int | None = None

    def feed(self, data: bytes, most: int | None = None) -> list[list[bytes]]:
        """The whole requests `data` completes, `most` of them at most: the
        rest stays unparsed until the next feed (of b"" to parse it alone).
        When a malformed one follows some, those come first and the error is
        kept in `failed` (Redis runs them, then answers the error); alone, it
        raises."""
        self.buffer += data
        requests: list[list[bytes]] = []
        try:
            while most is None or len(requests) < most:
                if (request := self._next()) is None:
                    # What is left is one unfinished request.
                    self._check_size(len(self.buffer))
                    break
                if request:  # an empty array is ignored, as Redis does
                    requests.append(request)
        except RespError as exc:
            if not requests:
                raise
            self.failed = exc
        return requests

    def _check_size(self, size: int) -> None:
        if size > self.limit:
            raise RespError(
                "ERR", f"Protocol error: request larger than {self.limit} bytes{self.limit_note}"
            )

    def _next(self) -> list[bytes] | None:
        while True:
            if self.fed == 0:
                self._skip_blank_lines()
                if not self.buffer:
                    return None
                if self.buffer[0] != ord("*"):
                    raise RespError("ERR", "Protocol error: expected '*', an array of bulk strings")
            # Each time, not only before its first bytes are fed: the parser may
            # hold them already (after a request in the same read, or a header
            # cut short), and it makes room for the elements once it reads them.
            self._check_headers()
            if self.fed < len(self.buffer):
                self.parser.feed(bytes(self.buffer[self.fed :]))
                self.fed = len(self.buffer)
                self.most_fed = max(self.most_fed, self.fed)
            try:
                frame = self.parser.gets()
            except hiredis.ProtocolError as exc:
                if self.buffer.startswith((b"\r", b"\n")):  # a blank line after a request
                    self._new_parser()
                    continue
                raise RespError("ERR", f"Protocol error: {exc}") from None
            except Exception as exc:  # MemoryError, say: the connection cannot go on
                raise RespError("ERR", f"Protocol error: {type(exc).__name__}") from None
            if frame is False:
                return None
            return self._consume(frame)

    def _check_headers(self) -> None:
        """Check the next request's headers as far as they arrived, before the
        parser reads them: refuse one whose header announces more elements
        than its size limit can hold (each takes at least 4 bytes:
        "*4000000000" asked hiredis for a 32 GB list), an element that is not
        a bulk string (a nested "*200000000" did the same), and a bulk string
        that would take the request past its limit, as soon as its header is
        here. What a request's own header holds beyond that (a blank line,
        "*-1") is the parser's to refuse."""
        while self.elements != 0 and self.checked < len(self.buffer):
            if self.elements is None:
                end = self.buffer.find(b"\r\n", 0, 24)
                if end < 0 or not self.buffer.startswith(b"*") or not self.buffer[1:end].isdigit():
                    return
                self.elements, self.checked = int(self.buffer[1:end]), end + 2
                self._check_size(4 * self.elements)  # each takes 4 bytes at least
                continue
            header = _BULK.match(self.buffer, self.checked)
            if header is None:
                if not _BULK_CUT.fullmatch(self.buffer, self.checked):
                    raise RespError("ERR", "Protocol error: expected an array of bulk strings")
                return  # the rest of its header is to come
            self.elements -= 1
            self.checked = header.end() + int(header[1]) + 2
            self._check_size(self.checked)  # the request is that long at least

    def _new_parser(self) -> None:
        self.parser, self.fed, self.most_fed = hiredis.Reader(), 0, 0

    def _skip_blank_lines(self) -> None:
        blank = len(self.buffer) - len(self.buffer.lstrip(b"\r\n"))
        del self.buffer[:blank]

    def _consume(self, frame: Any) -> list[bytes]:
        if not isinstance(frame, list) or not all(isinstance(a, bytes) for a in frame):
            raise RespError("ERR", "Protocol error: expected an array of bulk strings")
        encoded = hiredis.pack_command(tuple(frame))
        self._check_size(len(encoded))
        if not self.buffer.startswith(encoded):
            raise RespError("ERR", "Protocol error: expected an array of bulk strings")
        del self.buffer[: len(encoded)]
        self.fed -= len(encoded)
        self.checked, self.elements = 0, None
        if not self.buffer and self.most_fed > PARSER_KEPT:  # it holds nothing now
            self._new_parser()
        return frame
