"""The simulated model's behaviour scheme and output, without I/O.

A request's behaviour comes from its model name and, optionally, ``x-sim-*``
headers (headers win)::

    sim                                   16 tokens, no delay
    sim:tokens=50,itl_ms=20,ttft_ms=300   50 tokens, 300 ms to the first, 20 ms apart
    sim:fault=status,status_code=429,retry_after=1
    sim:fault=reset,after=5               RST after 5 content chunks

Any model name not starting with ``sim`` is served with the defaults, so real
model names work against the simulator. The text is deterministic: a pure
function of the prompt, the token count and the seed (:func:`simulated_tokens`).

Chunks are pre-encoded: per request, the JSON around a token is built once
and each token is spliced in, so a token costs one small ``json.dumps`` of a
string, not of a whole chunk dict.

Tokens are generated when they are sent (:func:`iter_tokens`): a streamed
answer holds O(1) memory in its token count. What a request may ask for is
bounded by :class:`SimulatorLimits` (:func:`check_limits`): tokens x choices,
the scheduled duration and the model name's length, each refused with a 400
naming the parameter, because the embedded simulator shares its process with
the gateway and a request for 10^9 tokens must not be able to take it down.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

FAULTS = frozenset(
    {"status", "reset", "stall", "malformed", "no_done", "error_event", "disconnect_before_headers"}
)

VOCABULARY = (
    "the quick brown fox jumps over a lazy dog while river stones hum under "
    "silver light and every small bird sings of distant mountains where old "
    "trees keep quiet stories about rain wind snow fire salt bread honey "
    "lantern harbor meadow thunder echo amber velvet compass orbit prism "
    "signal anchor"
).split()


class SimParamError(ValueError):
    """A sim parameter that does not parse or is over a limit; the simulator answers 400 naming ``param``."""

    def __init__(self, message: str, *, param: str = "model", code: str = "invalid_sim_param") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class SimulatorLimits:
    """What one request may ask the simulator for."""

    #: completion tokens generated per request, over all ``n`` choices
    max_tokens: int = 100_000
    #: the answer's scheduled duration: ttft + itl x (tokens - 1) + a timed stall
    max_stream_seconds: float = 600.0
    #: longer names are refused before they are parsed or cached
    max_model_name_length: int = 1024


@dataclass(frozen=True, slots=True)
class Behaviour:
    tokens: int = 16
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    fault: str | None = None
    #: content chunks sent before a mid-stream fault strikes
    after: int = 0
    status_code: int = 500
    retry_after: float | None = None
    retry_after_ms: float | None = None
    #: how long a ``stall`` lasts; ``None`` = until the client goes away
    stall_ms: float | None = None
    #: the fault strikes only the first N requests with the same ``fault_key``
    fail_times: int | None = None
    fault_key: str | None = None
    seed: str = ""


_TYPES: dict[str, type] = {
    "tokens": int,
    "ttft_ms": float,
    "itl_ms": float,
    "fault": str,
    "after": int,
    "status_code": int,
    "retry_after": float,
    "retry_after_ms": float,
    "stall_ms": float,
    "fail_times": int,
    "fault_key": str,
    "seed": str,
}
assert set(_TYPES) == {f.name for f in fields(Behaviour)}


def _convert(key: str, value: str) -> Any:
    kind = _TYPES.get(key)
    if kind is None:
        raise SimParamError(f"unknown sim parameter {key!r}; known: {', '.join(sorted(_TYPES))}")
    try:
        converted = kind(value)
    except ValueError:
        raise SimParamError(f"sim parameter {key}={value!r} is not a valid {kind.__name__}") from None
    if kind in (int, float) and converted < 0:
        raise SimParamError(f"sim parameter {key} must not be negative")
    if key == "fault" and converted not in FAULTS:
        raise SimParamError(f"unknown fault {value!r}; known: {', '.join(sorted(FAULTS))}")
    if key == "status_code" and not 100 <= converted <= 599:
        raise SimParamError("status_code must be an HTTP status")
    return converted


@functools.lru_cache(maxsize=4096)
def _model_params(model: str) -> tuple[tuple[str, Any], ...]:
    if not model.startswith("sim:"):
        return ()
    params = []
    for item in model[4:].split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise SimParamError(f"sim parameter {item!r} must be key=value")
        params.append((key.strip(), _convert(key.strip(), value.strip())))
    return tuple(params)


def parse_behaviour(model: str, headers: Mapping[str, str] | None = None) -> Behaviour:
    """The behaviour for a request; raises :class:`SimParamError` on a bad parameter."""
    params = dict(_model_params(model))
    for name, value in (headers or {}).items():
        name = name.lower()
        if name.startswith("x-sim-"):
            key = name[6:].replace("-", "_")
            params[key] = _convert(key, value)
    behaviour = replace(Behaviour(), **params) if params else Behaviour()
    if behaviour.fault is not None and behaviour.fault_key is None:
        behaviour = replace(behaviour, fault_key=model)
    return behaviour


def check_model_name(model: str, limits: SimulatorLimits) -> None:
    """Refuse a model name over the limit before it is parsed or cached (the cache keys on it)."""
    if len(model) > limits.max_model_name_length:
        raise SimParamError(
            f"The model name is {len(model)} characters long; the limit is {limits.max_model_name_length}.",
            code="invalid_value",
        )


def check_limits(behaviour: Behaviour, count: int, n: int, limits: SimulatorLimits) -> None:
    """Refuse an answer of ``count`` tokens x ``n`` choices over ``limits``; :class:`SimParamError` names the param."""
    if count * n > limits.max_tokens:
        param = "n" if count <= limits.max_tokens else "model"
        raise SimParamError(
            f"The request asks for {count} tokens x {n} choices; the simulator generates at most "
            f"{limits.max_tokens} tokens per request.",
            param=param,
            code="sim_limit_exceeded",
        )
    stall_ms = behaviour.stall_ms if behaviour.fault == "stall" and behaviour.stall_ms is not None else 0.0
    scheduled_ms = behaviour.ttft_ms + behaviour.itl_ms * max(0, count - 1) + stall_ms
    if scheduled_ms > limits.max_stream_seconds * 1000.0:
        raise SimParamError(
            f"The requested timing (ttft_ms + itl_ms x tokens + stall_ms = {scheduled_ms:g} ms) exceeds the "
            f"simulator's limit of {limits.max_stream_seconds:g} s per answer.",
            code="sim_limit_exceeded",
        )


def iter_tokens(prompt: str, count: int, seed: str = "") -> Iterator[str]:
    """The deterministic tokens for a prompt, one at a time: words, each but the first with a leading space."""
    # surrogatepass: a lone surrogate (valid in JSON, not in UTF-8) must not crash the handler
    base = zlib.crc32(f"{seed}\x00{prompt}".encode("utf-8", "surrogatepass"))
    vocabulary, size, crc32 = VOCABULARY, len(VOCABULARY), zlib.crc32
    for i in range(count):
        word = vocabulary[crc32(i.to_bytes(4, "little"), base) % size]
        yield word if i == 0 else " " + word


def simulated_tokens(prompt: str, count: int, seed: str = "") -> list[str]:
    """:func:`iter_tokens` as a list (for tests and small answers)."""
    return list(iter_tokens(prompt, count, seed))


def prompt_of(messages: list[Any]) -> str:
    """The content of the last message (text parts joined), which seeds the text."""
    content = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
    if isinstance(content, list):
        # A part whose "text" is not a string must not crash the handler (the client would get a 502).
        return "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return content if isinstance(content, str) else ""


def prompt_tokens(messages: list[Any]) -> int:
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            total += sum(len(str(p.get("text", "")).split()) for p in content if isinstance(p, dict))
    return total


class ChunkEncoder:
    """Pre-encoded ``chat.completion.chunk`` events for one request."""

    def __init__(self, completion_id: str, created: int, model: str, *, include_usage: bool) -> None:
        usage = ',"usage":null' if include_usage else ""
        head = (
            f'data: {{"id":"{completion_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":{json.dumps(model)},"choices":[{{"index":'
        ).encode()
        self._head = head
        self._tail = ("}]" + usage + "}\n\n").encode()
        self._id, self._created, self._model = completion_id, created, model

    def role(self, index: int = 0) -> bytes:
        return self._head + b'%d,"delta":{"role":"assistant","content":""},"finish_reason":null' % index + self._tail

    def content(self, token: str, index: int = 0) -> bytes:
        return (
            self._head
            + b'%d,"delta":{"content":' % index
            + json.dumps(token).encode()
            + b'},"finish_reason":null'
            + self._tail
        )

    def finish(self, reason: str, index: int = 0) -> bytes:
        return self._head + f'{index},"delta":{{}},"finish_reason":"{reason}"'.encode() + self._tail

    def usage(self, prompt: int, completion: int) -> bytes:
        body = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def completion_body(
    completion_id: str, created: int, model: str, text: str, finish_reason: str, n: int, prompt: int, completion: int
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            for i in range(n)
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()
