"""Speculative decoding, measured: our n-gram speculation against our server without it and against llama.cpp's
own llama-server with its n-gram speculation, on the same prompts (issue 13's speed goals).

Workloads (SmolLM2 by default, 2 threads, greedy, chat completions):
- repetitive: quote a given text or code (quote-1, four prompts), one stream: n-grams hit. Goals: ours with
  n-gram ≥ 1.5× ours without, and ≥ 1.0× llama-server with --spec-type ngram-simple. Beside it, four edits and
  rewrites (edit-1: rename a variable, fix spelling, replace a name, add a comment), no goal: SmolLM2-135M
  mostly does not perform them (it rewords, explains or drops lines), so n-grams hit less.
- chat: the varied prompts of bench/prompts.json at 1 and 16 concurrent streams: n-grams rarely hit. Goals:
  speculation on costs ≤ 3% at 1 stream, and ≥ 0.97× speculation off at 16 (the adaptive rule backs off).

Every request is streamed, and each workload gets two speeds: end to end (completion tokens over its wall time,
the goals' figure) and generation (each stream's tokens after its first over the time from its first token to
its last, llama-server's predicted_per_second: what speculation speeds up, the prompt's prefill left out).
Each round starts every server once, in alternating order (the machine's noise hits all of them alike), and
runs every workload against it; figures are medians over the rounds, ratios medians of the same-round ratios.
Ours reports its acceptance rate (/metrics). Run it on a quiet machine:

    python -m bench.speculation --rounds 3 [--json out.json]
    python -m bench.speculation --rounds 1 --max-tokens 16 --chat-requests 2 --servers off,ngram   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from bench.compare import Spread
from bench.load import LoadPlan, stream_one
from bench.process import ServerSpec, exit_on_termination, run_server
from bench.stats import RequestResult

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PROMPTS_FILE = Path(__file__).with_name("prompts.json")
SERVERS = ("off", "ngram", "llama-ngram")
# llama-server's n-gram speculation closest to ours (prompt lookup in the sequence's own tokens).
DEFAULT_LLAMA_SPEC_ARGS = "--spec-type ngram-simple"
QUOTE = "Repeat the following text exactly, word for word, and nothing else."
# (instruction, text): the three kinds of repetitive work, each on prose and on code. The first four are
# the quotes of earlier stops' figures; the last four (edits and rewrites) were added, unmeasured, before the
# run that reports them.
REPETITIVE_TASKS = (
    (
        QUOTE,
        "The old lighthouse stood at the edge of the cliff, its white paint peeling in the salt wind. Every night "
        "the keeper climbed the spiral stairs, trimmed the wick, and watched the beam sweep across the dark water. "
        "Ships passed far out, their lights small and steady, and none of them ever knew his name.",
    ),
    (
        QUOTE,
        "def merge_sorted(left, right):\n    result = []\n    i = j = 0\n    while i < len(left) and j < len(right):\n"
        "        if left[i] <= right[j]:\n            result.append(left[i])\n            i += 1\n        else:\n"
        "            result.append(right[j])\n            j += 1\n    result.extend(left[i:])\n"
        "    result.extend(right[j:])\n    return result\n",
    ),
    (
        QUOTE,
        "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose "
        "and oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts, which contain "
        "the green pigment chlorophyll that absorbs light energy.",
    ),
    (
        QUOTE,
        "Dear team, thank you all for your hard work this quarter. We shipped the new search page, cut the page load "
        "time in half, and closed more than two hundred support tickets. Please join us on Friday at four for cake.",
    ),
    (
        "Rename the variable total to running_sum in the following Python code. Output the complete code and "
        "nothing else.",
        "def average(values):\n    total = 0\n    count = 0\n    for value in values:\n        total += value\n"
        "        count += 1\n    if count == 0:\n        return 0.0\n    return total / count\n",
    ),
    (
        "Correct the spelling mistakes in the following text. Output only the corrected text.",
        "Our garden is at its best in early sumer. The roses climb along the old fence, the beans grow taller every "
        "day, and in the evening the whole yard smels of mint and fresh grass.",
    ),
    (
        "Rewrite the following text with the name Anna replaced by Maria everywhere. Change nothing else.",
        "Anna opened the shop at seven, as she did every morning. She swept the floor, set out the fresh bread, and "
        "wrote the day's prices on the board. When the first customer came in, Anna was already making coffee.",
    ),
    (
        "Add the comment # checked before the return statement in the following JavaScript function. Output the "
        "complete function and nothing else.",
        "function isValidEmail(address) {\n  const at = address.indexOf('@');\n  if (at < 1) {\n    return false;\n"
        "  }\n  const dot = address.lastIndexOf('.');\n  return dot > at + 1 && dot < address.length - 1;\n}\n",
    ),
)


# How a workload's speed is measured: completion tokens over wall time (the goals' figure), or each stream's
# speed after its first token (what speculation acts on; llama-server reports it as predicted_per_second).
END_TO_END, GENERATION = "end to end", "generation"
MEASURES = (END_TO_END, GENERATION)
N_QUOTES = 4  # REPETITIVE_TASKS[:4] are the quotes (the workload of the goals), the rest edits and rewrites


class SpeculationBenchError(RuntimeError):
    """Bad arguments or a server that could not be started; printed as one line."""


@dataclass(frozen=True)
class BenchSettings:
    model: str
    model_path: Path
    threads: int
    parallel: int
    ctx_per_slot: int
    max_tokens: int
    chat_requests: int  # per concurrency level
    chat_streams: tuple[int, ...]
    rounds: int
    servers: tuple[str, ...]
    llama_spec_args: tuple[str, ...]
    draft_max: int


@dataclass(frozen=True)
class WorkloadResult:
    server: str
    workload: str  # quote-1, edit-1, chat-1, chat-16
    round_index: int
    completion_tokens: int
    seconds: float
    acceptance: float | None = None  # ours with speculation: accepted / drafted during this workload
    generation_tokens: int = 0
    generation_seconds: float = 0.0  # see WorkloadTally

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens over the workload's wall time: prefill and the first token included."""
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        """One stream's speed once its first token is out (llama-server's predicted_per_second): what
        speculation speeds up; the prompt's prefill, the same with and without drafts, is left out."""
        return self.generation_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


