"""Sluice: an OpenAI-compatible LLM streaming gateway built on structured concurrency.

The data path, in the order a request meets it: ``app`` (routes) ->
``wire.openai`` (validation) -> ``relay`` (one nursery per stream: producer,
bounded channel, consumer) -> ``upstream`` (httpx2). See docs/architecture.md.
"""

__version__ = "0.1.0"
