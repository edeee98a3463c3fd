"""``POST /v1/responses``: OpenAI's Responses grammar (named events, no ``[DONE]``).

A stream, as the API sends it (every data object has ``type`` and a
``sequence_number`` counting from 0; one message item with one
``output_text`` part)::

    response.created, response.in_progress                      with the head
    response.output_item.added, response.content_part.added     with the first token
    response.output_text.delta                                  one per token
    response.output_text.done, response.content_part.done, response.output_item.done
    response.completed | response.incomplete (max_output_tokens) the terminal event, with usage

The in-stream error is ``event: error`` with ``{"type":"error","code","message","param","sequence_number"}``
(``ResponseErrorEvent``) and the body ends after it.
"""

from __future__ import annotations

import json
from typing import Any

from .grammar import Answer, BadRequest, ErrorStyle, Exchange, compact, positive_int, sse_event, text_of, words

ERROR_EVENT_DATA = {"code": "server_error", "message": "simulated upstream error", "param": None}


def _input_words(value: Any) -> int:
    if isinstance(value, str):
        return words(value)
    return sum(words(text_of(item.get("content"))) for item in value if isinstance(item, dict))


class ResponsesApi:
    name = "responses"
    errors: ErrorStyle = "openai"

    def parse(self, payload: Any) -> Exchange:
        model = payload.get("model") if isinstance(payload, dict) else None
        given = payload.get("input") if isinstance(payload, dict) else None
        if not isinstance(model, str) or not (isinstance(given, str) or (isinstance(given, list) and given)):
            raise BadRequest("'model' (string) and 'input' (string or non-empty list) are required.", param="input")
        last = given if isinstance(given, str) else given[-1]
        instructions = payload.get("instructions")
        return Exchange(
            model=model,
            stream=bool(payload.get("stream")),
            prompt=last if isinstance(last, str) else text_of(last.get("content") if isinstance(last, dict) else None),
            input_tokens=_input_words(given) + (words(instructions) if isinstance(instructions, str) else 0),
            max_tokens=positive_int(payload, "max_output_tokens"),
            payload=payload,
        )

    def body(self, exchange: Exchange, answer: Answer) -> bytes:
        return json.dumps(ResponseShape(exchange, answer).final(answer.text())).encode()

    def stream(self, exchange: Exchange, answer: Answer) -> ResponsesRenderer:
        return ResponsesRenderer(exchange, answer)


class ResponseShape:
    """The ``response`` object and its one message item, at each stage of the answer."""

    def __init__(self, exchange: Exchange, answer: Answer) -> None:
        self.id = f"resp_sim{answer.number:012d}"
        self.item_id = f"msg_sim{answer.number:012d}"
        self._exchange, self._answer = exchange, answer
        self.complete = answer.finish == "stop"

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        payload = self._exchange.payload
        return {
            "id": self.id,
            "object": "response",
            "created_at": self._answer.created,
            "status": status,
            "error": None,
            "incomplete_details": None if status != "incomplete" else {"reason": "max_output_tokens"},
            "instructions": payload.get("instructions"),
            "max_output_tokens": payload.get("max_output_tokens"),
            "model": self._exchange.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": payload.get("previous_response_id"),
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "metadata": {},
        }

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def item(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.item_id, "type": "message", "status": status, "content": content, "role": "assistant"}

    def usage(self) -> dict[str, Any]:
        prompt, output = self._exchange.input_tokens, self._answer.tokens
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output,
        }

    def final_item(self, text: str) -> dict[str, Any]:
        return self.item("completed" if self.complete else "incomplete", [self.part(text)])

    def final(self, text: str) -> dict[str, Any]:
        status = "completed" if self.complete else "incomplete"
        return self.response(status, [self.final_item(text)], self.usage())


class ResponsesRenderer:
    """The stream's events, numbered; a delta is a pre-encoded splice of the sequence number and the token."""

    def __init__(self, exchange: Exchange, answer: Answer) -> None:
        self._shape = ResponseShape(exchange, answer)
        self._answer = answer
        self._sequence = 0
        self._delta_head = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":'
        self._delta_middle = b',"item_id":%s,"output_index":0,"content_index":0,"delta":' % compact(self._shape.item_id)

    def _event(self, type_: str, **fields: Any) -> bytes:
        data = {"type": type_, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return sse_event(type_, data)

    def opening(self) -> bytes:
        in_progress = self._shape.response("in_progress", [], None)
        return self._event("response.created", response=in_progress) + self._event("response.in_progress", response=in_progress)

    def first(self) -> bytes:
        shape = self._shape
        return self._event("response.output_item.added", output_index=0, item=shape.item("in_progress", [])) + self._event(
            "response.content_part.added", item_id=shape.item_id, output_index=0, content_index=0, part=shape.part("")
        )

    def token(self, token: str) -> bytes:
        number = self._sequence
        self._sequence += 1
        return self._delta_head + b"%d" % number + self._delta_middle + json.dumps(token).encode() + b',"logprobs":[]}\n\n'

    def closing(self, *, terminal: bool) -> bytes:
        shape, text = self._shape, self._answer.text()
        where = {"item_id": shape.item_id, "output_index": 0, "content_index": 0}
        out = (
            self._event("response.output_text.done", **where, text=text, logprobs=[])
            + self._event("response.content_part.done", **where, part=shape.part(text))
            + self._event("response.output_item.done", output_index=0, item=shape.final_item(text))
        )
        if terminal:
            kind = "response.completed" if shape.complete else "response.incomplete"
            out += self._event(kind, response=shape.final(text))
        return out

    def malformed(self) -> bytes:
        return b"event: response.output_text.delta\ndata: {not json\n\n"

    def error_event(self) -> bytes:
        return self._event("error", **ERROR_EVENT_DATA)