@dataclass
class BenchReport:
    settings: dict[str, Any]
    results: list[WorkloadResult] = field(default_factory=list)

    def median(self, server: str, workload: str, measure: str = END_TO_END) -> float | None:
        values = [_speed(r, measure) for r in self.results if r.server == server and r.workload == workload]
        return statistics.median(values) if values else None

    def acceptance(self, workload: str) -> float | None:
        values = [r.acceptance for r in self.results if r.workload == workload and r.acceptance is not None]
        return statistics.median(values) if values else None

    def ratios(self, measure: str = END_TO_END) -> dict[str, float | None]:
        """The issue's four speed ratios (None where a server was not run), by one of MEASURES."""
        spreads = {label: Spread.of(self.round_ratios(*pair, measure)) for label, pair in self.ratio_pairs().items()}
        return {label: spread.median if spread else None for label, spread in spreads.items()}

    def ratio_pairs(self) -> dict[str, tuple[str, str, str]]:
        """Each reported ratio: (server, reference server, workload)."""
        return {
            "repetitive (quotes): ngram / off (goal >= 1.5)": ("ngram", "off", "quote-1"),
            "repetitive (quotes): ngram / llama-server ngram (goal >= 1.0)": ("ngram", "llama-ngram", "quote-1"),
            **{
                f"chat {n} streams: ngram / off (goal >= 0.97)": ("ngram", "off", f"chat-{n}")
                for n in self._chat_levels()
            },
            "edits and rewrites (no goal): ngram / off": ("ngram", "off", "edit-1"),
            "edits and rewrites (no goal): ngram / llama-server ngram": ("ngram", "llama-ngram", "edit-1"),
        }

    def round_ratios(self, server: str, reference: str, workload: str, measure: str = END_TO_END) -> list[float]:
        """server / reference in each round both ran: the machine drifts by several percent between rounds,
        so a ratio is taken within a round (as bench.compare does), and its median is reported."""
        mine, theirs = self._by_round(server, workload, measure), self._by_round(reference, workload, measure)
        return [mine[i] / theirs[i] for i in sorted(mine) if theirs.get(i)]

    def _by_round(self, server: str, workload: str, measure: str) -> dict[int, float]:
        wanted = (server, workload)
        return {r.round_index: _speed(r, measure) for r in self.results if (r.server, r.workload) == wanted}

    def _chat_levels(self) -> list[int]:
        return sorted({int(r.workload.split("-")[1]) for r in self.results if r.workload.startswith("chat-")})


def _speed(result: WorkloadResult, measure: str) -> float:
    return result.tokens_per_second if measure == END_TO_END else result.generation_tokens_per_second


def repetitive_prompts() -> list[str]:
    """Every repetitive task's prompt: the quotes, then the edits and rewrites."""
    return [f"{instruction}\n\n{text}" for instruction, text in REPETITIVE_TASKS]


def chat_prompts() -> list[str]:
    return list(json.loads(PROMPTS_FILE.read_text())["prompts"])


