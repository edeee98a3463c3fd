"""Configured secrets never reach a client, whatever an upstream echoes (issue 14, item 8).

The upstream here is a small raw trio + h11 server that quotes the request's
``Authorization`` header in everything it sends: error bodies of every
status, a mid-stream error event, streamed content, a completion, its model
list. Every client reads through a real socket (tests/rawclient.py, h11),
and the assertion is on the bytes it got, head and body.
"""

from __future__ import annotations

import json
from typing import Any

import h11
import pytest
import trio

from sluice.config import DeploymentConfig, ModelConfig, VirtualKeyConfig
from sluice.redaction import Scrubber

from .rawclient import RawStream
from .support import GatewayFactory, RunningSimulator, chat_body, parse_sse

#: a '/' so that a JSON encoder escaping it ('\/') is covered too
PROVIDER_KEY = "sk-provider/SECRET-0123456789"
GATEWAY_KEY = "sk-gateway-client-key-0123"
NO_RETRIES = {"retry_max_attempts": 1}


class EchoUpstream:
    """An OpenAI-shaped upstream that quotes the Authorization header it was sent, everywhere.

    The model name picks what it does: ``echo:<status>`` (an error body),
    ``echo:escaped`` (a completion, '/' written as '\\/'), ``echo:prompt`` (400 quoting
    the prompt), ``echo:midstream`` (a token,
    then an error event), ``echo:content`` (the header as streamed content),
    anything else non-streamed: a completion whose content is the header.
    ``GET /v1/models`` lists a model owned by the header.
    """

    def __init__(self) -> None:
        self.requests = 0

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        task_status.started(f"http://127.0.0.1:{port}/v1")
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        http = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                request, body = await self._read_request(stream, http)
                if request is None:
                    return
                self.requests += 1
                headers = {k.decode(): v.decode() for k, v in request.headers}
                await self._answer(stream, http, request.target.decode(), headers.get("authorization", ""), body)
                if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                    return
                http.start_next_cycle()

    @staticmethod
    async def _read_request(stream: trio.SocketStream, http: h11.Connection) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = b""
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return None, b""
                http.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            else:
                return None, b""

    @staticmethod
    async def _send(
        stream: trio.SocketStream,
        http: h11.Connection,
        status: int,
        content_type: str,
        *parts: bytes,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        data = http.send(h11.Response(status_code=status, headers=[("content-type", content_type), *(headers or [])]))
        for part in parts:
            data += http.send(h11.Data(data=part))
        await stream.send_all(data + http.send(h11.EndOfMessage()))

    async def _answer(self, stream: trio.SocketStream, http: h11.Connection, target: str, auth: str, raw: bytes) -> None:
        if target.endswith("/models"):
            models = {"object": "list", "data": [{"id": "echo", "object": "model", "created": 0, "owned_by": auth}]}
            await self._send(stream, http, 200, "application/json", json.dumps(models).encode())
            return
        model = json.loads(raw)["model"]
        kind = model.removeprefix("echo:")
        said = f"Incorrect API key provided: {auth}"
        if kind == "prompt":
            kind, said = "400", f"Unsupported prompt: {json.loads(raw)['messages'][-1]['content']}"
        if kind.isdigit():
            body = json.dumps({"error": {"message": said, "type": "invalid_request_error", "param": None, "code": "echo"}})
            # retry-after-ms is one of the headers the gateway relays: quote the key there too.
            await self._send(stream, http, int(kind), "application/json", body.encode(), headers=[("retry-after-ms", auth)])
        elif kind == "midstream":
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
            error = {"error": {"message": f"upstream saw {auth}", "type": "server_error", "param": None, "code": "echo"}}
            await self._send(
                stream, http, 200, "text/event-stream",
                b"data: " + json.dumps(chunk).encode() + b"\n\n",
                b"data: " + json.dumps(error).encode() + b"\n\n",
            )
        elif kind == "content":
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": {"content": auth}, "finish_reason": None}]}
            await self._send(
                stream, http, 200, "text/event-stream", b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
            )
        else:
            completion = {"id": "c", "object": "chat.completion", "created": 0, "model": model,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": auth}, "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            body = json.dumps(completion)
            if kind == "escaped":  # as encoders that escape '/' write it (PHP, some Java)
                body = body.replace("/", "\\/")
            await self._send(stream, http, 200, "application/json", body.encode())


@pytest.fixture
async def echo_upstream(nursery: trio.Nursery) -> tuple[EchoUpstream, str]:
    upstream = EchoUpstream()
    base_url = await nursery.start(upstream.serve)
    return upstream, base_url


@pytest.fixture
def gateway_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SLUICE_TEST_GATEWAY_KEY", GATEWAY_KEY)
    return GATEWAY_KEY


async def fetch(url: str, body: dict[str, Any] | None, *, path: str = "/v1/chat/completions") -> RawStream:
    """One request through a raw socket, read to its end."""
    with trio.fail_after(30):
        raw = await RawStream.open(url, body, path=path)
        await raw.read_all()
    await raw.close_fin()
    return raw


def assert_no_secret(raw: RawStream) -> None:
    seen = json.dumps(raw.headers) + raw.body.decode()
    for secret in (PROVIDER_KEY, PROVIDER_KEY.replace("/", "\\/"), "SECRET-0123456789"):
        assert secret not in seen, seen
    assert "[redacted]" in seen or raw.status == 502


@pytest.mark.parametrize(
    ("model", "stream", "status"),
    [
        pytest.param("echo:400", False, 400, id="400 body"),
        pytest.param("echo:escaped", False, 200, id="completion with escaped slashes"),
        pytest.param("echo:429", True, 429, id="429 body"),
        pytest.param("echo:500", False, 502, id="502 message quoting the upstream"),
        pytest.param("echo:401", True, 502, id="401 of the upstream"),
        pytest.param("echo:403", False, 502, id="403 of the upstream"),
        pytest.param("echo:midstream", True, 200, id="mid-stream error event"),
        pytest.param("echo:content", True, 200, id="streamed content"),
        pytest.param("echo:complete", False, 200, id="completion"),
    ],
)
async def test_an_upstream_echoing_the_provider_key_never_shows_it_to_the_client(
    start_gateway: GatewayFactory, echo_upstream: tuple[EchoUpstream, str], model: str, stream: bool, status: int
) -> None:
    upstream, base_url = echo_upstream
    gateway = await start_gateway(upstream_base_url=base_url, upstream_api_key=PROVIDER_KEY, **NO_RETRIES)
    raw = await fetch(gateway.url, chat_body(model, stream=stream))
    assert upstream.requests == 1
    assert raw.status == status
    assert_no_secret(raw)
    if model == "echo:midstream":
        error = parse_sse(bytes(raw.body)).error
        assert error is not None and error["message"] == "upstream saw Bearer [redacted]"


async def test_the_upstream_model_list_is_relayed_without_the_provider_key(
    start_gateway: GatewayFactory, echo_upstream: tuple[EchoUpstream, str]
) -> None:
    _, base_url = echo_upstream
    gateway = await start_gateway(upstream_base_url=base_url, upstream_api_key=PROVIDER_KEY)
    raw = await fetch(gateway.url, None, path="/v1/models")
    assert raw.status == 200
    assert json.loads(raw.body)["data"][0]["owned_by"] == "Bearer [redacted]"
    assert_no_secret(raw)


async def test_an_upstream_401_is_a_502_that_does_not_blame_the_clients_key(
    start_gateway: GatewayFactory, echo_upstream: tuple[EchoUpstream, str]
) -> None:
    _, base_url = echo_upstream
    gateway = await start_gateway(upstream_base_url=base_url, upstream_api_key=PROVIDER_KEY, **NO_RETRIES)
    raw = await fetch(gateway.url, chat_body("echo:401", stream=False))
    error = json.loads(raw.body)["error"]
    assert raw.status == 502 and error["code"] == "upstream_auth_failed" and error["type"] == "upstream_error"
    assert "gateway's credentials" in error["message"]
    assert "Incorrect API key" not in error["message"]  # the provider's words name "your" key: not relayed
    assert "www-authenticate" not in raw.headers


async def test_a_deployment_whose_key_is_refused_falls_back_to_the_next(
    start_gateway: GatewayFactory, echo_upstream: tuple[EchoUpstream, str], simulator: RunningSimulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream, base_url = echo_upstream
    monkeypatch.setenv("SLUICE_TEST_PROVIDER_KEY", PROVIDER_KEY)
    refused = DeploymentConfig(base_url=base_url, api_key_env="SLUICE_TEST_PROVIDER_KEY", model="echo:401", name="refused")
    backup = DeploymentConfig(base_url=simulator.base_url, model="sim:tokens=2", name="backup")
    gateway = await start_gateway(
        models=[ModelConfig(name="m", deployments=[refused], fallbacks=["b"]), ModelConfig(name="b", deployments=[backup])],
        **NO_RETRIES,
    )
    raw = await fetch(gateway.url, chat_body("m"))
    assert upstream.requests == 1  # the refused deployment was tried first
    assert raw.status == 200 and raw.headers["x-sluice-deployment"] == "backup"
    assert parse_sse(bytes(raw.body)).ended_with_done


async def test_gateway_keys_are_scrubbed_from_relayed_error_bodies(
    start_gateway: GatewayFactory, echo_upstream: tuple[EchoUpstream, str], gateway_key: str
) -> None:
    # A client's Authorization header never goes upstream; a body that quotes
    # a gateway key anyway (here the prompt held one, and the upstream's 400
    # repeats the prompt) is scrubbed like a provider key.
    _, base_url = echo_upstream
    gateway = await start_gateway(
        upstream_base_url=base_url, keys=[VirtualKeyConfig(name="team", key_env="SLUICE_TEST_GATEWAY_KEY")], **NO_RETRIES
    )
    with trio.fail_after(30):
        raw = await RawStream.open(
            gateway.url,
            chat_body("echo:prompt", stream=False, content=f"my key is {gateway_key}"),
            headers={"authorization": f"Bearer {gateway_key}"},
        )
        await raw.read_all()
    await raw.close_fin()
    assert raw.status == 400
    assert json.loads(raw.body)["error"]["message"] == "Unsupported prompt: my key is [redacted]"


def test_the_scrubber_replaces_every_form_and_leaves_clean_bytes_alone() -> None:
    scrubber = Scrubber([PROVIDER_KEY, "short", None])
    clean = b'data: {"choices":[{"delta":{"content":"short text"}}]}\n\n'
    assert scrubber.scrub(clean) is clean  # nothing found: the same object, no copy
    escaped = PROVIDER_KEY.replace("/", "\\/")
    quoted = f'{{"m":"Bearer {PROVIDER_KEY} and {escaped}"}}'.encode()
    assert scrubber.scrub(quoted) == b'{"m":"Bearer [redacted] and [redacted]"}'
    assert scrubber.scrub_text(f"key={PROVIDER_KEY}") == "key=[redacted]"
    assert not Scrubber(["short", None])
