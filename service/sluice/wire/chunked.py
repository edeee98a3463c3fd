"""HTTP/1.1 chunked transfer-coding, decoded incrementally (RFC 9112 section 7.1).

:class:`ChunkedDecoder` is fed the raw bytes of a response body as they come
off the connection and gives back the body's payload bytes. It exists so the
relay can read an upstream body straight from the socket
(:mod:`sluice.upstream_body`); see there for why.

Why hand-written rather than h11's ``ChunkedReader``: h11 costs ~17 us per
chunk (an event object, a state-machine step and a buffer copy per
``next_event``); this costs ~1 us for the common case of whole chunks, one
``find`` and one slice each. An LLM stream is one chunk per token, so that
difference is paid on every token.

It accepts what h11 accepts and rejects what h11 rejects (tested side by side
in ``tests/test_wire_chunked.py``): hex chunk sizes, chunk extensions
(ignored), trailers (ignored), CRLF line ends only.

Invariants:

* The concatenation of everything :meth:`feed` returned is exactly the body's
  payload, whatever the split of the input into reads.
* After :attr:`finished` is true, :meth:`feed` returns ``b""`` and keeps any
  further input in :attr:`unused` (on a keep-alive connection there must be
  none).
* Buffered, not-yet-decodable input never exceeds a size line or trailer
  section plus one read; an oversized size line or trailer raises.
"""

from __future__ import annotations

import re

#: the longest chunk-size line or trailer section accepted (h11's limit, as httpcore sets it)
MAX_LINE = 100 * 1024

# The chunk-size line as h11 accepts it (h11 ``_abnf.chunk_header``): 1-20 hex
# digits, extensions ignored whatever they hold, trailing whitespace tolerated.
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*")
_TRAILER_END = re.compile(rb"\n\r?\n")
#: the bytes a plain chunk size is made of (deleted by ``bytes.translate``: none left means all hex)
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_TRAILER_FIELD = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+:[^\x00]*|[ \t][^\x00]*")

# decoder states
_SIZE = 0  # reading a chunk-size line (maybe partial in _line)
_DATA = 1  # inside a chunk's payload, _remaining bytes to go
_DATA_END = 2  # after a chunk's payload, the CRLF (_remaining of its 2 bytes to go)
_TRAILER = 3  # after the last chunk: trailer lines until an empty line
_DONE = 4


class ChunkedFramingError(Exception):
    """The body is not valid chunked transfer-coding."""


class ChunkedDecoder:
    """Incremental decoder for a chunked message body (sans-IO)."""

    __slots__ = ("_state", "_remaining", "_line", "unused")

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        #: a partial size line or the trailer section so far
        self._line = b""
        #: bytes that came after the end of the body
        self.unused = b""

    @property
    def finished(self) -> bool:
        """The last chunk and the trailer section have been read."""
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        """Take the next raw bytes of the body; return the payload bytes they complete."""
        if self._state == _DONE:
            self.unused += data
            return b""
        parts: list[bytes] = []
        position = 0
        end = len(data)
        while position < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - position)
                parts.append(data[position : position + take])
                position += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
                    self._remaining = 2
            elif state == _SIZE:
                if not self._line:
                    # Hand-written for speed: the common case, a whole chunk (size line, payload, CRLF)
                    # inside this read, in one find and one slice, with no state change. It was ~12 % of
                    # the gateway's CPU at full throughput taken a state at a time (three loop turns a
                    # chunk). Anything else (a chunk split across reads, extensions, the last chunk, bad
                    # framing) takes the general path, which decides it exactly as h11 would.
                    line_end = data.find(b"\r\n", position, position + 22)
                    if line_end > position:
                        size_line = data[position:line_end]
                        if not size_line.translate(None, _HEX_DIGITS):
                            size = int(size_line, 16)
                            start = line_end + 2
                            stop = start + size
                            if size and data[stop : stop + 2] == b"\r\n":
                                parts.append(data[start:stop])
                                position = stop + 2
                                continue
                position = self._read_size_line(data, position)
            elif state == _DATA_END:
                # the CRLF after a payload, possibly split across reads
                expected = b"\r\n"[2 - self._remaining :]
                got = data[position : position + len(expected)]
                if not expected.startswith(got):
                    raise ChunkedFramingError(f"malformed chunk footer: {got!r} (expected {expected!r})")
                position += len(got)
                self._remaining -= len(got)
                if self._remaining == 0:
                    self._state = _SIZE
            elif state == _TRAILER:
                position = self._read_trailer(data, position)
            else:  # _DONE: what follows the body belongs to no one
                self.unused += data[position:]
                break
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_size_line(self, data: bytes, position: int) -> int:
        # As h11 reads it: the line runs to the first CRLF (a CR split from its
        # LF across reads is found once the LF arrives). A partial line held
        # from the last read is joined to this one; otherwise `data` is
        # searched in place (no copy of the rest of the read per chunk).
        if self._line:
            buffer, start = self._line + data[position:], 0
            shift = len(self._line) - position  # buffer index - shift = data index
        else:
            buffer, start, shift = data, position, 0
        end = buffer.find(b"\r\n", start)
        if end < 0:
            self._line = buffer[start:]
            if len(self._line) > MAX_LINE:
                raise ChunkedFramingError("chunk-size line too long")
            return len(data)
        line = buffer[start:end]
        self._line = b""
        next_position = end + 2 - shift
        match = _SIZE_LINE.fullmatch(line)
        if match is None:
            raise ChunkedFramingError(f"illegal chunk header: {line[:40]!r}")
        size = int(match.group(1), 16)
        if size == 0:
            self._state = _TRAILER
        else:
            self._state = _DATA
            self._remaining = size
        return next_position

    def _read_trailer(self, data: bytes, position: int) -> int:
        # Trailers are read as one section and dropped: the relay has no use for them.
        section = self._line + data[position:]
        if section.startswith(b"\n"):
            end = 1
        elif section.startswith(b"\r\n"):
            end = 2
        else:
            blank = _TRAILER_END.search(section)
            if blank is None:
                if len(section) > MAX_LINE:
                    raise ChunkedFramingError("trailer section too long")
                self._line = section
                return len(data)
            end = blank.end()
            for line in section[: blank.start()].split(b"\n"):
                if _TRAILER_FIELD.fullmatch(line.removesuffix(b"\r")) is None:
                    raise ChunkedFramingError(f"illegal trailer line: {line[:40]!r}")
        self._line = b""
        self._state = _DONE
        self.unused += section[end:]
        return len(data)
