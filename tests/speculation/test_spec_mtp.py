"""`--spec-type mtp` end to end: the tiny qwen3next with an MTP head (convert/synth.py --mtp), loaded by the
server's own loader, gives token-for-token the greedy output of `--spec-type none` (one stream, and a mixed
batch with an opted-out slot, a stop string and max_tokens inside accepted runs), its drafts are sometimes
accepted, /metrics and /slots show them; a model without an MTP head is refused with one readable error."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bindings.protocol import BackendError, SamplingParams
from server.api.state import app_server_state
from server.app import create_app
from server.boot.loader import build_engine
from server.engine.engine import Engine
from server.engine.request import FinishReason, Request, TokenEvent
from server.engine.text_stream import TextStream
from server.settings import Settings
from tests.api.helpers import wait_for
from tests.speculation.test_spec_llama import (
    GREEDY,
    TINY_PROMPTS,
    generate,
    generate_all,
    run,
    text_of,
    tokenize,
    tokens_of,
)

pytestmark = pytest.mark.slow


def mtp_settings(model: Path, tmp_path: Path, spec_type: str, **extra: Any) -> Settings:
    """What `python -m server --model M --spec-type ...` would be given: f32 KV and no flash attention, so a
    token's logits do not depend on which tokens share its decode (the greedy comparison needs that)."""
    return Settings(
        model=[str(model)],
        spec_type=spec_type,
        parallel=4,
        ctx_size=512,
        max_batch_tokens=128,
        threads=1,  # on a busy 2-core machine two spinning ggml threads wait on each other for whole time slices
        kv_type="f32",
        flash_attn="off",
        extra_bufts="off",
        draft_max=6,
        draft_min=1,
        spec_max_step_tokens=64,
        spec_max_break_even=1.0,  # draft in the mixed batches whatever a verification costs the tiny model
        prompt_cache_mib=16,
        stream_interval_ms=0,  # one event per step: an event of one token shows a step without a draft
        cache_dir=tmp_path / "cache",
        data_dir=tmp_path / "data",
        **extra,
    )


def engine_for(model: Path, tmp_path: Path, spec_type: str) -> Engine:
    return build_engine(mtp_settings(model, tmp_path, spec_type))


def mixed(params: list[SamplingParams]) -> Any:
    """The four tiny prompts (a long one prefilled beside the decoding slots); the second one opts out."""

    def make(engine: Engine) -> list[Request]:
        return [
            Request(tokenize(engine, prompt), replace(p, speculative=i != 1))
            for i, (prompt, p) in enumerate(zip(TINY_PROMPTS, params, strict=True))
        ]

    return make


def test_the_mtp_drafter_loads_on_the_served_model(tiny_qwen3next_mtp_gguf: Path, tmp_path: Path) -> None:
    engine = engine_for(tiny_qwen3next_mtp_gguf, tmp_path, "mtp")
    try:
        assert engine.stats().spec_type == "mtp"
        assert engine.load_report is not None and engine.load_report["speculation"]["spec_type"] == "mtp"
    finally:
        engine.stop()


def test_a_single_stream_is_identical_with_mtp(tiny_qwen3next_mtp_gguf: Path, tmp_path: Path) -> None:
    params = replace(GREEDY, max_tokens=48)

    def one(engine: Engine) -> list[Request]:
        return [Request(tokenize(engine, TINY_PROMPTS[2]), params)]

    plain, plain_stats = generate_all(engine_for(tiny_qwen3next_mtp_gguf, tmp_path, "none"), one)
    spec, stats = generate_all(engine_for(tiny_qwen3next_mtp_gguf, tmp_path, "mtp"), one)
    assert plain_stats.n_draft_tokens == 0
    assert tokens_of(spec[0]) == tokens_of(plain[0]) and text_of(spec[0]) == text_of(plain[0])
    assert stats.spec_type == "mtp" and 0 < stats.n_draft_accepted <= stats.n_draft_tokens, stats
    assert any(len(event.token_ids) > 1 for event in spec[0]), "an accepted draft emits several tokens at once"


def test_a_mixed_batch_is_identical_with_mtp(tiny_qwen3next_mtp_gguf: Path, tmp_path: Path) -> None:
    plain, _ = generate_all(engine_for(tiny_qwen3next_mtp_gguf, tmp_path, "none"), mixed([GREEDY] * 4))
    spec, stats = generate_all(engine_for(tiny_qwen3next_mtp_gguf, tmp_path, "mtp"), mixed([GREEDY] * 4))
    assert [tokens_of(events) for events in spec] == [tokens_of(events) for events in plain]
    assert stats.n_draft_accepted > 0, stats
    # Partial acceptances happened: the qwen3next rollback and re-decode ran (and the head observed them).
    assert stats.n_draft_accepted < stats.n_draft_tokens, stats
    assert all(len(event.token_ids) == 1 for event in spec[1]), "the opted-out slot got no drafts"


