"""Every grammar module satisfies wire/grammar.py's protocol, member by member."""

from __future__ import annotations

import pytest

from sluice.errors import StreamInterrupted
from sluice.wire.anthropic import MESSAGES
from sluice.wire.chat import CHAT, COMPLETIONS
from sluice.wire.grammar import Grammar, ParsedRequest, StreamFramer, Usage
from sluice.wire.responses import RESPONSES

REQUESTS = {
    "chat": b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}',
    "completions": b'{"model":"m","prompt":"hi","stream":true}',
    "responses": b'{"model":"m","input":"hi","stream":true}',
    "messages": b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"stream":true}',
}


def members(protocol: type) -> set[str]:
    return {name for name in vars(protocol) if not name.startswith("_")} | set(protocol.__annotations__)


@pytest.mark.parametrize("grammar", [CHAT, COMPLETIONS, RESPONSES, MESSAGES], ids=lambda g: g.name)
def test_grammar_request_and_framer_have_every_protocol_member(grammar: Grammar) -> None:
    for name in members(Grammar):
        assert hasattr(grammar, name), name
    parsed = grammar.parse_request(REQUESTS[grammar.name], max_model_name_length=None)
    for name in members(ParsedRequest):
        assert hasattr(parsed, name), name
    assert (parsed.model_name, parsed.stream, parsed.backpressure_strategy) == ("m", True, None)
    for framer in (grammar.new_framer(), parsed.new_framer()):
        for name in members(StreamFramer):
            assert hasattr(framer, name), name
        assert (framer.finished, framer.done, framer.content_started, framer.events) == (False, False, False, 0)
        assert framer.upstream_error is None and framer.malformed is None and framer.usage is None
        assert framer.feed(b"") == b""
        assert framer.error_event(StreamInterrupted("cut")).endswith(b"\n\n")
    assert grammar.ping_event.endswith(b"\n\n")
    assert grammar.upstream_path.startswith("/")
    assert isinstance(Usage(1, 2), Usage)


# --- the whole-buffer fast path decides as the event-by-event scan ------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sluice.wire.anthropic import MessagesFramer  # noqa: E402
from sluice.wire.responses import ResponsesFramer  # noqa: E402
from tests import test_wire_anthropic, test_wire_responses  # noqa: E402


class SlowResponses(ResponsesFramer):
    __slots__ = ()

    def _plain(self, events: bytes) -> bool:
        return False


class SlowMessages(MessagesFramer):
    __slots__ = ()

    def _plain(self, events: bytes) -> bool:
        return False


def _decisions(framer: ResponsesFramer | MessagesFramer, reads: list[bytes]) -> tuple[object, ...]:
    out = b"".join(framer.feed(read) for read in reads)
    return (out, framer.done, framer.terminal, framer.upstream_error, framer.malformed, framer.events,
            framer.content_deltas, framer.usage, getattr(framer, "last_sequence_number", None))


@settings(max_examples=300)
@given(
    head=st.lists(test_wire_responses.event_kinds, max_size=4),
    body=st.lists(test_wire_responses.event_kinds, min_size=1, max_size=12),
)
def test_responses_fast_path_decides_as_the_event_by_event_scan(head: list[bytes], body: list[bytes]) -> None:
    reads = [test_wire_responses.created() + test_wire_responses.item_added(), *head, b"".join(body)]
    assert _decisions(ResponsesFramer(), reads) == _decisions(SlowResponses(), reads)


@settings(max_examples=300)
@given(
    head=st.lists(test_wire_anthropic.event_kinds, max_size=4),
    body=st.lists(test_wire_anthropic.event_kinds, min_size=1, max_size=12),
)
def test_messages_fast_path_decides_as_the_event_by_event_scan(head: list[bytes], body: list[bytes]) -> None:
    reads = [test_wire_anthropic.MESSAGE_START + test_wire_anthropic.BLOCK_START, *head, b"".join(body)]
    assert _decisions(MessagesFramer(), reads) == _decisions(SlowMessages(), reads)
