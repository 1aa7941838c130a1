"""Benchmarks: the event loop's work per streamed token, without the network — a TokenEvent turned into a
`chat.completion.chunk` and its SSE bytes (plain dicts + json.dumps), with and without logprobs."""

from __future__ import annotations

from typing import Any

import pytest

from bindings.protocol import TokenLogprob, TopLogprob
from server.api.responses import ChatChunks, ResponseHeader
from server.api.sse import sse_event
from server.engine.request import TokenEvent

HEADER = ResponseHeader("chatcmpl-0123456789abcdef01234567", 1_700_000_000, "smollm2-135m-instruct")


def token_event(with_logprobs: bool) -> TokenEvent:
    logprobs: tuple[TokenLogprob, ...] = ()
    if with_logprobs:
        top = tuple(TopLogprob(100 + i, f" w{i}".encode(), -1.0 - i) for i in range(5))
        logprobs = (TokenLogprob(42, b" word", -0.25, top),)
    return TokenEvent("chatcmpl-0123456789abcdef01234567", 0, " word", (42,), logprobs, None, 20, 0, 7)


@pytest.mark.parametrize("with_logprobs", [False, True], ids=["text", "logprobs5"])
def test_bench_sse_chunk_per_token(benchmark: Any, with_logprobs: bool) -> None:
    chunks = ChatChunks(HEADER, include_usage=False, want_logprobs=with_logprobs)
    event = token_event(with_logprobs)
    chunks.for_event(0, event)  # the role chunk goes out once; the benchmark measures the steady state

    def encode() -> list[bytes]:
        return [sse_event(chunk) for chunk in chunks.for_event(0, event)]

    encoded = benchmark(encode)
    assert len(encoded) == 1
    assert encoded[0].startswith(b'data: {"id":"chatcmpl-') and encoded[0].endswith(b"\n\n")
    assert b'"delta":{"content":" word"}' in encoded[0]
    assert (b'"top_logprobs":[{' in encoded[0]) == with_logprobs