def test_stop_strings_and_max_tokens_inside_accepted_mtp_runs(tiny_qwen3next_mtp_gguf: Path, tmp_path: Path) -> None:
    """The stop string and max_tokens are placed where the MTP run emitted several tokens from one decode: the
    stop at a token that is not its run's last (the rest of the run must be dropped), max_tokens at a run's end
    (the draft is then bounded by it)."""
    first, _ = generate_all(engine_for(tiny_qwen3next_mtp_gguf, tmp_path, "mtp"), mixed([GREEDY] * 4))
    probe = engine_for(tiny_qwen3next_mtp_gguf, tmp_path, "none")
    try:
        stop = stop_inside_a_run(probe, first[0])
    finally:
        probe.stop()
    cut = end_of_a_run(first[2])
    params = [replace(GREEDY, stop=(stop,)), GREEDY, replace(GREEDY, max_tokens=cut), GREEDY]
    plain, _ = generate_all(engine_for(tiny_qwen3next_mtp_gguf, tmp_path, "none"), mixed(params))
    spec, stats = generate_all(engine_for(tiny_qwen3next_mtp_gguf, tmp_path, "mtp"), mixed(params))
    assert [tokens_of(events) for events in spec] == [tokens_of(events) for events in plain]
    assert [text_of(events) for events in spec] == [text_of(events) for events in plain]
    assert spec[0][-1].finish_reason is FinishReason.STOP and stop not in text_of(spec[0])
    assert len(tokens_of(spec[2])) == cut and spec[2][-1].finish_reason is FinishReason.LENGTH
    assert stats.n_draft_accepted > 0


def test_reused_prompts_are_identical_with_mtp(tiny_qwen3next_mtp_gguf: Path, tmp_path: Path) -> None:
    """A conversation whose turns extend the previous turn's prompt and answer, with another prompt between
    them that takes its slot: the turn comes back from the prompt cache (stash, then load), which the head
    follows (MtpDrafter.follow); the output is still the plain output."""
    params = replace(GREEDY, max_tokens=16)

    def conversation(spec_type: str) -> tuple[list[list[int]], Any]:
        engine = engine_for(tiny_qwen3next_mtp_gguf, tmp_path, spec_type)

        async def body() -> tuple[list[list[int]], Any]:
            outputs: list[list[int]] = []
            history = list(tokenize(engine, TINY_PROMPTS[3]))
            for turn in range(3):
                answer = tokens_of(await generate(engine, Request(tuple(history), params)))
                other = tokens_of(await generate(engine, Request(tokenize(engine, TINY_PROMPTS[turn]), params)))
                outputs += [answer, other]
                history += [*answer, *tokenize(engine, " and then")]
            return outputs, engine.stats()

        return run(engine, body)

    plain, _ = conversation("none")
    spec, stats = conversation("mtp")
    assert spec == plain
    assert stats.n_prompt_cache_hits > 0 and stats.n_prompt_tokens_cached > 0, stats
    assert stats.n_draft_accepted > 0, stats


def runs_of(events: list[TokenEvent]) -> list[range]:
    """The output indices of each event that emitted several tokens (an accepted draft and what followed)."""
    runs, emitted = [], 0
    for event in events:
        if len(event.token_ids) > 1:
            runs.append(range(emitted, emitted + len(event.token_ids)))
        emitted += len(event.token_ids)
    if not runs:
        pytest.fail("no draft was accepted in the MTP output")
    return runs


def end_of_a_run(events: list[TokenEvent]) -> int:
    """A max_tokens that ends the output with the first multi-token run."""
    return runs_of(events)[0].stop


def stop_inside_a_run(engine: Engine, events: list[TokenEvent]) -> str:
    """A two-character stop string of the output that plain decoding detects at a token of an accepted MTP run
    other than the run's last (so the tokens after it in the run must be dropped)."""
    tokens, text = tokens_of(events), text_of(events)
    inside = {index for run in runs_of(events) for index in run[:-1]}
    for start in range(len(text) - 1):
        stop = text[start : start + 2]
        if "\ufffd" in stop or not stop.strip() or text.find(stop) != start:
            continue
        stream = TextStream((stop,))
        stopped_at = next(
            (i for i, token in enumerate(tokens) if (stream.push(engine.vocab.piece(token)), stream.stopped)[1]), None
        )
        if stopped_at in inside:
            return stop
    pytest.fail(f"no stop string lands inside an accepted run of {text!r}")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_metrics_and_slots_show_mtp_drafts(tiny_qwen3next_mtp_gguf: Path, tmp_path: Path) -> None:
    settings = mtp_settings(tiny_qwen3next_mtp_gguf, tmp_path, "mtp", served_model_name="tiny-mtp")
    engine = build_engine(settings)
    app = create_app(settings, engine_factory=lambda: engine)
    async with app.router.lifespan_context(app):
        await wait_for(lambda: app_server_state(app).status != "loading")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            body = {"prompt": TINY_PROMPTS[2], "max_tokens": 48, "temperature": 0}
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            metrics = {
                family.name: family.samples[0].value
                for family in text_string_to_metric_families((await client.get("/metrics")).text)
                if family.name.startswith("qwen3_local_spec_") and family.samples
            }
            slots = (await client.get("/slots")).json()
    assert metrics["qwen3_local_spec_draft_tokens"] > 0 and metrics["qwen3_local_spec_accepted_tokens"] > 0
    assert 0 < metrics["qwen3_local_spec_acceptance_rate"] <= 1
    busy = [slot for slot in slots if slot["n_drafted"] > 0]
    assert len(busy) == 1 and 0 < busy[0]["n_accepted"] <= busy[0]["n_drafted"], slots
    assert 0 < busy[0]["acceptance"] <= 1


@pytest.mark.parametrize("fixture", ["tiny_qwen3next_gguf", "tiny_llama_gguf"])
def test_a_model_without_an_mtp_head_is_refused(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = Path(request.getfixturevalue(fixture))
    with pytest.raises(BackendError, match="no multi-token-prediction") as refused:
        engine_for(model, tmp_path, "mtp")
    message = str(refused.value)
    assert str(model) in message and "--spec-type mtp" in message and "\n" not in message
