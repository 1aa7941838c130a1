"""Fault injection against the real `python -m server` and SmolLM2: a client that resets its connection
mid-stream, a client that stops reading a long stream, and a burst of requests beyond the queue limit.
Every case must end with the server healthy and every other request's output intact (temperature 0: each
equals its solo answer)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    CHAT_PROMPTS,
    N_SLOTS,
    CacheHome,
    LiveServer,
    start_server,
    stop_server,
    stream_chat,
)

MODEL = "smollm2-135m-instruct"
LONG_PROMPT = "Tell me a very long story about dragons."
PROMPTS = CHAT_PROMPTS[:12]
MIB = 2**20
# Waits below are liveness bounds (fail instead of hanging), not speed requirements.
LIVENESS_S = 300.0


class RawStream:
    """A streaming chat request over a bare socket, so the test decides how fast (and whether) it reads and
    how it hangs up. Parses HTTP/1.1 chunked transfer and SSE events by hand."""

    def __init__(self, server: LiveServer, payload: dict[str, Any], receive_buffer: int | None = None) -> None:
        port = int(server.base_url.rsplit(":", 1)[1])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # set before connect: it caps the TCP window the server may fill
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(LIVENESS_S)
        self.sock.connect(("127.0.0.1", port))
        self.local_port = int(self.sock.getsockname()[1])
        self.server_port = port
        body = json.dumps(payload).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)
        self._file = self.sock.makefile("rb")
        status = self._file.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        headers = {}
        while (line := self._file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers.get("transfer-encoding") == "chunked", headers
        self._buffer = b""

    def next_event(self) -> dict[str, Any]:
        """The next `data:` JSON event (keep-alive comments skipped)."""
        while True:
            end = self._buffer.find(b"\n\n")
            if end >= 0:
                event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                if event.startswith(b"data: "):
                    parsed: dict[str, Any] = json.loads(event[len(b"data: ") :])
                    return parsed
                continue
            size = int(self._file.readline().strip(), 16)
            assert size > 0, "the stream ended"
            self._buffer += self._file.read(size)
            self._file.readline()

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a crashed client or a middlebox would."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._file.close()
        self.sock.close()


def chat(server: LiveServer, prompt: str, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=LIVENESS_S)
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens
    )
    return answer.choices[0].message.content or ""


async def stream_answer(server: LiveServer, prompt: str, max_tokens: int) -> tuple[str, int]:
    """A streamed answer at temperature 0 and its completion_tokens."""
    client = openai.AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=LIVENESS_S)
    text, _, n_tokens = await stream_chat(client, prompt, max_tokens)
    return text, n_tokens


def slots(server: LiveServer) -> list[dict[str, Any]]:
    response = httpx.get(server.base_url + "/slots", timeout=30)
    assert response.status_code == 200
    body: list[dict[str, Any]] = response.json()
    return body


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = LIVENESS_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s:g} s"
        time.sleep(0.05)


def all_idle(server: LiveServer) -> bool:
    return all(slot["state"] == "idle" for slot in slots(server))


def holds(server: LiveServer, request_id: str) -> list[dict[str, Any]]:
    return [slot for slot in slots(server) if slot["request_id"] == request_id]


def generated_tokens(server: LiveServer) -> int:
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qwen3_local_generated_tokens_total":
                return int(sample.value)
    raise AssertionError("no qwen3_local_generated_tokens_total in /metrics")


def long_stream_payload(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        **extra,
    }


def test_client_reset_mid_stream_frees_its_slot_and_spares_the_other_streams(smollm2_server: LiveServer) -> None:
    server = smollm2_server
    wait_until(lambda: all_idle(server), "slots idle before the test")
    max_tokens = 900  # far more than it can generate between the reset and its cancellation
    prompts = PROMPTS[:4]
    solo = [chat(server, prompt, 48) for prompt in prompts]
    before = generated_tokens(server)

    async def scenario() -> tuple[str, list[tuple[str, int]]]:
        others = [asyncio.create_task(stream_answer(server, prompt, 48)) for prompt in prompts]
        raw = await asyncio.to_thread(RawStream, server, long_stream_payload(max_tokens))
        events = [await asyncio.to_thread(raw.next_event) for _ in range(3)]
        assert holds(server, events[0]["id"]), "the stream being reset holds a slot"
        raw.reset()
        return events[0]["id"], list(await asyncio.gather(*others))

    request_id, results = asyncio.run(scenario())
    assert [text for text, _ in results] == solo
    wait_until(lambda: not holds(server, request_id), "the reset stream's slot is freed")
    # The server counts every generated token; the other streams' usage says how many were theirs.
    n_reset_stream_tokens = generated_tokens(server) - before - sum(n for _, n in results)
    assert 3 <= n_reset_stream_tokens < max_tokens // 4, n_reset_stream_tokens
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert chat(server, PROMPTS[3], 8)
    assert server.process.poll() is None


def kernel_send_queue(local_port: int, remote_port: int) -> int:
    """Bytes written to the loopback TCP socket local_port → remote_port and not yet acknowledged by the
    peer: tx_queue in /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == local_port and int(fields[2].split(":")[1], 16) == remote_port:
            return int(fields[4].split(":")[0], 16)
    raise AssertionError(f"no TCP socket 127.0.0.1:{local_port} → :{remote_port}")


