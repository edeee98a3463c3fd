"""Property-based fuzzing of the gateway's HTTP surface, through a real socket.

Hypothesis generates request bodies (well-formed, ill-typed, out of range,
deeply nested, not JSON, not UTF-8), headers, methods and paths; each case
goes to a real hypercorn gateway (one per test function) in front of the
real simulator. Whatever arrives, the gateway must answer (no hang), never
with a 5xx, every non-2xx body must be OpenAI's error object exactly, and a
2xx stream must end with ``[DONE]`` or exactly one error event.

How hypothesis meets trio here: ``@given`` runs in a worker thread
(``trio.to_thread.run_sync``) and sends each case into the test's trio loop
with ``trio.from_thread.run``, so the gateway, the simulator and the
httpx2.AsyncClient live in the trio test while hypothesis drives them. (A
``@given`` async test under pytest-trio would start a new trio run, and so a
new gateway, per example.)

The upstream is the simulator: model names that are not ``sim:...`` get its
defaults (16 tokens, no delay), so a case that passes validation costs a few
milliseconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .support import Gateway, GatewayFactory, RunningSimulator, chat_body, parse_sse, stream_chat, wait_until

ERROR_KEYS = {"message", "type", "param", "code"}
#: one request may take this long before it counts as a hang (a loaded machine is slow, not wrong)
REQUEST_TIMEOUT = 30.0
CASES: dict[str, int] = {}

# --- strategies -------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=-(2**63) - 5, max_value=2**63 + 5),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
#: models the simulator answers quickly (defaults: 16 tokens) or rejects with a 4xx
models = st.one_of(
    st.sampled_from(["gpt-4o-mini", "sim", "sim:tokens=3", "sim:tokens=2,itl_ms=1", "sim:nonsense=1", "sim:tokens=x", ""]),
    st.text(min_size=1, max_size=30).filter(lambda m: not m.startswith("sim")),
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "robot", "", "USER"])
text_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}), max_size=3)
messages_ok = st.lists(
    st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=40), text_parts, st.none())}),
    min_size=1,
    max_size=3,
)
messages_any = st.one_of(messages_ok, json_values, st.lists(json_values, max_size=3), st.just([]))
numbers = st.one_of(
    st.integers(min_value=-5, max_value=300),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    json_values,
)
stream_options = st.one_of(st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), json_values)}), json_values)
policies = st.one_of(st.sampled_from(["block", "drop_oldest", "drop_newest", "error", "coalesce"]), json_values)

chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(models, json_values),
        "messages": messages_any,
        "temperature": numbers,
        "max_tokens": numbers,
        "max_completion_tokens": numbers,
        "n": st.one_of(st.integers(min_value=-2, max_value=4), numbers),
        "stream": st.one_of(st.booleans(), json_values),
        "stream_options": stream_options,
        "backpressure_strategy": policies,
        "tools": json_values,
        "x_unknown": json_values,
    },
)
#: mostly-valid bodies: the fuzz above mostly hits validation; these mostly reach the upstream
plausible_bodies = st.fixed_dictionaries(
    {"model": models, "messages": messages_ok},
    optional={
        "stream": st.booleans(),
        "temperature": st.floats(min_value=0, max_value=2),
        "max_tokens": st.integers(min_value=1, max_value=10**20),
        "n": st.integers(min_value=1, max_value=3),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "backpressure_strategy": st.sampled_from(["block", "drop_oldest", "drop_newest", "error", "coalesce"]),
        "metadata": json_values,
    },
)
#: what a client can put in a header value (httpx refuses leading/trailing whitespace itself)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(str.strip)
header_sets = st.fixed_dictionaries(
    {},
    optional={
        "x-sluice-backpressure": st.one_of(st.sampled_from(["block", "coalesce", "error", "BLOCK", ""]), header_text),
        "content-type": st.one_of(
            st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]),
            header_text,
        ),
        "x-request-id": header_text,
        "accept": header_text,
    },
)
raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b: b'{"model": "gpt", "messages": [{"role": "user", "content": "' + b + b'"}]}', st.binary(max_size=20)),
    st.builds(lambda depth: b'{"model": "gpt", "messages": ' + b"[" * depth + b"]" * depth + b"}", st.integers(0, 3000)),
    st.builds(lambda s: s.encode("utf-8", "surrogatepass"), st.text(max_size=60)),
)
methods = st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST", "HEAD", "OPTIONS"])
known_paths = ["/v1/chat/completions", "/v1/models", "/health", "/metrics/backpressure", "/v1", "/", "/v1/chat/completions/"]
paths = st.one_of(
    st.sampled_from(known_paths),
    st.builds(
        lambda parts: "/" + "/".join(parts),
        st.lists(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"), min_size=1, max_size=8), max_size=4),
    ),
    st.builds(lambda p, q: p + "?" + q, st.sampled_from(known_paths), st.text(st.characters(min_codepoint=0x30, max_codepoint=0x7A), max_size=10)),
)


# --- properties -----------------------------------------------------------------------------


def assert_openai_error_body(response: httpx2.Response) -> None:
    """A non-2xx answer is OpenAI's error object and nothing else."""
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


