"""Two models in one server against one model alone: does serving two cost throughput?

    python -m bench.multi_model                                   # SmolLM2 under two ids, 8 streams each vs 16
    python -m bench.multi_model --streams 2 --max-tokens 4 --requests-per-stream 1 --rounds 1   # a smoke run

Each round runs the first two servers one after the other, in alternating order from round to round
(the third runs once at the end) (`python -m server`, each on a free loopback port, on this machine's
cores; the two-model server splits them between its engines, one model alone takes them all):

1. two models (the same GGUF under the ids `first` and `second`, both preloaded, `--streams` slots each):
   `--streams` closed-loop streaming clients per model, both models at once; the aggregate output tok/s is
   the sum of both models' (each over the same wall time: both run together);
2. one model alone with 2 × `--streams` slots and 2 × `--streams` clients.
Both runs send the same requests: the first model gets the prompts of --prompts, the second the same prompts
in a second wording (SECOND_WORDING), the single model both lists, so that neither run repeats a prompt the
other does not (a repeat is served from the prompt cache);
3. load on demand: a server whose default model is not preloaded (another one is, so /health is 200); the
   time from the first request to the default model until its answer (it loads the model) against the same
   request once loaded.

It prints the ratio aggregate(1) / alone(2) (the issue's yardstick: at least 0.9) and the load-on-demand
latency, and writes them to --json. Measure on a quiet machine (bench.compare's caveats hold)."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.compare import HOST, free_port
from bench.load import DEFAULT_PROMPTS_PATH, LoadPlan, load_prompts, run_load
from bench.process import ServerSpec, run_server
from bench.stats import LoadReport

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class MultiSettings:
    model: str = DEFAULT_MODEL
    streams: int = 8  # per model in the two-model run; the single model gets twice as many
    max_tokens: int = 64
    requests_per_stream: int = 4
    ctx_size: int = 1024
    prompts: Path = DEFAULT_PROMPTS_PATH


def serve_config(settings: MultiSettings, *, preload_first: bool = True) -> dict[str, Any]:
    """The two-model server's config file: the model under two ids, `streams` slots each."""
    common = {"model": settings.model, "parallel": settings.streams, "ctx_size": settings.ctx_size}
    return {
        "serve": [
            {**common, "id": "first", "preload": preload_first, "keep_alive": -1},
            {**common, "id": "second", "preload": True, "keep_alive": -1},
        ]
    }


def server_spec(name: str, arguments: Sequence[str]) -> ServerSpec:
    port = free_port()
    return ServerSpec(
        name=name,
        command=(sys.executable, "-m", "server", "--host", HOST, "--port", str(port), *arguments),
        base_url=f"http://{HOST}:{port}/v1",
        health_url=f"http://{HOST}:{port}/health",
    )


# Each prompt in a second wording: both runs then send the same set of distinct requests, the single model all
# of them, each of the two models one wording. Cycling one list instead gave the single model (twice the
# requests) a second pass over the prompts that its prompt cache served, which neither of the two models got:
# it computed half the prompt tokens per output token.
SECOND_WORDING = "Please answer the following. "


