"""bench.sse_client and run_load over real loopback sockets: chunked and Content-Length bodies, lines split
across chunks, keep-alive reuse, a server that drops idle connections, errors and refused extras."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from bench.load import LoadPlan, run_load
from bench.sse_client import Connection, Endpoint, HttpProtocolError, parse_head, read_all, read_lines, request_bytes


def _event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _chunk(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if text is None else {"content": text}
    return _event(
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    )


@dataclass
class LoopbackServer:
    """An HTTP/1.1 server on 127.0.0.1 streaming chat chunks like ours and llama-server do (chunked
    transfer encoding, one write per chunk), with the failure modes the client must survive."""

    reject_extras: bool = False
    fail_prompt: str | None = None
    close_after_each: bool = False  # "Connection: close" on every answer
    drop_idle_after: int | None = None  # close the connection, unannounced, after this many answers
    port: int = 0
    n_connections: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.n_connections += 1
        n_answers = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = json.loads(await reader.readexactly(length))
                self.bodies.append(body)
                await self._answer(body, writer)
                await writer.drain()
                n_answers += 1
                if self.close_after_each or (self.drop_idle_after and n_answers >= self.drop_idle_after):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def _answer(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        connection = b"Connection: close\r\n" if self.close_after_each else b""
        prompt = body["messages"][0]["content"]
        if (self.reject_extras and "ignore_eos" in body) or prompt == self.fail_prompt:
            status = b"422 Unprocessable Entity" if prompt != self.fail_prompt else b"500 Internal Server Error"
            error = json.dumps({"error": {"message": "no " + prompt}}).encode()
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n" + connection)
            writer.write(b"Content-Length: %d\r\n\r\n" % len(error) + error)
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n" + connection
        )
        writer.write(b"\r\n")
        n = body["max_tokens"]
        usage = {"prompt_tokens": 9, "completion_tokens": n, "prompt_tokens_details": {"cached_tokens": 4}}
        events = [_chunk(f" w{i}") for i in range(n)] + [_chunk(finish="length")]
        events += [_event({"choices": [], "usage": usage}), b"data: [DONE]\n\n"]
        stream = b"".join(events)
        # Chunk boundaries that cut lines (and "\r\n"-free SSE lines) anywhere: 7, 1, 40, 7, 1, 40 ... bytes.
        sizes = [7, 1, 40]
        offset = index = 0
        while offset < len(stream):
            piece = stream[offset : offset + sizes[index % 3]]
            writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            offset += len(piece)
            index += 1
            await asyncio.sleep(0)
        writer.write(b"0\r\n\r\n")


@asynccontextmanager
async def serving(server: LoopbackServer) -> AsyncIterator[LoopbackServer]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


def _plan(server: LoopbackServer, **overrides: Any) -> LoadPlan:
    values: dict[str, Any] = {
        "base_url": f"http://127.0.0.1:{server.port}/v1",
        "model": "tiny",
        "prompts": ("p0", "p1", "p2"),
        "max_tokens": 6,
        "concurrency_levels": (1, 3),
        "requests_per_level": (3, 9),
    }
    return LoadPlan(**{**values, **overrides})


def test_run_load_streams_over_keep_alive_connections() -> None:
    async def scenario() -> None:
        async with serving(LoopbackServer()) as server:
            edges: list[int] = []
            report = await run_load(
                _plan(server), "raw", show_progress=False, on_level_edge=lambda: edges.append(len(server.bodies))
            )
            assert edges == [1, 4, 4, 13]  # after the warm-up; around each level's requests, none outside
            for level in report.levels:
                assert (level.n_errors, level.n_short_outputs) == (0, 0)
                assert level.output_tokens == 6 * level.n_requests
                assert level.usage_reported and level.mean_computed_prompt_tokens == pytest.approx(5.0)
                assert level.client_cpu_s is not None and level.client_cpu_s > 0
                assert level.itl_p50_ms is not None
            assert report.settings.sent_ignore_eos
            assert server.bodies[0]["ignore_eos"] is True and server.bodies[0]["stream"] is True
            assert server.n_connections == 3  # one per client, reused across requests and levels

    asyncio.run(scenario())


def test_run_load_survives_dropped_and_closed_connections() -> None:
    async def scenario() -> None:
        for server in (LoopbackServer(drop_idle_after=2), LoopbackServer(close_after_each=True)):
            async with serving(server):
                report = await run_load(_plan(server, concurrency_levels=(2,), requests_per_level=(8,)), "raw", False)
                (level,) = report.levels
                assert (level.n_ok, level.output_tokens) == (8, 48)
                assert server.n_connections > 2  # the client noticed and reconnected

    asyncio.run(scenario())


def test_run_load_reports_http_errors_and_drops_refused_extras() -> None:
    async def scenario() -> None:
        async with serving(LoopbackServer(reject_extras=True, fail_prompt="p1")) as server:
            report = await run_load(_plan(server, concurrency_levels=(2,), requests_per_level=(6,)), "raw", False)
            assert not report.settings.sent_ignore_eos
            (level,) = report.levels
            assert (level.n_ok, level.n_errors) == (4, 2)
            assert level.error_samples[0].startswith("HTTP 500") and "no p1" in level.error_samples[0]

    asyncio.run(scenario())


def test_nothing_listening_is_a_failed_warm_up() -> None:
    from bench.load import LoadError

    async def scenario() -> None:
        async with serving(LoopbackServer()) as server:
            port = server.port
        with pytest.raises(LoadError, match="warm-up"):
            await run_load(_plan(LoopbackServer(port=port)), "raw", show_progress=False)

    asyncio.run(scenario())


def test_lines_are_reassembled_across_pieces() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"data: a", b"bc\n\nda", b"ta: x\r\n", b"\ntail"):
            yield piece

    seen: list[tuple[str, float]] = []

    async def scenario() -> None:
        times = iter(range(100))
        await read_lines(pieces(), lambda line, now: seen.append((line, now)) is not None, lambda: next(times))

    asyncio.run(scenario())
    assert seen == [("data: abc", 1), ("", 1), ("data: x", 2), ("", 3), ("tail", 4)]

    async def collect() -> bytes:
        return await read_all(pieces(), limit=10)

    assert asyncio.run(collect()) == b"data: abc\n"  # at most `limit` bytes of an error body


def test_heads_and_endpoints_are_parsed_strictly() -> None:
    head = parse_head([b"HTTP/1.1 200 OK", b"Content-Type: text/event-stream", b"transfer-encoding:  chunked"])
    assert head.status == 200 and head.headers["transfer-encoding"] == "chunked"
    with pytest.raises(HttpProtocolError):
        parse_head([b"SSH-2.0-OpenSSH"])
    with pytest.raises(HttpProtocolError):
        parse_head([b"HTTP/1.1 200 OK", b"no colon here"])
    assert Endpoint.from_base_url("http://127.0.0.1:8080/v1/") == Endpoint("127.0.0.1", 8080, "/v1")
    with pytest.raises(ValueError):
        Endpoint.from_base_url("https://127.0.0.1/v1")
    assert Connection(Endpoint("127.0.0.1", 1, "")).n_opened == 0


def test_an_api_key_goes_out_as_a_bearer_header_and_only_then() -> None:
    keyed = request_bytes(Endpoint.from_base_url("http://127.0.0.1:8080/v1", "sk-test"), "POST", "/x", b"{}", "*/*")
    assert b"\r\nAuthorization: Bearer sk-test\r\n" in keyed and keyed.endswith(b"\r\n\r\n{}")
    plain = request_bytes(Endpoint.from_base_url("http://127.0.0.1:8080/v1"), "POST", "/x", b"{}", "*/*")
    assert b"Authorization" not in plain and plain.endswith(b"\r\n\r\n{}")
