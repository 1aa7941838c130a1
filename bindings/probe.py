"""The child side of the extra-buffer-type probe (server/boot/bufts_probe.py runs it in a subprocess).

    python -m bindings.probe --model q4_0=/tmp/probe-q4_0.gguf --model f16=/tmp/probe-f16.gguf

Each model is decoded with extra buffer types on (weight repacking, AMX) and every layer on the CPU: two
sequences in one batch, then each alone. The last stdout line is a JSON report of the largest logit
difference per model; the parent judges it. A crash (the AMX bug) kills this process, never the server.
The parent writes the tiny models (convert.synth), so this package stays free of project imports.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bindings.llama_backend import LlamaBackend, LlamaBackendConfig, llama_system_info
from bindings.protocol import BackendError, BatchEntry, CacheOp

PROBE_PROMPTS: tuple[str, str] = (
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
    "Once upon a time there was a king who had three daughters and a golden ball.",
)
PROBE_STEPS = 4  # single-token decode steps after the prompts


def probe_extra_bufts(models: Sequence[tuple[str, Path]]) -> dict[str, Any]:
    """Decode each (label, model path) with extra buffer types on: two sequences in one batch vs each alone.

    Returns the JSON-able report the parent judges: per model, the largest |logit difference|.
    """
    started = time.monotonic()
    reports = [{"dtype": label, **_probe_model(path)} for label, path in models]
    return {
        "models": reports,
        "system_info": llama_system_info(),
        "seconds": round(time.monotonic() - started, 3),
    }


def _probe_model(model_path: Path) -> dict[str, Any]:
    # n_gpu_layers=0: every weight in the CPU buffers the routed experts will use on a GPU build too.
    # With layers on a GPU, a CUDA build would test CUDA's kernels and pass on a CPU whose AMX path crashes.
    config = LlamaBackendConfig(
        n_slots=2, n_ctx_per_slot=256, n_batch=128, n_ubatch=128, use_extra_bufts=True, n_gpu_layers=0
    )
    backend = LlamaBackend(model_path, config, name=model_path.stem)
    weight_buffers = sorted(backend.memory_report().model_bytes)
    try:
        prompts = [backend.tokenize(text, add_special=True, parse_special=False) for text in PROBE_PROMPTS]
        batched, continuations = decode_steps(backend, prompts, slots=(0, 1), continuations=None)
        alone: list[list[npt.NDArray[np.float32]]] = []
        for slot in (0, 1):
            backend.apply([CacheOp("clear", slot=0), CacheOp("clear", slot=1)])
            logits, _ = decode_steps(backend, [prompts[slot]], slots=(slot,), continuations=[continuations[slot]])
            alone.append(logits[0])
    finally:
        backend.close()
    differences = [
        float(np.max(np.abs(batched_step - alone_step)))
        for slot in (0, 1)
        for batched_step, alone_step in zip(batched[slot], alone[slot], strict=True)
    ]
    all_logits = [step for per_slot in batched + alone for step in per_slot]
    return {
        "max_abs_diff": max(differences),
        "max_abs_logit": max(float(np.max(np.abs(step))) for step in all_logits),
        "finite": all(bool(np.isfinite(step).all()) for step in all_logits),
        "n_compared": len(differences),
        "weight_buffers": weight_buffers,  # where llama.cpp put the weights (CPU_REPACK, AMX, CPU_Mapped, ...)
    }


def decode_steps(
    backend: LlamaBackend,
    prompts: Sequence[Sequence[int]],
    *,
    slots: Sequence[int],
    continuations: Sequence[Sequence[int]] | None,
    n_steps: int = PROBE_STEPS,
) -> tuple[list[list[npt.NDArray[np.float32]]], list[list[int]]]:
    """Prefill each prompt in its slot (one batch), then n_steps one-token steps (one batch each); the logits
    after every decode, per slot, and the tokens fed.

    The tokens fed in the steps are the argmax of the previous logits, or `continuations` when given,
    so that a single-sequence rerun feeds exactly what the batched run fed.
    """
    logits: list[list[npt.NDArray[np.float32]]] = [[] for _ in slots]
    fed: list[list[int]] = [[] for _ in slots]
    entries = [BatchEntry(slot, tuple(prompt), 0, True) for slot, prompt in zip(slots, prompts, strict=True)]
    for step in range(n_steps + 1):
        backend.decode(entries)
        index = -1
        next_entries = []
        for position, entry in enumerate(entries):
            index += len(entry.tokens)
            logits[position].append(backend.logits(index))
            if step == n_steps:
                continue
            token = continuations[position][step] if continuations else int(np.argmax(logits[position][-1]))
            fed[position].append(token)
            next_entries.append(BatchEntry(entry.slot, (token,), entry.start_pos + len(entry.tokens), True))
        entries = next_entries
    return logits, fed


def _model_argument(value: str) -> tuple[str, Path]:
    label, sep, path = value.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {value!r}")
    return label, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bindings.probe", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        type=_model_argument,
        required=True,
        metavar="LABEL=PATH",
        help="a tiny GGUF to decode with extra buffer types on (repeatable)",
    )
    args = parser.parse_args(argv)
    # A crash is an expected outcome of the probe; leave no core file behind.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        report = probe_extra_bufts(args.models)
    except BackendError as exc:
        print(f"probe failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
