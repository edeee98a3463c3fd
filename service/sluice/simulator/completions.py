"""``POST /v1/completions``: OpenAI's legacy completions (data-only events like chat, ``data: [DONE]``).

Chunks: ``{"id","object":"text_completion","created","model","choices":[{"text","index","logprobs":null,"finish_reason":null}]}``;
then one chunk per choice with ``"text": ""`` and the finish reason; with
``stream_options.include_usage`` a usage chunk with ``"choices": []``.
"""

from __future__ import annotations

import json
from typing import Any

from .chat import MALFORMED_DATA, OPENAI_ERROR_EVENT
from .grammar import Answer, BadRequest, ErrorStyle, Exchange, compact, positive_int, words


def _prompt(payload: dict[str, Any]) -> str:
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (or a list of one string) for the simulator.", param="prompt")
    return prompt


class CompletionsApi:
    name = "completions"
    errors: ErrorStyle = "openai"

    def parse(self, payload: Any) -> Exchange:
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str):
            raise BadRequest("'model' (string) and 'prompt' are required.", param="model")
        prompt = _prompt(payload)
        n = payload.get("n")
        return Exchange(
            model=model,
            stream=bool(payload.get("stream")),
            prompt=prompt,
            input_tokens=words(prompt),
            max_tokens=positive_int(payload, "max_tokens"),
            n=n if isinstance(n, int) and n > 0 else 1,
            payload=payload,
        )

    def body(self, exchange: Exchange, answer: Answer) -> bytes:
        text = answer.text()
        return json.dumps(
            {
                "id": f"cmpl-sim-{answer.number}",
                "object": "text_completion",
                "created": answer.created,
                "model": exchange.model,
                "choices": [
                    {"text": text, "index": i, "logprobs": None, "finish_reason": answer.finish} for i in range(exchange.n)
                ],
                "usage": _usage(exchange, answer),
            }
        ).encode()

    def stream(self, exchange: Exchange, answer: Answer) -> CompletionsRenderer:
        return CompletionsRenderer(exchange, answer)


def _usage(exchange: Exchange, answer: Answer) -> dict[str, int]:
    completion = answer.tokens * exchange.n
    return {"prompt_tokens": exchange.input_tokens, "completion_tokens": completion, "total_tokens": exchange.input_tokens + completion}


class CompletionsRenderer:
    """Pre-encoded chunks: the JSON around a token is built once, the token spliced in."""

    def __init__(self, exchange: Exchange, answer: Answer) -> None:
        stream_options = exchange.payload.get("stream_options")
        self._include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        self._envelope = {
            "id": f"cmpl-sim-{answer.number}",
            "object": "text_completion",
            "created": answer.created,
            "model": exchange.model,
        }
        head = compact(self._envelope)[:-1] + b',"choices":[{"text":'
        self._head, self._n = b"data: " + head, exchange.n
        self._exchange, self._answer = exchange, answer
        self._content_tails = [self._tail(index, None) for index in range(exchange.n)]

    @staticmethod
    def _tail(index: int, finish: str | None) -> bytes:
        return b',"index":%d,"logprobs":null,"finish_reason":%s}]}\n\n' % (index, compact(finish))

    def opening(self) -> bytes:
        return b""

    def first(self) -> bytes:
        return b""

    def token(self, token: str) -> bytes:
        text = self._head + json.dumps(token).encode()
        if self._n == 1:
            return text + self._content_tails[0]
        return b"".join(text + tail for tail in self._content_tails)

    def closing(self, *, terminal: bool) -> bytes:
        out = b"".join(self._head + b'""' + self._tail(index, self._answer.finish) for index in range(self._n))
        if self._include_usage:
            usage = {**self._envelope, "choices": [], "usage": _usage(self._exchange, self._answer)}
            out += b"data: " + compact(usage) + b"\n\n"
        return out + (b"data: [DONE]\n\n" if terminal else b"")

    def malformed(self) -> bytes:
        return MALFORMED_DATA

    def error_event(self) -> bytes:
        return OPENAI_ERROR_EVENT
