"""``POST /v1/chat/completions``: OpenAI's chat grammar (data-only events, ``data: [DONE]``).

The bytes are :class:`~.behaviour.ChunkEncoder`'s, unchanged since before
the other APIs were added: the gateway's and the benchmarks' baseline.
"""

from __future__ import annotations

import json
from typing import Any

from .behaviour import ChunkEncoder, completion_body, prompt_of, prompt_tokens
from .grammar import Answer, BadRequest, ErrorStyle, Exchange, positive_int

#: the chat grammar's in-stream error (``fault=error_event``), also used by legacy completions
OPENAI_ERROR_EVENT = (
    b'data: {"error": {"message": "simulated upstream error", "type": "server_error", "param": null, "code": "simulated"}}\n\n'
)
MALFORMED_DATA = b"data: {not json\n\n"


class ChatApi:
    name = "chat"
    errors: ErrorStyle = "openai"

    def parse(self, payload: Any) -> Exchange:
        model = payload.get("model") if isinstance(payload, dict) else None
        messages = payload.get("messages") if isinstance(payload, dict) else None
        if not isinstance(model, str) or not isinstance(messages, list) or not messages:
            raise BadRequest("'model' (string) and 'messages' (non-empty list) are required.", param="messages")
        n = payload.get("n")
        return Exchange(
            model=model,
            stream=bool(payload.get("stream")),
            prompt=prompt_of(messages),
            input_tokens=prompt_tokens(messages),
            max_tokens=positive_int(payload, "max_completion_tokens", "max_tokens"),
            n=n if isinstance(n, int) and n > 0 else 1,
            payload=payload,
        )

    def body(self, exchange: Exchange, answer: Answer) -> bytes:
        body = completion_body(
            f"chatcmpl-sim-{answer.number}", answer.created, exchange.model, answer.text(), answer.finish,
            exchange.n, exchange.input_tokens, answer.tokens,
        )  # fmt: skip
        return json.dumps(body).encode()

    def stream(self, exchange: Exchange, answer: Answer) -> ChatRenderer:
        return ChatRenderer(exchange, answer)


class ChatRenderer:
    def __init__(self, exchange: Exchange, answer: Answer) -> None:
        stream_options = exchange.payload.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        self._encoder = ChunkEncoder(f"chatcmpl-sim-{answer.number}", answer.created, exchange.model, include_usage=include_usage)
        self._usage = self._encoder.usage(exchange.input_tokens, answer.tokens) if include_usage else b""
        self._n = exchange.n
        self._finish = answer.finish

    def opening(self) -> bytes:
        return b""

    def first(self) -> bytes:
        return b"".join(self._encoder.role(index) for index in range(self._n))

    def token(self, token: str) -> bytes:
        if self._n == 1:
            return self._encoder.content(token)
        return b"".join(self._encoder.content(token, index) for index in range(self._n))

    def closing(self, *, terminal: bool) -> bytes:
        finish = b"".join(self._encoder.finish(self._finish, index) for index in range(self._n))
        return finish + self._usage + (b"data: [DONE]\n\n" if terminal else b"")

    def malformed(self) -> bytes:
        return MALFORMED_DATA

    def error_event(self) -> bytes:
        return OPENAI_ERROR_EVENT
