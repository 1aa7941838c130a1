"""`python -m convert {pull,gguf,quantize,synth,inspect}`: get a GGUF, one readable line on any failure.

Every expected failure (bad input, missing file, network, corrupt download, unsupported checkpoint) is
printed as a single `error: ...` line on stderr with exit status 1; argparse's usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from registry.models import DEFAULT_REGISTRY_PATH, RegistryError, load_registry


class CliError(Exception):
    """A failure to report as one line."""


def _cmd_pull(args: argparse.Namespace) -> None:
    from convert.pull import pull_model

    registry = load_registry(args.registry)
    path = pull_model(args.name, args.quant, registry=registry)
    print(path)


def _cmd_gguf(args: argparse.Namespace) -> None:
    from convert.hf_to_gguf import convert_checkpoint

    summary = convert_checkpoint(args.hf_dir, args.out, out_type=args.outtype, mtp=not args.no_mtp)
    mtp = f", MTP layers {summary.n_mtp_layers}" if summary.n_mtp_layers else ""
    print(
        f"wrote {args.out}: {summary.architecture}, {summary.n_tensors} tensors, "
        f"{summary.n_bytes / 1e6:.1f} MB, vocab {summary.n_vocab}, pre-tokenizer {summary.tokenizer_pre}{mtp}"
    )


def _cmd_quantize(args: argparse.Namespace) -> None:
    from convert.quantize import quantize_gguf

    budget = int(args.gpu_budget_gib * (1 << 30))
    report = quantize_gguf(
        args.src, args.dst, args.type, recipe=args.recipe, n_threads=args.threads, gpu_budget_bytes=budget
    )
    print(report.render())


def _cmd_synth(args: argparse.Namespace) -> None:
    from convert.synth import write_synthetic_model

    out = write_synthetic_model(
        args.arch, args.out, dtype=args.dtype, seed=args.seed, n_layers=args.layers, mtp=args.mtp
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from convert.inspect import inspect_gguf

    print(inspect_gguf(args.file).render(max_metadata_chars=args.width))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    pull = commands.add_parser("pull", help="download a models.yaml model from the Hugging Face hub")
    pull.add_argument("name", help="model name in models.yaml")
    pull.add_argument("--quant", default=None, help="quantization (default: the model's default_quant)")
    pull.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY_PATH, help="models.yaml to read")
    pull.set_defaults(run=_cmd_pull)

    gguf = commands.add_parser("gguf", help="convert a Hugging Face checkpoint directory to GGUF")
    gguf.add_argument("hf_dir", type=Path, help="directory with config.json, *.safetensors, tokenizer.json")
    gguf.add_argument("out", type=Path, help="GGUF file to write")
    gguf.add_argument(
        "--outtype",
        choices=["f32", "f16", "bf16"],
        default="bf16",
        help="type of the weight matrices (norms and small vectors stay f32); default bf16",
    )
    gguf.add_argument(
        "--no-mtp",
        action="store_true",
        help="leave out Qwen3-Next's multi-token-prediction head (kept by default: --spec-type mtp drafts with it)",
    )
    gguf.set_defaults(run=_cmd_gguf)

    quantize = commands.add_parser("quantize", help="quantize a GGUF with llama.cpp (optionally MoE-aware)")
    quantize.add_argument("src", type=Path)
    quantize.add_argument("dst", type=Path)
    quantize.add_argument("--type", default="Q4_K_M", help="llama.cpp file type, e.g. Q4_K_M, Q8_0, Q3_K_M")
    quantize.add_argument(
        "--recipe",
        choices=["default", "moe-offload"],
        default="default",
        help="moe-offload: higher precision for the GPU-resident part, --type for the routed experts",
    )
    quantize.add_argument(
        "--gpu-budget-gib",
        type=float,
        default=8.0,
        help="moe-offload: most GiB of GPU-resident weights (the rest of the GPU holds KV cache and buffers)",
    )
    quantize.add_argument("--threads", type=int, default=0, help="threads (0: all cores)")
    quantize.set_defaults(run=_cmd_quantize)

    synth = commands.add_parser("synth", help="write a tiny random-weight GGUF for tests")
    synth.add_argument("arch", help="qwen3next, qwen3moe, qwen3 or llama")
    synth.add_argument("out", type=Path)
    synth.add_argument("--dtype", default="f32", help="f32, f16, q8_0 or q4_0")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--layers", type=int, default=None, help="number of layers (default: the arch's)")
    synth.add_argument(
        "--mtp", action="store_true", help="qwen3next: add a multi-token-prediction head (see docs/mtp.md)"
    )
    synth.set_defaults(run=_cmd_synth)

    inspect = commands.add_parser("inspect", help="metadata, tensor types and bytes per layer of a GGUF")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--width", type=int, default=100, help="truncate metadata values to this many chars")
    inspect.set_defaults(run=_cmd_inspect)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    # huggingface-hub's retry notices stay visible; llama.cpp's per-tensor log does not (its failure
    # reason is part of the one error line).
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("bindings").setLevel(logging.CRITICAL)
    try:
        run(args)
    except KeyboardInterrupt:
        print("error: interrupted (a partial download resumes on the next pull)", file=sys.stderr)
        return 130
    except (CliError, RegistryError, OSError, ValueError, RuntimeError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
