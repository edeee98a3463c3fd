"""OpenAI chat-completions shapes: the request model and chunk handling (sans-IO).

The gateway validates only what it depends on and forwards every other
field unchanged: :class:`ChatCompletionRequest` allows extra fields, and the
relay forwards the client's own JSON rather than a re-serialised model, so
numbers, key order and unknown fields (``tools``, ``response_format``, ...)
reach the upstream exactly as the client wrote them.

Because the client's bytes are forwarded, the gateway must read them the way
every upstream does. A JSON object with the same key twice has no single
meaning (Python keeps the last, other parsers the first), so the gateway
would validate and route on one value while the upstream serves another:
:func:`load_json_object`, where every API's parser starts, refuses duplicate keys at any depth (``messages[i]``
and ``stream_options`` steer the upstream as much as the top level does).

:func:`coalesce_events` is the ``coalesce`` backpressure policy's data
half: it merges queued content deltas of the same choice into one chunk, and
leaves every event it does not fully understand untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidJSON, InvalidRequest

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
BackpressureName = Literal["block", "drop_oldest", "drop_newest", "error", "coalesce"]

#: the body field a client may use to pick a policy; stripped before forwarding
BACKPRESSURE_FIELD = "backpressure_strategy"


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Role
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """The fields the gateway depends on; anything else passes through."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    backpressure_strategy: BackpressureName | None = None


class _DuplicateKey(Exception):
    """Raised by :func:`_unique_keys` to stop the parse at the first repeated key."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # The hot path: one dict built from the pairs (as json would) and one length check.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey
    return result


#: built once: ``json.loads(raw, object_pairs_hook=...)`` would build a decoder and its scanner on every call
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _loads_unique(raw: bytes | str) -> Any:
    """``json.loads`` (same encodings, same errors) refusing repeated keys with :class:`_DuplicateKey`."""
    text = raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw), "surrogatepass")
    return _DECODER.decode(text)


class _Pairs(list[tuple[str, Any]]):
    """An object kept as its key/value pairs, to find where a duplicate sits (error path only)."""


def _first_duplicate(value: Any, path: str = "") -> str | None:
    """The OpenAI-style path of the first repeated key (``messages[0].role``), depth first."""
    if isinstance(value, _Pairs):
        seen: set[str] = set()
        for key, item in value:
            where = f"{path}.{key}" if path else key
            if key in seen:
                return where
            seen.add(key)
            found = _first_duplicate(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_duplicate(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _duplicate_key_error(raw: bytes) -> InvalidRequest:
    where = _first_duplicate(json.loads(raw, object_pairs_hook=_Pairs)) or ""
    return InvalidRequest(
        f"The request body repeats the key '{where}'; each key may appear only once per JSON object.",
        param=where or None,
        code="duplicate_key",
    )


_Model = TypeVar("_Model", bound=BaseModel)


def load_validated(
    raw: bytes, model_type: type[_Model], max_model_name_length: int | None
) -> tuple[dict[str, Any], _Model]:
    """The body and its validated model: every API's parser starts here (JSON, duplicate keys, fields, model length)."""
    body = load_json_object(raw)
    validated = validate_body(model_type, body)
    check_model_name_length(validated.model, max_model_name_length)  # type: ignore[attr-defined]
    return body, validated


def check_stream_options(stream: bool | None, stream_options: object) -> None:
    """``stream_options`` only with ``stream``, as OpenAI answers (chat and legacy completions)."""
    if stream_options is not None and not stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
            code="invalid_value",
        )


def load_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, refusing invalid JSON and repeated keys (400s).

    Every API's request parser starts here, so all of them read a body the
    way the upstream will.
    """
    try:
        body = _loads_unique(raw)
    except _DuplicateKey:
        raise _duplicate_key_error(raw) from None
    except (ValueError, RecursionError) as exc:
        # RecursionError: deeply nested JSON must be a 400, not a 500.
        raise InvalidJSON(f"The request body is not valid JSON: {exc}".split("\n")[0]) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def validate_body(model_type: type[_Model], body: dict[str, Any]) -> _Model:
    """``model_type.model_validate(body)`` with pydantic's errors turned into OpenAI-style 400s."""
    try:
        return model_type.model_validate(body)
    except ValidationError as exc:
        raise _invalid_request_from(exc) from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.") from None


