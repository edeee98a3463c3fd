"""Bad input gets OpenAI-shaped 4xx errors with the right status, never a 500."""

from __future__ import annotations

import httpx2
import pytest

from .support import GatewayFactory, chat_body

ERROR_KEYS = {"message", "type", "param", "code"}


def assert_openai_error(response: httpx2.Response, status: int) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    return error


async def test_invalid_json_is_400(client: httpx2.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert assert_openai_error(response, 400)["code"] == "invalid_json"


async def test_invalid_field_is_400_naming_the_param(client: httpx2.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(temperature=3))
    error = assert_openai_error(response, 400)
    assert error["param"] == "temperature"


async def test_missing_messages_is_400(client: httpx2.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "sim"})
    assert assert_openai_error(response, 400)["param"] == "messages"


async def test_unknown_route_is_404(client: httpx2.AsyncClient) -> None:
    assert_openai_error(await client.get("/v1/nothing-here"), 404)


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("PUT", "/health")])
async def test_wrong_method_is_405(client: httpx2.AsyncClient, method: str, path: str) -> None:
    response = await client.request(method, path)
    assert_openai_error(response, 405)


async def test_oversized_body_is_413(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(max_body_bytes=2048)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/v1/chat/completions", json=chat_body(content="x" * 5000))
    assert_openai_error(response, 413)


async def test_oversized_chunked_body_is_413(start_gateway: GatewayFactory) -> None:
    gateway = await start_gateway(max_body_bytes=2048)

    async def body():  # no content-length: the limit must hold while reading
        for _ in range(10):
            yield b"x" * 1024

    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/v1/chat/completions", content=body())
    assert_openai_error(response, 413)


async def test_invalid_utf8_is_400(client: httpx2.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", content=b'{"model":"\xff"}')
    assert_openai_error(response, 400)


async def test_deeply_nested_json_is_400(client: httpx2.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", content=b"[" * 50_000 + b"]" * 50_000)
    assert_openai_error(response, 400)


async def test_upstream_api_key_is_sent_upstream_and_never_shown(
    start_gateway: GatewayFactory, simulator, capfd: pytest.CaptureFixture[str]
) -> None:
    secret = "sk-test-SECRET-never-shown-123"
    gateway = await start_gateway(upstream_api_key=secret)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        ok = await http.post("/v1/chat/completions", json=chat_body("sim:tokens=2", stream=False))
        failed = await http.post("/v1/chat/completions", json=chat_body("sim:fault=status,status_code=401", stream=False))
        metrics = await http.get("/metrics/backpressure")
    assert ok.status_code == 200
    assert simulator.stats.authorization_seen >= 1
    out, err = capfd.readouterr()
    for text in (ok.text, failed.text, metrics.text, out, err):
        assert secret not in text


async def test_duplicate_keys_are_400_and_never_reach_the_upstream(client: httpx2.AsyncClient, simulator) -> None:
    # The gateway would route on the last "model"; an upstream that keeps the first would serve another one.
    raw = b'{"model":"sim:tokens=1","stream":false,"messages":[{"role":"user","content":"hi"}],"model":"sim:tokens=5"}'
    response = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "duplicate_key")
    assert simulator.stats.requests_started == 0
    # The same connection still serves the next request.
    assert (await client.post("/v1/chat/completions", json=chat_body(stream=False))).status_code == 200


async def test_a_model_name_over_the_limit_is_400(start_gateway: GatewayFactory, simulator) -> None:
    gateway = await start_gateway(max_model_name_length=64)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/v1/chat/completions", json=chat_body("sim:" + "x" * 100_000))
        error = assert_openai_error(response, 400)
        assert (error["type"], error["param"]) == ("invalid_request_error", "model")
        assert len(response.content) < 1000  # the name is not echoed back
        assert (await http.post("/v1/chat/completions", json=chat_body("s" * 64, stream=False))).status_code == 200
    assert simulator.stats.requests_started == 1


@pytest.mark.parametrize("endpoint", ["api.relay_chat", "outer.inner.view", "plain", None])
def test_the_gateway_request_names_the_blueprints_quart_s_own_request_names(endpoint: str | None) -> None:
    # GatewayRequest only reads the same answer more cheaply: before/after
    # hooks and error handlers are looked up by these names.
    from quart_trio.wrappers import TrioRequest as Request
    from werkzeug.routing import Rule

    from sluice.app import GatewayRequest

    def names(request_class: type[Request]) -> list[str]:
        request = request_class.__new__(request_class)
        request.url_rule = Rule("/x", endpoint=endpoint) if endpoint is not None else None  # type: ignore[assignment]
        return request.blueprints

    assert names(GatewayRequest) == names(Request)
