"""A validated client request and the bytes to forward for it (sans-IO; shared by every grammar).

Invariants:

* The upstream gets the client's own bytes (numbers, key order, unknown
  fields exactly as written) unless the gateway must change the body:
  the deployment knows the model by another name, the client set the
  gateway's own ``backpressure_strategy`` field (never forwarded), or a
  grammar adds a field (chat's ``stream_options.include_usage``). Then the
  body is re-serialised once per attempt, never per token.
* :meth:`ForwardedRequest.new_framer` gives the framer for *this* request,
  so a grammar can tune it to what the client asked (chat strips the usage
  chunk it added on the client's behalf).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .grammar import StreamFramer
from .openai import BACKPRESSURE_FIELD


def dump_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


class ForwardedRequest:
    """One validated request (satisfies :class:`sluice.wire.grammar.ParsedRequest`)."""

    __slots__ = ("model_name", "stream", "backpressure_strategy", "body", "validated", "_raw", "_new_framer")

    def __init__(
        self,
        *,
        raw: bytes,
        body: dict[str, Any],
        validated: Any,
        model_name: str,
        stream: bool,
        backpressure_strategy: str | None,
        new_framer: Callable[[], StreamFramer],
    ) -> None:
        #: the public model name the client asked for (routing key)
        self.model_name = model_name
        self.stream = stream
        #: the policy the client picked in the body (the gateway's own field), if any
        self.backpressure_strategy = backpressure_strategy
        #: the client's JSON object, as parsed
        self.body = body
        #: the grammar's pydantic model of the fields the gateway depends on
        self.validated = validated
        self._raw = raw
        self._new_framer = new_framer

    def forwarded_fields(self, upstream_model: str | None) -> dict[str, Any] | None:
        """The body to re-serialise, or ``None`` when the client's bytes can go as they are."""
        renamed = upstream_model is not None and upstream_model != self.model_name
        if not renamed and BACKPRESSURE_FIELD not in self.body:
            return None
        fields = {k: v for k, v in self.body.items() if k != BACKPRESSURE_FIELD}
        if renamed:
            fields["model"] = upstream_model
        return fields

    def body_for_model(self, upstream_model: str | None) -> bytes:
        fields = self.forwarded_fields(upstream_model)
        return self._raw if fields is None else dump_json(fields)

    def new_framer(self) -> StreamFramer:
        return self._new_framer()