def check_model_name_length(name: str, max_model_name_length: int | None) -> None:
    """Refuse a ``model`` longer than the limit: it becomes a metrics label, a log field and a routing key."""
    if max_model_name_length is not None and len(name) > max_model_name_length:
        raise InvalidRequest(
            f"The 'model' parameter is {len(name)} characters long; the limit is {max_model_name_length}.",
            param="model",
            code="invalid_value",
        )


def _invalid_request_from(exc: ValidationError) -> InvalidRequest:
    first = exc.errors(include_url=False)[0]
    param = _param_name(first["loc"])
    if first["type"] == "missing":
        return InvalidRequest(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    return InvalidRequest(
        f"Invalid value for '{param}': {first['msg']}.", param=param or None, code="invalid_value"
    )


_UNION_LABELS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _param_name(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "role")`` -> ``"messages[0].role"``, OpenAI's spelling."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in _UNION_LABELS or not part.isidentifier():
            continue  # a union-branch label pydantic adds to the location, not a field
        else:
            name += f".{part}" if name else str(part)
    return name


# --- coalescing -----------------------------------------------------------------

_MERGEABLE_DELTA_KEYS = frozenset({"content", "role"})


def coalesce_events(payload: bytes) -> tuple[bytes, int]:
    """Merge consecutive content deltas per choice; return (events, events merged away).

    A run of plain content chunks (one choice, delta of only ``content``/
    ``role``, no ``finish_reason``, no logprobs) collapses into one chunk per
    choice index, keeping the first chunk's metadata. Anything else (finish
    chunks, tool calls, usage, unknown shapes) is a barrier kept as is, so
    the merged stream carries exactly the same text in the same order per
    choice. Cost: one ``json.loads`` per event, paid only while a ``coalesce``
    stream's channel is full.
    """
    return coalesce_choices(payload, _mergeable_chunk, _merge_content)


def coalesce_choices(
    payload: bytes,
    mergeable: Callable[[bytes], dict[str, Any] | None],
    merge: Callable[[dict[str, Any], dict[str, Any]], None],
) -> tuple[bytes, int]:
    """Merge consecutive mergeable data-only chunks per choice index; return (events, events merged away).

    ``mergeable`` parses a chunk of one choice, or gives ``None`` for a
    barrier (flushes every run, then is kept as is); ``merge`` folds the next
    choice of a run into the first. A run of one chunk is kept byte for byte.
    Shared by chat (``delta.content``) and legacy completions (``text``).
    """
    events = payload.split(b"\n\n")
    events.pop()
    out: list[bytes] = []
    #: choice index -> [first chunk, its bytes, chunks merged into it]
    run: dict[int, list[Any]] = {}
    merged = 0

    def flush() -> None:
        for chunk, raw, count in run.values():
            out.append(raw if count == 0 else b"data: " + _dump(chunk) + b"\n\n")
        run.clear()

    for event in events:
        chunk = mergeable(event)
        if chunk is None:
            flush()
            out.append(event + b"\n\n")
            continue
        choice = chunk["choices"][0]
        held = run.get(choice.get("index", 0))
        if held is None:
            run[choice.get("index", 0)] = [chunk, event + b"\n\n", 0]
            continue
        merge(held[0]["choices"][0], choice)
        held[2] += 1
        merged += 1
    flush()
    return b"".join(out), merged


def single_choice_chunk(event: bytes) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A ``data:`` chunk with exactly one choice, not finished, no logprobs, no usage: (chunk, choice); else ``None``."""
    if not event.startswith(b"data:"):
        return None
    try:
        chunk = json.loads(event[5:])
    except ValueError:
        return None
    if not isinstance(chunk, dict) or chunk.get("usage") is not None:
        return None
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if choice.get("finish_reason") is not None or choice.get("logprobs") is not None:
        return None
    return chunk, choice


def _mergeable_chunk(event: bytes) -> dict[str, Any] | None:
    found = single_choice_chunk(event)
    if found is None:
        return None
    chunk, choice = found
    delta = choice.get("delta")
    if (
        not isinstance(delta, dict)
        or not set(delta) <= _MERGEABLE_DELTA_KEYS
        or not isinstance(delta.get("content", ""), (str, type(None)))
        or set(choice) - {"index", "delta", "finish_reason", "logprobs"}
    ):
        return None
    return chunk


def _merge_content(first: dict[str, Any], more: dict[str, Any]) -> None:
    delta = first["delta"]
    delta["content"] = (delta.get("content") or "") + (more["delta"].get("content") or "")


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