def assert_well_formed(response: httpx2.Response, method: str = "POST") -> None:
    assert response.status_code < 500, (response.status_code, response.content[:500])
    if method == "HEAD":
        return
    if not 200 <= response.status_code < 300:
        assert_openai_error_body(response)
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        sse = parse_sse(response.content)
        errors = [d for d in sse.data if d.startswith('{"error"')]
        assert sse.events, "an empty stream"
        assert sse.ended_with_done or (len(errors) == 1 and sse.events[-1] == b"data: " + errors[0].encode()), sse.raw[-500:]
        if sse.ended_with_done:
            assert not errors


async def post(http: httpx2.AsyncClient, path: str, content: bytes, headers: dict[str, str], method: str = "POST") -> httpx2.Response:
    with trio.fail_after(REQUEST_TIMEOUT):  # a hang is a failure, not a wait
        return await http.request(method, path, content=content, headers=headers)


async def fuzz(name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], Awaitable[None]], max_examples: int) -> int:
    """Run ``check`` on ``max_examples`` generated cases in this trio loop; return how many ran."""
    tried = 0

    @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one_case(case: Any) -> None:
        nonlocal tried
        tried += 1
        trio.from_thread.run(check, case)

    began = time.monotonic()
    await trio.to_thread.run_sync(one_case)
    CASES[name] = tried
    print(f"\n[fuzz] {name}: {tried} cases in {time.monotonic() - began:.1f} s (total so far {sum(CASES.values())})")
    return tried


@pytest.fixture
async def http(gateway: Gateway) -> Any:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=REQUEST_TIMEOUT) as client:
        yield client


# --- fuzz tests -------------------------------------------------------------------------------


async def test_any_chat_body_gets_a_well_formed_answer_never_a_5xx(
    http: httpx2.AsyncClient, gateway: Gateway
) -> None:
    """Random JSON bodies of every wrong type and range: 4xx OpenAI errors or a proper completion/stream."""

    async def check(case: tuple[dict[str, Any], dict[str, str]]) -> None:
        body, headers = case
        headers = {"content-type": "application/json", **headers}
        response = await post(http, "/v1/chat/completions", json.dumps(body).encode(), headers)
        assert_well_formed(response)

    await fuzz("chat bodies x headers", st.tuples(st.one_of(chat_bodies, plausible_bodies), header_sets), check, 600)
    await wait_until(lambda: gateway.state.metrics.active_streams == 0)


async def test_raw_bytes_invalid_utf8_and_deep_nesting_get_a_4xx(http: httpx2.AsyncClient) -> None:
    """Bodies that are not JSON, not UTF-8, or nested thousands deep: a 400-class answer, never a 5xx."""

    async def check(raw: bytes) -> None:
        response = await post(http, "/v1/chat/completions", raw, {"content-type": "application/json"})
        assert_well_formed(response)

    await fuzz("raw bodies", raw_bodies, check, 300)


async def test_any_method_on_any_path_gets_a_well_formed_answer(http: httpx2.AsyncClient) -> None:
    """Every method on known and random paths: 404/405 (or the route's answer), OpenAI-shaped, never a 5xx."""

    async def check(case: tuple[str, str, bytes]) -> None:
        method, path, body = case
        response = await post(http, path, body, {"content-type": "application/json"}, method=method)
        assert_well_formed(response, method)
        assert not 300 <= response.status_code < 400, (method, path, response.status_code, response.headers)

    bodies = st.one_of(st.just(b""), st.just(json.dumps(chat_body("sim:tokens=2")).encode()), st.binary(max_size=40))
    await fuzz("methods x paths", st.tuples(methods, paths, bodies), check, 300)