def ours_spec(settings: BenchSettings, spec_type: str, port: int) -> ServerSpec:
    command = (
        sys.executable, "-m", "server",
        "--model", settings.model,
        "--host", HOST,
        "--port", str(port),
        "--threads", str(settings.threads),
        "--parallel", str(settings.parallel),
        "--ctx-size", str(settings.ctx_per_slot),
        "--spec-type", spec_type,
        "--draft-max", str(settings.draft_max),
        "--spec-max-step-tokens", str(settings.draft_max + 1),  # a full draft fits one slot's step
    )  # fmt: skip
    name = "ours-" + spec_type
    return ServerSpec(name, command, f"http://{HOST}:{port}/v1", f"http://{HOST}:{port}/health", cwd=REPO_ROOT)


def llama_spec(settings: BenchSettings, port: int) -> ServerSpec:
    from bench.llama_server import LlamaServerSettings, ensure_llama_server, llama_server_spec, this_cpu_has_amx

    return llama_server_spec(
        LlamaServerSettings(
            binary=ensure_llama_server(),
            model_path=settings.model_path,
            port=port,
            threads=settings.threads,
            parallel=settings.parallel,
            ctx_size=settings.ctx_per_slot * settings.parallel,  # llama-server's --ctx-size is the total
            no_repack=this_cpu_has_amx(),
            extra_args=settings.llama_spec_args,
        )
    )


def server_spec(settings: BenchSettings, server: str, port: int) -> ServerSpec:
    if server == "llama-ngram":
        return llama_spec(settings, port)
    return ours_spec(settings, "none" if server == "off" else "ngram", port)


@dataclass(frozen=True)
class WorkloadTally:
    """What one workload's requests took, summed: completion tokens and wall time, and the generation part of
    each stream (from its first token to its last, as llama-server's `predicted_per_second` counts it)."""

    completion_tokens: int = 0
    seconds: float = 0.0
    generation_tokens: int = 0  # each request's tokens after its first
    generation_seconds: float = 0.0  # summed over the requests: per-stream time, not wall time

    def plus_request(self, result: RequestResult) -> WorkloadTally:
        if result.error is not None:
            raise SpeculationBenchError(f"a request failed: {result.error}")
        times = result.token_chunk_times
        generation = times[-1] - times[0] if times else 0.0
        return replace(
            self,
            completion_tokens=self.completion_tokens + result.n_output_tokens,
            generation_tokens=self.generation_tokens + max(0, result.n_output_tokens - 1),
            generation_seconds=self.generation_seconds + generation,
        )


