"""Scrubbing configured secrets out of bytes relayed to clients (sans-IO).

An upstream may echo what it was sent: a provider's 401 body quoting the
``Authorization`` header, a proxy's 502 page, an error event mid-stream. The
gateway relays those bytes, so it must remove its own credentials from them
first. :class:`Scrubber` holds the configured secrets and replaces each
occurrence with ``[redacted]``.

Which forms of a secret are matched, and why:

* the raw key, which also covers ``Bearer <key>`` and a whole echoed header;
* its JSON-escaped forms when they differ from the raw key (``\\/`` for a
  ``/``, ``\\uXXXX`` for non-ASCII), since most relayed bodies are JSON;
* not base64: nobody sends these keys base64-encoded (bearer tokens go as
  they are), and a base64 echo of a longer string contains the key's
  encoding only at one of three alignments with unknown edge characters, so
  matching it would be partial at best.

Invariants:

* Secrets shorter than :data:`MIN_SECRET_LENGTH` are ignored: replacing a
  short string would rewrite ordinary text, and a key that short protects
  nothing anyway (the same rule as :func:`sluice.logs.redact`).
* Longer forms are replaced before shorter ones, so no form is left half
  replaced by another that is a substring of it.
* With nothing found, :meth:`Scrubber.scrub` returns its argument itself:
  the cost on clean bytes is one ``in`` scan (C ``memmem``) per form.
* A secret split across two calls is not found: callers pass whole units
  (a whole body, a whole error event, whole SSE events from the framer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 8


def _forms(secret: str) -> set[str]:
    """The spellings of ``secret`` a relayed body may contain."""
    return {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        secret.replace("/", "\\/"),
    }


class Scrubber:
    """Replaces every configured secret in relayed bytes or text with ``[redacted]``."""

    __slots__ = ("_text_forms", "_byte_forms")

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET_LENGTH:
                forms |= _forms(secret)
        ordered = sorted(forms, key=len, reverse=True)
        self._text_forms: tuple[str, ...] = tuple(ordered)
        self._byte_forms: tuple[bytes, ...] = tuple(form.encode() for form in ordered)

    def __bool__(self) -> bool:
        return bool(self._byte_forms)

    def __len__(self) -> int:
        """How many forms each call scans for."""
        return len(self._byte_forms)

    def scrub(self, data: bytes) -> bytes:
        for form in self._byte_forms:
            if form in data:
                data = data.replace(form, b"[redacted]")
        return data

    def scrub_text(self, text: str) -> str:
        for form in self._text_forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text
