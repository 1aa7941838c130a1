"""The placement map (server/ui/static/placement.js) in chromium, against a live server planned with
--auto-offload on the tiny synthetic qwen3next: every layer of GET /plan appears with the device of its
attention/SSM weights and of its routed experts, beside the devices' bytes, the binding constraint and the
predicted vs measured decode rate."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, Route, expect

from tests.integration.conftest import CacheHome, LiveServer, start_server, stop_server
from tests.ui.conftest import DOCS


@pytest.fixture(scope="module")
def planned_server(
    tiny_qwen3next_gguf: Path, tmp_path_factory: pytest.TempPathFactory, ui_cache_home: CacheHome
) -> Iterator[LiveServer]:
    args = ["--model", str(tiny_qwen3next_gguf), "--auto-offload", "--parallel", "2", "--ctx-size", "512"]
    server = start_server(args, tmp_path_factory.mktemp("planned") / "server.log", ui_cache_home)
    yield server
    stop_server(server)


def open_placement(page: Page, server: LiveServer) -> None:
    page.goto(server.base_url + "/ui/")
    tab = page.get_by_role("tab", name="Placement")
    expect(tab).to_be_visible()
    tab.click()
    expect(page.locator("#panel-placement table[data-table=layers]")).to_be_visible()


def test_the_map_shows_every_layer_where_the_plan_put_it(planned_server: LiveServer, page: Page) -> None:
    answer = httpx.post(
        planned_server.api_url + "/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "ignore_eos": True},
        timeout=60,
    )
    assert answer.status_code == 200  # tokens generated: the measured decode rate exists
    plan = httpx.get(planned_server.base_url + "/plan", timeout=30).json()["plan"]
    open_placement(page, planned_server)
    panel = page.locator("#panel-placement")

    rows = panel.locator("table[data-table=layers] tbody tr")
    expect(rows).to_have_count(len(plan["layers"]))
    for layer in plan["layers"]:
        row = panel.locator(f"tr[data-layer='{layer['index']}']")
        expect(row.locator("th")).to_have_text(str(layer["index"]))
        expect(row.locator("td[data-part=weights]")).to_have_text(layer["device"])
        expect(row.locator("td[data-part=experts]")).to_have_text(layer["experts_device"])
        expect(row).to_contain_text("SSM" if layer["kind"] == "ssm" else "attention")
    assert {layer["kind"] for layer in plan["layers"]} == {"ssm", "attention"}  # both kinds are drawn

    devices = panel.locator("table[data-table=devices] tbody tr")
    expect(devices).to_have_count(len(plan["devices"]))
    expect(panel.locator("tr[data-device=CPU]")).to_contain_text("CPU")
    expect(panel.locator("[data-fact=binding-constraint]")).to_have_text(plan["binding_constraint"])
    predicted = plan["predicted"]["decode_tokens_per_s"]
    expect(panel.locator("[data-fact=predicted]")).to_contain_text(f"{predicted:.0f} tok/s")
    expect(panel.locator("[data-fact=measured]")).to_have_text(re.compile(r"^[0-9.]+ tok/s \(since start\)$"))
    expect(panel.locator("table[data-table=memory] tbody tr")).not_to_have_count(0)
    page.set_viewport_size({"width": 1280, "height": 1100})  # the panel scrolls inside the page: show it all
    page.screenshot(path=str(DOCS / "ui-placement.png"))


def test_without_auto_offload_the_page_says_there_is_no_plan(ui_server: LiveServer, page: Page) -> None:
    page.goto(ui_server.base_url + "/ui/")
    page.get_by_role("tab", name="Placement").click()
    expect(page.locator("#panel-placement [data-placement=none]")).to_contain_text("without --auto-offload")
    expect(page.locator("#panel-placement table")).to_have_count(0)


def test_a_gpu_and_cpu_split_is_drawn_per_layer(ui_server: LiveServer, page: Page) -> None:
    """A plan as a 16 GB GPU gets it (answered in place of this CPU-only server's /plan): each layer's weights
    on CUDA0, the routed experts of the first two layers in RAM, of the last two on the GPU, a dense layer."""
    layers = [
        {
            "index": 0,
            "kind": "ssm",
            "device": "CUDA0",
            "experts_device": "CPU",
            "weights_bytes": 10,
            "expert_bytes": 90,
        },
        {
            "index": 1,
            "kind": "ssm",
            "device": "CUDA0",
            "experts_device": "CPU",
            "weights_bytes": 10,
            "expert_bytes": 90,
        },
        {
            "index": 2,
            "kind": "ssm",
            "device": "CUDA0",
            "experts_device": "CUDA0",
            "weights_bytes": 10,
            "expert_bytes": 90,
        },
        {
            "index": 3,
            "kind": "attention",
            "device": "CUDA0",
            "experts_device": None,
            "weights_bytes": 10,
            "expert_bytes": 0,
        },
    ]

    def device(name: str, kind: str, total: int, budget: int) -> dict[str, object]:
        uses = {f"{use}_bytes": 1 for use in ("weights", "kv", "recurrent", "compute", "overhead")}
        return {"name": name, "kind": kind, "description": name, **uses, "total_bytes": total, "budget_bytes": budget}

    plan = {
        "model": "split",
        "architecture": "qwen3next",
        "model_bytes": 400,
        "devices": [device("CUDA0", "cuda", 15 << 30, 16 << 30), device("CPU", "cpu", 30 << 30, 120 << 30)],
        "layers": layers,
        "output_device": "CUDA0",
        "n_gpu_layers": 5,
        "n_ctx_seq": 4096,
        "parallel": 4,
        "kv_type": "q8_0",
        "predicted": {"decode_tokens_per_s": 71.5, "decode_tokens_per_s_single": 51.6, "prefill_tokens_per_s": 1112},
        "binding_constraint": "CUDA0 memory: the routed experts of 1 of 4 layers fit on the GPU",
        "tradeoffs": [],
    }
    served: list[str] = []

    def answer(route: Route) -> None:
        served.append(route.request.url)
        route.fulfill(json={"model": "split", "plan": plan})

    page.route("**/plan", answer)
    page.goto(ui_server.base_url + "/ui/")
    page.get_by_role("tab", name="Placement").click()
    panel = page.locator("#panel-placement")
    expect(panel.locator("table[data-table=layers] tbody tr")).to_have_count(4)
    experts = panel.locator("td[data-part=experts]")
    expect(experts).to_have_text(["CPU", "CPU", "CUDA0", "dense (no experts)"])
    expect(panel.locator("td[data-part=weights]")).to_have_text(["CUDA0"] * 4)
    expect(panel.locator("tr[data-device=CUDA0]")).to_contain_text("94 %")  # 15 of 16 GiB
    expect(panel.locator("[data-fact=binding-constraint]")).to_have_text(plan["binding_constraint"])
    expect(panel.locator("[data-fact=predicted]")).to_have_text("72 tok/s with 4 slots (52 tok/s for one)")
    # the strip colours a GPU and the CPU differently
    cpu_colour = panel.locator("tr[data-layer='0'] td[data-part=experts] .dev").evaluate(
        "node => getComputedStyle(node).backgroundColor"
    )
    gpu_colour = panel.locator("tr[data-layer='2'] td[data-part=experts] .dev").evaluate(
        "node => getComputedStyle(node).backgroundColor"
    )
    assert cpu_colour != gpu_colour
    # Refresh reads the plan again, from the keyboard too
    refresh = panel.get_by_role("button", name="Refresh")
    refresh.focus()
    page.keyboard.press("Enter")
    expect(refresh).to_be_enabled()  # disabled while it reads: the click disabled it before it fetched
    assert len(served) == 2
