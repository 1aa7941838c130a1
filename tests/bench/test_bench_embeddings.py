"""bench.embeddings' pure parts: the texts, both servers' command lines (same model, threads, pooling, batch),
response decoding, the figures and their summary. Nothing here starts a server or loads a model."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from bench.compare import CompareError
from bench.embeddings import (
    LLAMA_SERVER,
    OURS,
    BenchSettings,
    _parse_args,
    bench_texts,
    decode_vectors,
    format_summary,
    inputs_per_s,
    llama_server_settings,
    max_batch_difference,
    mean_cosine,
    ours_command,
    settings_from_args,
    summarize,
    to_json,
)
from bench.llama_server import llama_server_command

SETTINGS = BenchSettings(
    model="smollm2-135m-instruct",
    model_path=Path("/models/smollm2.gguf"),
    threads=3,
    pooling="last",
    batch=256,
    n_texts=64,
    rounds=5,
    repeats=2,
    encoding_format="base64",
)


def test_the_texts_are_distinct_short_and_the_same_every_run() -> None:
    texts = bench_texts(64)
    assert len(set(texts)) == 64 and texts == bench_texts(64)
    assert all(0 < len(text.split()) <= 12 for text in texts)
    assert len(set(bench_texts(100))) == 100  # beyond the combinations, a number keeps them distinct


def flag(command: list[str] | tuple[str, ...], name: str) -> str:
    return command[command.index(name) + 1]


def test_both_servers_get_the_same_model_threads_pooling_and_batch() -> None:
    ours = ours_command(SETTINGS, 8123)
    assert "--embeddings" in ours and flag(ours, "--model") == "smollm2-135m-instruct"
    assert flag(ours, "--port") == "8123"
    assert flag(ours, "--pooling") == "last" and flag(ours, "--threads") == "3" == flag(ours, "--threads-batch")
    assert flag(ours, "--max-batch-tokens") == "256"
    theirs = llama_server_command(llama_server_settings(SETTINGS, Path("/bin/llama-server"), 9000, no_repack=True))
    assert "--embeddings" in theirs and "--kv-unified" in theirs and "--no-repack" in theirs
    assert flag(theirs, "--model") == "/models/smollm2.gguf"
    assert flag(theirs, "--pooling") == "last" and flag(theirs, "--threads") == "3" == flag(theirs, "--threads-batch")
    assert flag(theirs, "--batch-size") == "256" == flag(theirs, "--ubatch-size")
    assert flag(theirs, "--parallel") == "64"  # every text of a request can be in one decode, as in ours


def test_responses_decode_from_float_and_base64_in_index_order() -> None:
    first, second = np.array([0.6, 0.8], dtype="<f4"), np.array([1.0, 0.0], dtype="<f4")
    floats = {"data": [{"index": 1, "embedding": second.tolist()}, {"index": 0, "embedding": first.tolist()}]}
    encoded = {
        "data": [
            {"index": 0, "embedding": base64.b64encode(first.tobytes()).decode()},
            {"index": 1, "embedding": base64.b64encode(second.tobytes()).decode()},
        ]
    }
    for body in (floats, encoded):
        got = decode_vectors(body, 2)
        np.testing.assert_allclose(got[0], first, atol=1e-7)
        np.testing.assert_allclose(got[1], second, atol=1e-7)
    with pytest.raises(CompareError, match="expected 3 embeddings, got 2"):
        decode_vectors(floats, 3)


def test_vector_checks() -> None:
    a = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    b = [np.array([1.0, 0.01]), np.array([0.0, 1.0])]
    assert max_batch_difference(a, b) == pytest.approx(0.01)
    assert max_batch_difference(a, a) == 0.0
    assert mean_cosine(a, a) == pytest.approx(1.0)
    assert mean_cosine(a, [a[1], a[0]]) == pytest.approx(0.0)


def test_summary_is_medians_with_spread_and_same_round_ratios() -> None:
    samples = {"batch": {OURS: [10.0, 30.0, 20.0], LLAMA_SERVER: [5.0, 30.0, 40.0]}}
    row = summarize(samples)["batch"]
    assert row[OURS] is not None and (row[OURS].median, row[OURS].low, row[OURS].high) == (20.0, 10.0, 30.0)
    assert row["ratio"] is not None and row["ratio"].median == 1.0  # ratios 2, 1, 0.5
    assert (row["ratio"].low, row["ratio"].high) == (0.5, 2.0)
    text = format_summary(summarize(samples), 64)
    assert "batch×64" in text and "20.0 (10.0–30.0)" in text and "1.00 (0.50–2.00)" in text
    body = to_json(SETTINGS, samples, {"ours max |batched - alone|": 0.001}, {"cpu": "x"})
    assert body["summary"]["batch"]["ratio"]["median"] == 1.0
    assert body["settings"]["model_path"] == "/models/smollm2.gguf"
    assert inputs_per_s(64, 2.0) == 32.0 and inputs_per_s(64, 0.0) == 0.0


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(CompareError, match="--rounds"):
        settings_from_args(_parse_args(["--rounds", "0"]))
    with pytest.raises(CompareError, match="unknown model"):
        settings_from_args(_parse_args(["--model", "no-such-model"]))
    assert settings_from_args(_parse_args(["--pooling", "cls", "--texts", "8"])).n_texts == 8
