"""``POST /v1/embeddings``: OpenAI's embeddings, deterministic from each input's text.

A vector is SHAKE-256 of the text stretched to ``dimensions`` 32-bit
numbers, mapped to [-1, 1), scaled to unit length and rounded to float32, so
``encoding_format: "float"`` and ``"base64"`` (little-endian float32, what
the openai SDK asks for by default) carry the same numbers. The values per
request are bounded (:data:`MAX_VALUES`): the embedded simulator shares the
gateway's process and must not spend seconds of CPU on one request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from typing import Any

from .grammar import Answer, BadRequest, ErrorStyle, Exchange, words

DEFAULT_DIMENSIONS = 1536
MAX_DIMENSIONS = 3072
MAX_INPUTS = 2048
#: inputs x dimensions per request (a few hundred milliseconds of CPU at most)
MAX_VALUES = 1_048_576


def embedding(text: str, dimensions: int) -> list[float]:
    """The unit vector for ``text``: a pure function of the text and the dimension count."""
    raw = hashlib.shake_256(text.encode("utf-8", "surrogatepass")).digest(4 * dimensions)
    values = [x / 2147483648.0 - 1.0 for x in struct.unpack(f"<{dimensions}I", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Round through float32: the float and base64 encodings then carry the same numbers.
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *(v / norm for v in values))))


def _texts(value: Any) -> list[str]:
    """The inputs as texts: a string, strings, a token array or token arrays (tokens joined by spaces)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, str) for v in value):
            return value
        if all(isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value):
            return [" ".join(map(str, v)) for v in value]
    raise BadRequest("'input' must be a non-empty string, list of strings, or token array(s).", param="input")


class EmbeddingsApi:
    name = "embeddings"
    errors: ErrorStyle = "openai"

    def parse(self, payload: Any) -> Exchange:
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str):
            raise BadRequest("'model' (string) and 'input' are required.", param="model")
        texts = _texts(payload.get("input"))
        if any(text == "" for text in texts):
            raise BadRequest("'input' cannot contain an empty string.", param="input")
        dimensions = payload.get("dimensions", DEFAULT_DIMENSIONS)
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= MAX_DIMENSIONS:
            raise BadRequest(f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}.", param="dimensions")
        encoding = payload.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
        if len(texts) > MAX_INPUTS or len(texts) * dimensions > MAX_VALUES:
            raise BadRequest(
                f"{len(texts)} inputs x {dimensions} dimensions is over the simulator's limit of {MAX_INPUTS} inputs "
                f"and {MAX_VALUES} values per request.",
                param="input",
                code="sim_limit_exceeded",
            )
        return Exchange(
            model=model,
            stream=False,
            prompt="",
            input_tokens=sum(words(text) for text in texts),
            generates=False,
            payload={"texts": texts, "dimensions": dimensions, "encoding_format": encoding},
        )

    def body(self, exchange: Exchange, answer: Answer) -> bytes:
        dimensions, as_base64 = exchange.payload["dimensions"], exchange.payload["encoding_format"] == "base64"
        data = []
        for index, text in enumerate(exchange.payload["texts"]):
            vector: Any = embedding(text, dimensions)
            if as_base64:
                vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        usage = {"prompt_tokens": exchange.input_tokens, "total_tokens": exchange.input_tokens}
        return json.dumps({"object": "list", "data": data, "model": exchange.model, "usage": usage}).encode()

    def stream(self, exchange: Exchange, answer: Answer) -> Any:
        raise AssertionError("embeddings are never streamed")  # Exchange.stream is always False here
