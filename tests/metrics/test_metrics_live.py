"""A real `python -m server` (SmolLM2): /metrics against the responses' usage, and every metric name the
shipped dashboard and alert rules read is one the server exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import CacheHome, LiveServer, start_server, stop_server
from tests.metrics.promql import metric_names

MODEL = "smollm2-135m-instruct"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "qwen3-local.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# Series Prometheus makes itself, not the server
PROMETHEUS_SERIES = {"up"}
AUDIT_SPOOL = {"qwen3_local_audit_spool_bytes", "qwen3_local_audit_spool_capacity_bytes"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("metrics-live")
    # with the audit log on (SQLite in the data dir), so the audit spool's gauges are there once exported
    args = ["--model", MODEL, "--parallel", "2", "--ctx-size", "512", "--threads", "2"]
    args += ["--audit", "--data-dir", str(root / "data")]
    live = start_server(args, root / "server.log", CacheHome(root / "cache"))
    yield live
    stop_server(live)


def scrape(server: LiveServer) -> dict[str, Metric]:
    response = httpx.get(server.base_url + "/metrics", timeout=30)
    assert response.status_code == 200
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def series_names(families: dict[str, Metric]) -> set[str]:
    """Every series name a query may select, from each family's type (also for a family without samples:
    a machine without a GPU declares the GPU families, with no series)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names = set()
    for family in families.values():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def dashboard_names() -> dict[str, set[str]]:
    """Per panel title (and per template variable): the metric names its queries read."""
    dashboard = json.loads(DASHBOARD.read_text())
    found: dict[str, set[str]] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.setdefault(panel["title"], set()).update(metric_names(target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\(\s*([^,]+),\s*\w+\s*\)", variable["definition"])
            assert match, variable["definition"]
            found[f"${variable['name']}"] = {match.group(1).strip()}
    return found


def alert_names() -> dict[str, set[str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: metric_names(rule["expr"]) for group in rules["groups"] for rule in group["rules"]}


def test_dashboard_and_alerts_read_only_exported_metrics(server: LiveServer) -> None:
    exported = series_names(scrape(server))
    readers = {**{f"panel {k}": v for k, v in dashboard_names().items()}, **alert_names()}
    assert len(readers) > 20 and all(readers.values())  # the extraction found names in every query
    unknown = {
        reader: sorted(names - exported - PROMETHEUS_SERIES)
        for reader, names in readers.items()
        if names - exported - PROMETHEUS_SERIES
    }
    assert not unknown, f"queries read metrics /metrics does not export: {unknown}"
    assert exported >= AUDIT_SPOOL  # the audit log is on in this server: its spool alert has data
    read = set().union(*readers.values())
    for name in ("qwen3_local:e2e_request_latency_seconds_bucket", "qwen3_local_gpu_memory_used_bytes"):
        assert name in read


def chat(server: LiveServer, prompt: str, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0, **extra}
    response = httpx.post(server.api_url + "/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def streamed_usage(response: httpx.Response) -> dict[str, int]:
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    [usage] = [json.loads(event)["usage"] for event in events if event != "[DONE]" and json.loads(event).get("usage")]
    return dict(usage)


def value(families: dict[str, Metric], family: str, sample: str, **labels: str) -> float:
    return sum(
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_request_metrics_equal_the_responses_usage(server: LiveServer) -> None:
    before = scrape(server)
    usages = [chat(server, prompt, max_tokens=12).json()["usage"] for prompt in ("Name three colors.",) * 2]
    usages.append(chat(server, "What is 2 + 2?", max_tokens=1).json()["usage"])
    stream = chat(server, "Say hello.", max_tokens=10, stream=True, stream_options={"include_usage": True})
    usages.append(streamed_usage(stream))
    body = {"model": MODEL, "prompt": "The sea is", "max_tokens": 6, "n": 2, "temperature": 0.8}
    completion = httpx.post(server.api_url + "/completions", json=body, timeout=120)
    assert completion.status_code == 200
    usages.append(completion.json()["usage"])
    after = scrape(server)

    def delta(family: str, sample: str, **labels: str) -> float:
        return value(after, family, sample, model_name=MODEL, **labels) - value(
            before, family, sample, model_name=MODEL, **labels
        )

    n = len(usages)
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    completion_tokens = sum(u["completion_tokens"] for u in usages)
    cached_tokens = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert cached_tokens > 0  # the repeated prompt reused its slot's KV
    success = "qwen3_local:request_success"
    assert delta(success, f"{success}_total") == n
    assert delta(success, f"{success}_total", finished_reason="length") >= 1  # max_tokens 1
    histogram_sums = {
        "qwen3_local:request_prompt_tokens": prompt_tokens,
        "qwen3_local:request_generation_tokens": completion_tokens,
    }
    for family, total in histogram_sums.items():
        assert delta(family, f"{family}_sum") == total
        assert delta(family, f"{family}_count") == n
    assert delta("qwen3_local:prompt_tokens", "qwen3_local:prompt_tokens_total") == prompt_tokens
    assert delta("qwen3_local:generation_tokens", "qwen3_local:generation_tokens_total") == completion_tokens
    assert delta("qwen3_local:prefix_cache_hits", "qwen3_local:prefix_cache_hits_total") == cached_tokens
    assert delta("qwen3_local:prefix_cache_queries", "qwen3_local:prefix_cache_queries_total") == prompt_tokens
    for family in (
        "qwen3_local:e2e_request_latency_seconds",
        "qwen3_local:time_to_first_token_seconds",
        "qwen3_local:request_queue_time_seconds",
        "qwen3_local:request_prefill_time_seconds",
        "qwen3_local:request_decode_time_seconds",
    ):
        assert delta(family, f"{family}_count") == n, family
        assert delta(family, f"{family}_sum") > 0, family
    # e2e covers queue + prefill + decode of every request (and the HTTP work around them)
    phases = sum(
        delta(f"qwen3_local:request_{phase}_time_seconds", f"qwen3_local:request_{phase}_time_seconds_sum")
        for phase in ("queue", "prefill", "decode")
    )
    e2e = "qwen3_local:e2e_request_latency_seconds"
    assert 0 < phases <= delta(e2e, f"{e2e}_sum")
    assert value(after, "qwen3_local:num_requests_running", "qwen3_local:num_requests_running", model_name=MODEL) == 0
    kv = value(after, "qwen3_local:kv_cache_usage_perc", "qwen3_local:kv_cache_usage_perc", model_name=MODEL)
    assert 0 < kv <= 1  # the slots keep their last prompts' KV for reuse


def test_host_memory_and_rss_are_this_machine(server: LiveServer) -> None:
    families = scrape(server)

    def gauge(name: str) -> float:
        [sample] = families[name].samples
        return sample.value

    total = gauge("qwen3_local_host_memory_total_bytes")
    used, available = gauge("qwen3_local_host_memory_used_bytes"), gauge("qwen3_local_host_memory_available_bytes")
    assert 0 < available < total and used + available == total
    assert 50 << 20 < gauge("qwen3_local_process_resident_memory_bytes") < total  # a model is loaded
    assert families["qwen3_local_gpu_memory_total_bytes"].type == "gauge"  # declared with or without a GPU
