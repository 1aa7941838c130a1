"""`python -m offload plan MODEL`: show where a model's layers and experts go on this (or another) machine.

MODEL is a path to a .gguf (the first shard of a split model) or a name from models.yaml. The hardware is
detected; `--gpu SIZE[@BANDWIDTH]` (repeatable, or `--gpu none`), `--ram SIZE[@BANDWIDTH]` and `--cores N`
plan for another machine. `--json` prints the plan's documented JSON form (offload/README.md).
Several MODELs: their joint plan, all loaded together in one server (offload/joint.py); `--weight W` (once per
model, in order) sets each one's GPU priority, and the exit status is 1 when they do not all fit.

Exit status: 0 with a plan, 1 when the model fits nowhere (the line says by how much), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from offload.gguf_shape import GgufError, KvType, ModelShape, read_model_shape
from offload.hardware import HardwareError, HardwareProfile, detect, parse_size, with_overrides
from offload.joint import JointMember, JointPlan, plan_joint
from offload.placement import placement_for
from offload.planner import DoesNotFitError, PlanError, PlanRequest, gpu_name, plan, ram_margin
from offload.rpc import (
    DEFAULT_UBATCH,
    RpcPlanError,
    default_ctx,
    local_budget_of,
    local_gpu,
    parse_rpc_device,
    plan_rpc,
)
from offload.table import render_joint_table, render_table
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m offload", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    plan_parser = commands.add_parser("plan", help="plan the placement of MODEL", description=__doc__)
    plan_parser.add_argument(
        "model", metavar="MODEL", nargs="+", help="path to a .gguf, or a models.yaml name (several: a joint plan)"
    )
    plan_parser.add_argument(
        "--weight",
        action="append",
        type=_positive_float,
        metavar="W",
        help="GPU priority of each MODEL, in order (default 1 each; several models only)",
    )
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
    plan_parser.add_argument(
        "--rpc-device",
        action="append",
        metavar="NAME:SIZE[@LINK][+LATENCY]",
        help="plan whole layers over this machine's RAM and GPUs (detected, or --gpu) and an RPC worker with SIZE "
        "free (repeat, in --rpc order), e.g. gpu-box:16GiB@10Gbit+0.2ms (see offload/rpc.py)",
    )
    plan_parser.add_argument("--refresh-hardware", action="store_true", help="re-measure the RAM bandwidth")
    return parser


def _hardware(args: argparse.Namespace) -> HardwareProfile:
    profile = detect(refresh=args.refresh_hardware)
    return with_overrides(profile, gpus=args.gpu, ram=args.ram, cores=args.cores)


def run_plan(args: argparse.Namespace) -> int:
    if len(args.model) > 1:
        return run_joint_plan(args)
    if args.weight:
        raise PlanError("--weight sets GPU priorities between several models; give two or more MODELs")
    resolved = resolve_model(args.model[0])
    shape = read_model_shape(Path(resolved.path))
    hardware = _hardware(args)
    if args.rpc_device:
        return run_rpc_plan(args, shape, hardware)
    result = plan(shape, hardware, _plan_request(args, resolved.name))
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


def run_rpc_plan(args: argparse.Namespace, shape: ModelShape, hardware: HardwareProfile) -> int:
    """--rpc-device: whole layers over this machine's RAM, its GPUs and the workers (offload/rpc.py)."""
    workers = [parse_rpc_device(text) for text in args.rpc_device]
    budget = local_budget_of(shape, hardware.ram_available_bytes, ram_margin(hardware.ram_total_bytes))
    kv_type = KvType(args.kv_type) if args.kv_type else KvType.F16
    ctx = args.ctx or default_ctx(shape)
    # the profile's GPUs (detected, or --gpu) take the last layers (offload/rpc.py)
    gpus = [
        local_gpu(
            gpu_name(index),
            gpu,
            shape,
            ctx=ctx,
            parallel=args.parallel,
            kv_type=kv_type,
            n_ubatch=args.ubatch or DEFAULT_UBATCH,
            n_batch=args.batch,
            margin_bytes=parse_size(args.gpu_margin) if args.gpu_margin else None,
        )
        for index, gpu in enumerate(hardware.gpus)
    ]
    result = plan_rpc(
        shape, workers, local_budget_bytes=budget, ctx=ctx, parallel=args.parallel, kv_type=kv_type, gpus=gpus
    )
    print(json.dumps(result.to_json(), indent=2) if args.json else result.render())
    return 0


def _plan_request(args: argparse.Namespace, model_name: str) -> PlanRequest:
    """What the options ask of one model's plan (alone, or as a member of a joint plan)."""
    return PlanRequest(
        ctx=args.ctx,
        parallel=args.parallel,
        kv_type=KvType(args.kv_type) if args.kv_type else None,
        n_ubatch=args.ubatch,
        n_batch=args.batch,
        gpu_margin_bytes=parse_size(args.gpu_margin) if args.gpu_margin else None,
        use_mlock=args.mlock,
        model_name=model_name,
    )


def run_joint_plan(args: argparse.Namespace) -> int:
    """Several models: their joint plan (offload/joint.py), printed even when they do not all fit (status 1)."""
    if getattr(args, "rpc_device", None):  # offload/rpc.py's option
        raise PlanError("--rpc-device plans one model; give a single MODEL")
    weights = args.weight or [1.0] * len(args.model)
    if len(weights) != len(args.model):
        raise PlanError(f"--weight was given {len(weights)} times for {len(args.model)} models: give one per model")
    members: list[JointMember] = []
    shapes: dict[str, ModelShape] = {}
    for model, weight in zip(args.model, weights, strict=True):
        resolved = resolve_model(model)
        shape = read_model_shape(Path(resolved.path))
        members.append(JointMember(shape, _plan_request(args, resolved.name), weight))
        shapes[members[-1].name] = shape
    hardware = _hardware(args)
    joint = plan_joint(members, hardware)
    if args.json:
        print(json.dumps(_joint_document(joint, hardware), indent=2))
    else:
        print(render_joint_table(joint, shapes))
    for problem in joint.problems:
        print(f"python -m offload plan: {problem.name} {problem.reason}", file=sys.stderr)
    return 0 if joint.fits else EXIT_DOES_NOT_FIT


def _joint_document(joint: JointPlan, hardware: HardwareProfile) -> dict[str, Any]:
    """The joint plan's JSON, each member's plan with its llama.cpp parameters as in the single-model form."""
    document = joint.to_json()
    for member, entry in zip(joint.members, document["members"], strict=True):
        placement = placement_for(member.plan)
        entry["plan"]["llama_cpp"] = {
            "model_params": placement.model_params(),
            "context_params": placement.context_params(),
        }
    return {**document, "hardware": hardware.to_json()}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_plan(args)
    except RpcPlanError as exc:
        print(f"python -m offload plan: {exc}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except DoesNotFitError as exc:
        print(f"python -m offload plan: {exc}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except (RegistryError, GgufError, HardwareError, PlanError) as exc:
        print(f"python -m offload plan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