# --- targeted cases -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="100000-nested-arrays"),
        pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="100000-nested-objects"),
        pytest.param(b'{"model":"gpt","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="nested-in-messages"),
        pytest.param(b'{"model":"gpt","messages":[{"role":"user","content":"hi"}],"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="nested-in-an-extra-field"),
        pytest.param(b'{"model":"gpt\xff\xfe","messages":[{"role":"user","content":"hi"}]}', id="invalid-utf8-in-a-string"),
        pytest.param(b'{"model":"gpt","messages":[{"role":"user","content":"\xc3\x28"}]}', id="invalid-utf8-continuation"),
    ],
)
async def test_deep_or_broken_bodies_are_400(http: httpx2.AsyncClient, raw: bytes) -> None:
    """Hostile bodies the parser must survive: a 400 with OpenAI's error object, not a 500 or a dropped connection."""
    response = await post(http, "/v1/chat/completions", raw, {"content-type": "application/json"})
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert_openai_error_body(response)


@pytest.mark.parametrize("with_policy_field", [False, True], ids=["forwarded-as-is", "re-serialised"])
async def test_nesting_just_under_the_parsers_limit_never_gives_a_5xx(http: httpx2.AsyncClient, with_policy_field: bool) -> None:
    """Nesting depths around Python's recursion limit, in a field the gateway forwards (and re-serialises
    when it strips ``backpressure_strategy``): each depth is a 400 or a completion, never a 500."""
    statuses: dict[int, int] = {}
    for depth in list(range(0, 1200, 100)) + list(range(900, 1000, 7)):
        body = b'{"model":"gpt","messages":[{"role":"user","content":"hi"}],"stream":false,"deep":'
        body += b"[" * depth + b"]" * depth
        body += b',"backpressure_strategy":"block"}' if with_policy_field else b"}"
        response = await post(http, "/v1/chat/completions", body, {"content-type": "application/json"})
        statuses[depth] = response.status_code
        assert_well_formed(response)
    print(f"\n[fuzz] nesting depth -> status ({'with' if with_policy_field else 'without'} the policy field): {statuses}")


async def test_a_huge_content_length_is_refused_before_the_body_arrives(start_gateway: GatewayFactory) -> None:
    """Content-Length over the limit gets 413 from the head alone: the gateway does not wait for (or read) the body.

    The body timeout is set far beyond the test's hang guard, so an answer at
    all proves the gateway did not wait for the missing megabytes.
    """
    gateway = await start_gateway(max_body_bytes=4096, body_timeout=3600)
    host, port = gateway.url.removeprefix("http://").split(":")
    with trio.fail_after(REQUEST_TIMEOUT):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: 104857600\r\n\r\n" + b'{"model": "sim", "messages": [' + b" " * 100
            )
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = await stream.receive_some(65536)
                assert chunk, f"connection closed without an answer: {received!r}"
                received += chunk
    assert received.startswith(b"HTTP/1.1 413"), received[:200]


async def test_a_client_sending_its_headers_byte_by_byte_does_not_hold_up_others(
    gateway: Gateway, simulator: RunningSimulator
) -> None:
    """A slowloris-style client trickling its request head: every other client is served meanwhile, and so is it in the end."""
    payload = json.dumps(chat_body("sim:tokens=5", content="slow")).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    host, port = gateway.url.removeprefix("http://").split(":")
    others_done = trio.Event()
    served: list[bool] = []

    async def others() -> None:
        async with httpx2.AsyncClient(base_url=gateway.url, timeout=REQUEST_TIMEOUT) as http:
            for i in range(10):
                _, sse = await stream_chat(http, chat_body("sim:tokens=5", content=f"fast {i}"))
                served.append(sse.ended_with_done)
        others_done.set()

    with trio.fail_after(60):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(others)
            sent = 0
            while not others_done.is_set() and sent < len(request) - 1:  # never the last byte until others are done
                await stream.send_all(request[sent : sent + 1])
                sent += 1
                await trio.sleep(0.01)
            await others_done.wait()
            await stream.send_all(request[sent:])
            received = b""
            # Up to the end of the chunked body, not EOF: see test_chaos's Connection: close test.
            while not received.endswith(b"\r\n0\r\n\r\n"):
                chunk = await stream.receive_some(65536)
                assert chunk, received
                received += chunk
    assert served == [True] * 10
    assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in received


async def test_a_content_part_with_a_non_string_text_is_not_a_5xx(http: httpx2.AsyncClient) -> None:
    """The gateway forwards content parts as they are (list of objects); the upstream must not fall over them."""
    body = chat_body("gpt-4o-mini", stream=False)
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": 5}]}]
    response = await post(http, "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"})
    assert_well_formed(response)

