"""The chunked decoder decodes what h11 decodes and rejects what h11 rejects, for any split."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.wire.chunked import MAX_LINE, ChunkedDecoder, ChunkedFramingError


def h11_decode(pieces: list[bytes]) -> tuple[bytes, bool]:
    """h11's reading of a chunked body: (payload, reached the end)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Response)
    out: list[bytes] = []
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.EndOfMessage):
                return b"".join(out), True
            assert isinstance(event, h11.Data)
            out.append(bytes(event.data))
    return b"".join(out), False


def sluice_decode(pieces: list[bytes]) -> tuple[bytes, bool]:
    decoder = ChunkedDecoder()
    out = [decoder.feed(piece) for piece in pieces]
    return b"".join(out), decoder.finished


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [piece for piece in pieces if piece]  # an empty read is the end of the connection


chunk_sizes = st.sampled_from(["{:x}", "{:X}", "{:04x}"])
extensions = st.sampled_from([b"", b";name", b";name=value", b';a="q \\" s";b=1', b"  "])
trailers = st.sampled_from([b"", b"x-trailer: 1\r\n", b"a: b\r\nc: d\r\n"])


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    payloads = draw(st.lists(st.binary(min_size=1, max_size=300), max_size=8))
    wire = b""
    for payload in payloads:
        size = draw(chunk_sizes).format(len(payload)).encode()
        wire += size + draw(extensions) + b"\r\n" + payload + b"\r\n"
    wire += b"0" + draw(extensions) + b"\r\n" + draw(trailers) + b"\r\n"
    return wire, b"".join(payloads)


@settings(max_examples=300, deadline=None)
@given(chunked_bodies(), st.lists(st.integers(min_value=0, max_value=3000), max_size=12))
def test_decodes_every_body_as_h11_does_for_every_split_into_reads(body: tuple[bytes, bytes], cuts: list[int]) -> None:
    wire, payload = body
    pieces = split(wire, cuts)
    assert sluice_decode(pieces) == h11_decode(pieces) == (payload, True)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.lists(st.integers(min_value=0, max_value=60), max_size=4))
def test_arbitrary_bytes_are_decoded_or_refused_as_h11_does(wire: bytes, cuts: list[int]) -> None:
    pieces = split(wire, cuts)
    try:
        h11_result: tuple[bytes, bool] | None = h11_decode(pieces)
    except h11.RemoteProtocolError:
        h11_result = None
    try:
        ours: tuple[bytes, bool] | None = sluice_decode(pieces)
    except ChunkedFramingError:
        ours = None
    if h11_result is None:
        # h11 refuses it; the decoder refuses it too, or has not yet seen the
        # bytes that make it wrong (h11 checks trailer lines it has not finished)
        assert ours is None or not ours[1]
    else:
        assert ours == h11_result


@pytest.mark.parametrize(
    "wire",
    [
        b"zz\r\n",
        b"-1\r\nx\r\n",
        b"0x1\r\nx\r\n",
        b" 1\r\nx\r\n",
        b"+1\r\nx\r\n",
        b"1 1\r\nx\r\n",
        b"1_0\r\nx\r\n",
        b"1\r\nxy\r\n",  # payload longer than its size: the footer is not CRLF
        b"1" * 21 + b"\r\n",
        b"0\r\nnot a header\r\n\r\n",
    ],
)
def test_malformed_framing_is_refused_like_h11_refuses_it(wire: bytes) -> None:
    with pytest.raises(h11.RemoteProtocolError):
        h11_decode([wire])
    with pytest.raises(ChunkedFramingError):
        sluice_decode([wire])


def test_bytes_after_the_last_chunk_are_kept_apart_and_never_returned() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200") == b"abc"
    assert decoder.finished
    assert decoder.unused == b"HTTP/1.1 200"
    assert decoder.feed(b" OK") == b""
    assert decoder.unused == b"HTTP/1.1 200 OK"


def test_an_endless_size_line_or_trailer_is_refused_not_buffered() -> None:
    with pytest.raises(ChunkedFramingError):
        ChunkedDecoder().feed(b"1;" + b"x" * MAX_LINE)
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n")
    with pytest.raises(ChunkedFramingError):
        for _ in range(MAX_LINE // 1000 + 2):
            decoder.feed(b"x-long: " + b"y" * 1000)
