"""Micro-benchmark: ``StreamFramer.feed`` CPU per event, per grammar (a few seconds; no sockets).

    .venv/bin/python -m benchmarks.grammar_feed

Two views of a typical 50-token stream: whole streams (preamble, deltas,
usage, terminal) cut into reads of one event, of the whole stream, and of
4 KiB; and the steady state (content started, one or 16 deltas per read),
the path every token takes. Times are CPU time (``time.process_time``), the
best of several repeats, so other processes on a shared machine disturb
them less; compare rows of one run, not runs on different days.
"""

from __future__ import annotations

import json
import time
import timeit
from collections.abc import Callable
from typing import Any

from sluice.wire.anthropic import MessagesFramer
from sluice.wire.chat import ChatFramer, CompletionsFramer
from sluice.wire.responses import ResponsesFramer
from sluice.wire.sse import DONE_EVENT, EventFramer

TOKENS = [f"tok{i} " for i in range(50)]


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: ".encode() + _dump({"type": kind, **fields}) + b"\n\n"


def _chat_chunk(token: str) -> bytes:
    choice = {"index": 0, "delta": {"content": token}, "finish_reason": None}
    return b"data: " + _dump({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}) + b"\n\n"


def _text_chunk(token: str) -> bytes:
    choice = {"index": 0, "text": token, "finish_reason": None, "logprobs": None}
    return b"data: " + _dump({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}) + b"\n\n"


def _responses_delta(sequence: int, token: str) -> bytes:
    return _event("response.output_text.delta", sequence_number=sequence, item_id="msg_1", output_index=0,
                  content_index=0, delta=token, logprobs=[])


def _messages_delta(token: str) -> bytes:
    return _event("content_block_delta", index=0, delta={"type": "text_delta", "text": token})


USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":50,"total_tokens":55}}\n\n'
CHAT = b"".join(map(_chat_chunk, TOKENS)) + USAGE + DONE_EVENT
COMPLETIONS = b"".join(map(_text_chunk, TOKENS)) + DONE_EVENT
RESPONSES = (
    _event("response.created", sequence_number=0, response={"id": "r", "status": "in_progress", "output": []})
    + _event("response.in_progress", sequence_number=1, response={"id": "r"})
    + _event("response.output_item.added", sequence_number=2, output_index=0, item={"id": "msg_1", "type": "message"})
    + b"".join(_responses_delta(3 + i, t) for i, t in enumerate(TOKENS))
    + _event("response.output_text.done", sequence_number=53, item_id="msg_1", output_index=0, content_index=0, text="x")
    + _event("response.completed", sequence_number=54, response={"id": "r", "usage": {"input_tokens": 5, "output_tokens": 50}})
)
MESSAGES = (
    _event("message_start", message={"id": "m", "usage": {"input_tokens": 5, "output_tokens": 1}})
    + _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    + b"".join(map(_messages_delta, TOKENS))
    + _event("content_block_stop", index=0)
    + _event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 50})
    + _event("message_stop")
)

Framer = Any
CASES: list[tuple[str, Callable[[], Framer], bytes, bytes, bytes]] = [
    # label, new framer, whole stream, one steady-state delta, the read that starts content
    ("chat: EventFramer (before)", EventFramer, CHAT, _chat_chunk("tok "), b""),
    ("chat: ChatFramer", ChatFramer, CHAT, _chat_chunk("tok "), b""),
    ("chat: ChatFramer strip_usage", lambda: ChatFramer(strip_usage=True), CHAT, _chat_chunk("tok "), b""),
    ("completions", CompletionsFramer, COMPLETIONS, _text_chunk("tok "), b""),
    ("responses", ResponsesFramer, RESPONSES, _responses_delta(1234, "tok "),
     _event("response.output_item.added", sequence_number=0, output_index=0, item={})),
    ("messages", MessagesFramer, MESSAGES, _messages_delta("tok "), _event("content_block_start", index=0, content_block={})),
]


def _best(run: Callable[[], object], number: int) -> float:
    return min(timeit.Timer(run, timer=time.process_time).repeat(number=number, repeat=9)) / number


def main() -> None:
    # Warm-up: the first timings of a fresh process are slower (allocator, caches).
    for _, new_framer, stream, _, _ in CASES:
        for _ in range(300):
            new_framer().feed(stream)
    print(f"{'grammar':32s} {'reads':28s} µs/event")
    for label, new_framer, stream, delta, start in CASES:
        events = stream.count(b"\n\n")
        for mode, reads in (
            ("whole stream, 1 event/read", [e + b"\n\n" for e in stream.split(b"\n\n")[:-1]]),
            ("whole stream, 1 read", [stream]),
            ("whole stream, 4 KiB reads", [stream[i : i + 4096] for i in range(0, len(stream), 4096)]),
        ):
            def run(reads: list[bytes] = reads) -> None:
                framer = new_framer()
                for read in reads:
                    framer.feed(read)
                assert framer.done

            print(f"{label:32s} {mode:28s} {_best(run, 300) / events * 1e6:6.2f}")
        for batch in (1, 16):
            framer = new_framer()
            framer.feed(start)
            read = delta * batch
            print(f"{label:32s} {f'steady, {batch} delta/read':28s} {_best(lambda: framer.feed(read), 20000 // batch) / batch * 1e6:6.2f}")


if __name__ == "__main__":
    main()
