"""`python -m offload plan MODEL`: show where a model's layers and experts go on this (or another) machine.

MODEL is a path to a .gguf (the first shard of a split model) or a name from models.yaml. The hardware is
detected; `--gpu SIZE[@BANDWIDTH]` (repeatable, or `--gpu none`), `--ram SIZE[@BANDWIDTH]` and `--cores N`
plan for another machine. `--json` prints the plan's documented JSON form (offload/README.md).

Exit status: 0 with a plan, 1 when the model fits nowhere (the line says by how much), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from offload.gguf_shape import GgufError, KvType, read_model_shape
from offload.hardware import HardwareError, HardwareProfile, detect, parse_size, with_overrides
from offload.placement import placement_for
from offload.planner import DoesNotFitError, PlanError, PlanRequest, plan
from offload.table import render_table
from registry.models import RegistryError, resolve_model

EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m offload", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    plan_parser = commands.add_parser("plan", help="plan the placement of MODEL", description=__doc__)
    plan_parser.add_argument("model", metavar="MODEL", help="path to a .gguf, or a models.yaml name")
    plan_parser.add_argument(
        "--gpu",
        action="append",
        metavar="SIZE[@BW]",
        help="plan for a GPU of this size instead of the detected ones (repeat for several; 'none' for no GPU), "
        "e.g. 16GiB or 24GB@1008GB/s",
    )
    plan_parser.add_argument("--ram", metavar="SIZE[@BW]", help="plan for this much available RAM, e.g. 120GiB")
    plan_parser.add_argument("--cores", type=_positive_int, help="plan for this many physical CPU cores")
    plan_parser.add_argument("--ctx", type=_positive_int, help="context tokens per slot (default: chosen)")
    plan_parser.add_argument("--parallel", type=_positive_int, default=1, help="slots decoded together (default 1)")
    plan_parser.add_argument(
        "--kv-type", choices=[k.value for k in KvType], help="KV cache type (default: f16, or q8_0 when clearly faster)"
    )
    plan_parser.add_argument("--ubatch", type=_positive_int, help="micro-batch size (default: chosen)")
    plan_parser.add_argument("--batch", type=_positive_int, help="batch size (default: the micro-batch size)")
    plan_parser.add_argument("--gpu-margin", metavar="SIZE", help="memory to leave free on each GPU")
    plan_parser.add_argument("--mlock", action="store_true", help="lock the CPU-resident weights in RAM")
    plan_parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_parser.add_argument("--refresh-hardware", action="store_true", help="re-measure the RAM bandwidth")
    return parser


def _hardware(args: argparse.Namespace) -> HardwareProfile:
    profile = detect(refresh=args.refresh_hardware)
    return with_overrides(profile, gpus=args.gpu, ram=args.ram, cores=args.cores)


def run_plan(args: argparse.Namespace) -> int:
    resolved = resolve_model(args.model)
    shape = read_model_shape(Path(resolved.path))
    hardware = _hardware(args)
    request = PlanRequest(
        ctx=args.ctx,
        parallel=args.parallel,
        kv_type=KvType(args.kv_type) if args.kv_type else None,
        n_ubatch=args.ubatch,
        n_batch=args.batch,
        gpu_margin_bytes=parse_size(args.gpu_margin) if args.gpu_margin else None,
        use_mlock=args.mlock,
        model_name=resolved.name,
    )
    result = plan(shape, hardware, request)
    if args.json:
        placement = placement_for(result)
        document = {
            **result.to_json(),
            "hardware": hardware.to_json(),
            "llama_cpp": {"model_params": placement.model_params(), "context_params": placement.context_params()},
        }
        print(json.dumps(document, indent=2))
    else:
        print(render_table(result, shape))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_plan(args)
    except DoesNotFitError as exc:
        print(f"python -m offload plan: {exc}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except (RegistryError, GgufError, HardwareError, PlanError) as exc:
        print(f"python -m offload plan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