def test_slow_reader_keeps_memory_bounded_and_does_not_hold_up_others(smollm2_server: LiveServer) -> None:
    server = smollm2_server
    wait_until(lambda: all_idle(server), "slots idle before the test")
    n_choices, max_tokens = 8, 800
    # Eight 800-token choices with 20 top logprobs per token are ~12 MB of SSE: more than the 4 MiB a Linux
    # socket's send buffer may grow to, so the server itself ends up holding what the client does not read.
    payload = long_stream_payload(max_tokens, n=n_choices, logprobs=True, top_logprobs=20)
    prompts = PROMPTS[4:12]
    assert n_choices + len(prompts) <= N_SLOTS
    solo = [chat(server, prompt, 48) for prompt in prompts]
    process = psutil.Process(server.process.pid)
    baseline_rss = process.memory_info().rss
    before = generated_tokens(server)
    peak_rss = baseline_rss
    sampling = True

    def sample_rss() -> None:
        nonlocal peak_rss
        while sampling:
            peak_rss = max(peak_rss, process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    slow = RawStream(server, payload, receive_buffer=4096)
    first_events = [slow.next_event() for _ in range(3)]  # from now on it reads nothing
    request_id = first_events[0]["id"]

    def generated_by_slow() -> int:
        return sum(slot["n_generated_tokens"] for slot in holds(server, request_id))

    async def others() -> list[tuple[str, int]]:
        return list(await asyncio.gather(*(stream_answer(server, prompt, 48) for prompt in prompts)))

    results = asyncio.run(others())  # while the slow client's six slots keep generating
    assert [text for text, _ in results] == solo

    plateau = {"bytes": -1, "n_generated": 0}

    def server_holds_unsent_output() -> bool:
        n_generated = generated_by_slow()
        assert n_generated < n_choices * max_tokens - 300, "the slow stream nearly finished before its socket filled"
        in_kernel = kernel_send_queue(slow.server_port, slow.local_port)
        if in_kernel != plateau["bytes"]:
            plateau.update(bytes=in_kernel, n_generated=n_generated)
            return False
        # The socket took nothing more while the engine generated this many tokens: they are in the server.
        return n_generated - plateau["n_generated"] >= 256

    # The engine goes on generating for a client that reads nothing (it never waits for a socket) after the
    # socket's send buffer is full: from then on the server process itself buffers the unread output.
    wait_until(server_holds_unsent_output, "the slow client's socket full while its request kept generating")
    slow.reset()
    wait_until(lambda: not holds(server, request_id), "the slow client's slots are freed")
    sampling = False
    sampler.join()
    assert peak_rss - baseline_rss < 64 * MIB, f"RSS grew by {(peak_rss - baseline_rss) / MIB:.1f} MiB"
    n_slow_tokens = generated_tokens(server) - before - sum(n for _, n in results)
    assert n_slow_tokens < n_choices * max_tokens  # freed by the reset, not by running to the end
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert chat(server, prompts[0], 48) == solo[0]


def test_burst_over_the_queue_limit_is_refused_with_429_and_spares_the_accepted(
    tmp_path: Path, live_cache_home: CacheHome
) -> None:
    n_slots, max_queue = 2, 2
    limits = ["--parallel", str(n_slots), "--max-queue", str(max_queue)]
    server = start_server(
        ["--model", MODEL, *limits, "--ctx-size", "512", "--threads", "2"], tmp_path / "server.log", live_cache_home
    )
    try:
        max_tokens = 64
        solo = [chat(server, prompt, max_tokens) for prompt in PROMPTS]

        async def burst() -> tuple[list[httpx.Response], list[int]]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=LIVENESS_S) as http:

                async def one(index: int) -> httpx.Response:
                    body = {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": PROMPTS[index]}],
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "stream": index % 2 == 1,  # refusals must be plain HTTP errors for streams too
                    }
                    return await http.post("/v1/chat/completions", json=body)

                requests = [asyncio.create_task(one(index)) for index in range(len(PROMPTS))]
                health = []
                while not all(request.done() for request in requests):
                    health.append((await http.get("/health")).status_code)
                    await asyncio.sleep(0.05)
                return [await request for request in requests], health

        responses, health = asyncio.run(burst())
        assert set(health) == {200}
        statuses = [response.status_code for response in responses]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(429) >= 1, "a burst of 12 into 2 slots + 2 queue places must be refused in part"
        assert statuses.count(200) >= n_slots + max_queue, statuses
        for index, response in enumerate(responses):
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
            elif index % 2:
                events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                chunks = [json.loads(event) for event in events[:-1]]
                assert not any("error" in chunk for chunk in chunks)
                text = "".join(choice["delta"].get("content") or "" for c in chunks for choice in c["choices"])
                assert text == solo[index]
            else:
                assert response.json()["choices"][0]["message"]["content"] == solo[index]
        # the refused requests left nothing behind: the server is idle and answers them now
        wait_until(lambda: all_idle(server), "slots idle after the burst")
        for index, status in enumerate(statuses):
            if status == 429:
                assert chat(server, PROMPTS[index], max_tokens) == solo[index]
        assert httpx.get(server.base_url + "/health").status_code == 200
    finally:
        stop_server(server)