def request_prompts(settings: MultiSettings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the first model's prompts, the second's); the single model gets both."""
    first = tuple(load_prompts(settings.prompts))
    return first, tuple(SECOND_WORDING + prompt for prompt in first)


def load_plan(settings: MultiSettings, base_url: str, model: str, streams: int, prompts: Sequence[str]) -> LoadPlan:
    return LoadPlan(
        base_url=base_url,
        model=model,
        prompts=tuple(prompts),
        max_tokens=settings.max_tokens,
        concurrency_levels=(streams,),
        requests_per_level=(streams * settings.requests_per_stream,),
    )


def tokens_per_s(report: LoadReport) -> float:
    return report.levels[0].output_tokens_per_s


async def wait_until_loaded(base_url: str, model_ids: Sequence[str], timeout_s: float = 300) -> None:
    """/health is 200 once one model serves; the load must wait for every preloaded model."""
    deadline = time.perf_counter() + timeout_s
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        while True:
            cards = (await client.get(f"{base_url}/models")).json()["data"]
            if all(card["state"] == "loaded" for card in cards if card["id"] in model_ids):
                return
            if time.perf_counter() > deadline:
                raise TimeoutError(f"models {', '.join(model_ids)} not loaded after {timeout_s:.0f} s: {cards}")
            await asyncio.sleep(0.2)


async def two_models(settings: MultiSettings, base_url: str) -> tuple[float, list[LoadReport]]:
    """Both models' loads at once; the aggregate is both models' output tokens over the wall time until the last
    one finished (not the sum of each one's own rate, which would credit a model that finished early)."""
    await wait_until_loaded(base_url, ("first", "second"))
    plans = [
        load_plan(settings, base_url, model, settings.streams, prompts)
        for model, prompts in zip(("first", "second"), request_prompts(settings), strict=True)
    ]
    started = time.perf_counter()
    reports = await asyncio.gather(*(run_load(plan, plan.model, show_progress=False) for plan in plans))
    wall_s = time.perf_counter() - started
    return sum(report.levels[0].output_tokens for report in reports) / wall_s, list(reports)


async def timed_request(base_url: str, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        started = time.perf_counter()
        response = await client.post(f"{base_url}/chat/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - started


async def load_on_demand(base_url: str) -> dict[str, float]:
    cold = await timed_request(base_url, "first")
    warm = await timed_request(base_url, "first")
    return {"first_request_s": cold, "loaded_request_s": warm, "load_s": cold - warm}


def one_round(settings: MultiSettings, work_dir: Path, round_index: int) -> dict[str, Any]:
    """One round: the two-model server and the one-model server, in alternating order from round to round."""
    both_config = work_dir / "two-models.yaml"
    both_config.write_text(yaml.safe_dump(serve_config(settings)))
    alone_arguments = ["--model", settings.model, "--parallel", str(2 * settings.streams)]
    result: dict[str, Any] = {}

    def both() -> None:
        with run_server(server_spec("two-models", ["--config", str(both_config)]), work_dir) as server:
            aggregate, reports = asyncio.run(two_models(settings, server.spec.base_url))
        result["two_models_tokens_per_s"] = {report.label: tokens_per_s(report) for report in reports}
        result["two_models_aggregate_tokens_per_s"] = aggregate

    def alone() -> None:
        spec = server_spec("one-model", [*alone_arguments, "--ctx-size", str(settings.ctx_size)])
        with run_server(spec, work_dir) as server:
            first, second = request_prompts(settings)
            plan = load_plan(settings, server.spec.base_url, settings.model, 2 * settings.streams, first + second)
            result["one_model_tokens_per_s"] = tokens_per_s(asyncio.run(run_load(plan, "alone", show_progress=False)))

    for step in (both, alone) if round_index % 2 == 0 else (alone, both):
        step()
    result["ratio"] = result["two_models_aggregate_tokens_per_s"] / result["one_model_tokens_per_s"]
    return result


def run(settings: MultiSettings, work_dir: Path, rounds: int = 1) -> dict[str, Any]:
    results = [one_round(settings, work_dir, index) for index in range(rounds)]
    lazy_config = work_dir / "lazy.yaml"
    lazy_config.write_text(yaml.safe_dump(serve_config(settings, preload_first=False)))
    with run_server(server_spec("on-demand", ["--config", str(lazy_config)]), work_dir) as server:
        latency = asyncio.run(load_on_demand(server.spec.base_url))
    ratios = [result["ratio"] for result in results]
    return {
        "settings": {key: str(value) for key, value in vars(settings).items()},
        "rounds": results,
        "two_models_aggregate_tokens_per_s": statistics.median(r["two_models_aggregate_tokens_per_s"] for r in results),
        "one_model_tokens_per_s": statistics.median(r["one_model_tokens_per_s"] for r in results),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "load_on_demand": latency,
    }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.multi_model", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="models.yaml name or .gguf path")
    parser.add_argument("--streams", type=int, default=8, help="streams per model (the single model: twice)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--ctx-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the two servers' order alternating")
    parser.add_argument("--json", type=Path, help="write the result here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    settings = MultiSettings(args.model, args.streams, args.max_tokens, args.requests_per_stream, args.ctx_size)
    with tempfile.TemporaryDirectory(prefix="multi-model-") as work_dir:
        result = run(settings, Path(work_dir), args.rounds)
    latency = result["load_on_demand"]
    print(
        f"two models × {settings.streams} streams: {result['two_models_aggregate_tokens_per_s']:.1f} tok/s; one "
        f"model × {2 * settings.streams}: {result['one_model_tokens_per_s']:.1f} tok/s (medians of {args.rounds} "
        f"alternating rounds); ratio {result['ratio']:.3f} (min {result['ratio_min']:.3f}, max "
        f"{result['ratio_max']:.3f})\n"
        f"load on demand (default model): first request {latency['first_request_s']:.2f} s, loaded "
        f"{latency['loaded_request_s']:.3f} s"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