async def run_workload(
    base_url: str, prompts: Sequence[str], streams: int, max_tokens: int, ignore_eos: bool
) -> WorkloadTally:
    """Every prompt once, streamed, `streams` at a time."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    tally = WorkloadTally()

    async def worker(client: httpx.AsyncClient, plan: LoadPlan) -> None:
        nonlocal tally
        while not queue.empty():
            prompt = queue.get_nowait()
            result = await stream_one(client, plan, prompt, send_extras=ignore_eos)
            tally = tally.plus_request(result)

    async with httpx.AsyncClient(timeout=600.0, trust_env=False) as client:
        model = (await client.get(f"{base_url}/models")).json()["data"][0]["id"]  # the served name
        plan = LoadPlan(
            base_url=base_url,
            model=model,
            prompts=tuple(prompts),
            max_tokens=max_tokens,
            concurrency_levels=(streams,),
            requests_per_level=(len(prompts),),
            ignore_eos=ignore_eos,
        )
        started = time.perf_counter()
        await asyncio.gather(*(worker(client, plan) for _ in range(streams)))
        return replace(tally, seconds=time.perf_counter() - started)


def spec_counters(base_url: str) -> tuple[float, float] | None:
    """Ours: (drafted, accepted) tokens so far, from /metrics; None for a server without them."""
    try:
        text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10.0, trust_env=False).text
    except httpx.HTTPError:
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("qwen3_local_spec_draft_tokens_total", "qwen3_local_spec_accepted_tokens_total"):
            if line.startswith(name):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    if len(values) < 2:
        return None
    return values["qwen3_local_spec_draft_tokens_total"], values["qwen3_local_spec_accepted_tokens_total"]


def workloads(settings: BenchSettings) -> list[tuple[str, list[str], int, bool]]:
    """(name, prompts, streams, ignore_eos) of every workload."""
    chat = chat_prompts()
    repetitive = repetitive_prompts()
    result = [("quote-1", repetitive[:N_QUOTES], 1, False), ("edit-1", repetitive[N_QUOTES:], 1, False)]
    for streams in settings.chat_streams:
        n = settings.chat_requests * streams
        result.append((f"chat-{streams}", [chat[i % len(chat)] for i in range(n)], streams, True))
    return result


def run_round(settings: BenchSettings, round_index: int, port: int) -> list[WorkloadResult]:
    order = settings.servers if round_index % 2 == 0 else tuple(reversed(settings.servers))
    results = []
    for server in order:
        with run_server(server_spec(settings, server, port)) as running:
            base_url = running.spec.base_url
            for name, prompts, streams, ignore_eos in workloads(settings):
                before = spec_counters(base_url)
                tally = asyncio.run(run_workload(base_url, prompts, streams, settings.max_tokens, ignore_eos))
                after = spec_counters(base_url)
                acceptance = None
                if before is not None and after is not None and after[0] > before[0]:
                    acceptance = (after[1] - before[1]) / (after[0] - before[0])
                result = WorkloadResult(
                    server, name, round_index, tally.completion_tokens, tally.seconds, acceptance,
                    tally.generation_tokens, tally.generation_seconds,
                )  # fmt: skip
                print(
                    f"round {round_index + 1} {server:12s} {name:13s} {result.tokens_per_second:8.1f} tok/s"
                    f"  generation {result.generation_tokens_per_second:8.1f} tok/s"
                    + (f"  acceptance {acceptance:.2f}" if acceptance is not None else ""),
                    flush=True,
                )
                results.append(result)
    return results


def format_report(report: BenchReport) -> str:
    names = sorted({r.workload for r in report.results})
    servers = sorted({r.server for r in report.results})
    lines = []
    for measure in MEASURES:
        lines.append(f"{measure + ' tok/s':22s}" + "".join(f"{s:>14s}" for s in servers) + "   acceptance (ngram)")
        for name in names:
            cells = "".join(f"{(report.median(s, name, measure) or 0):14.1f}" for s in servers)
            acceptance = report.acceptance(name)
            lines.append(f"{name:22s}{cells}" + (f"   {acceptance:.2f}" if acceptance is not None else ""))
    for measure in MEASURES:
        lines.append(f"ratios, {measure}: median of the same-round ratios (min-max)")
        for label, pair in report.ratio_pairs().items():
            spread = Spread.of(report.round_ratios(*pair, measure))
            value = f"{spread.median:.3f} ({spread.low:.3f}-{spread.high:.3f})" if spread else "n/a"
            lines.append(f"  {label}: {value}")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.speculation", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="models.yaml name or .gguf path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--ctx-size", type=int, default=1024, help="context per slot")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--chat-requests", type=int, default=4, help="chat requests per stream at each level")
    parser.add_argument("--chat-streams", default="1,16", help="comma-separated concurrency levels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"a subset of {','.join(SERVERS)}")
    parser.add_argument("--llama-spec-args", default=DEFAULT_LLAMA_SPEC_ARGS, help="llama-server's speculation flags")
    parser.add_argument("--draft-max", type=int, default=32)
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    from registry.models import RegistryError, resolve_model

    servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
    unknown = [s for s in servers if s not in SERVERS]
    if unknown or not servers:
        raise SpeculationBenchError(f"--servers takes a subset of {','.join(SERVERS)}, got {args.servers!r}")
    try:
        streams = tuple(int(s) for s in args.chat_streams.split(",") if s.strip())
    except ValueError:
        raise SpeculationBenchError(f"--chat-streams takes integers, got {args.chat_streams!r}") from None
    try:
        model_path = resolve_model(args.model).path
    except RegistryError as exc:
        raise SpeculationBenchError(str(exc)) from exc
    return BenchSettings(
        model=args.model,
        model_path=Path(model_path),
        threads=args.threads,
        parallel=args.parallel,
        ctx_per_slot=args.ctx_size,
        max_tokens=args.max_tokens,
        chat_requests=args.chat_requests,
        chat_streams=streams,
        rounds=args.rounds,
        servers=servers,
        llama_spec_args=tuple(shlex.split(args.llama_spec_args)),
        draft_max=args.draft_max,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        settings = settings_from_args(args)
        exit_on_termination()
        report = BenchReport(settings={k: str(v) for k, v in asdict(settings).items()})
        for round_index in range(settings.rounds):
            report.results += run_round(settings, round_index, args.port)
    except (SpeculationBenchError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        ratios = {measure: report.ratios(measure) for measure in MEASURES}
        body = {"settings": report.settings, "results": [asdict(r) for r in report.results], "ratios": ratios}
        args.json.write_text(json.dumps(body, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
