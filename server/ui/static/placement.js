// The placement map: GET /plan (admin) drawn as one row per layer (where its attention/SSM weights and its
// routed experts live), the bytes on each device, the binding constraint, and the predicted decode rate beside
// the measured one (GET /ui/api/stats). offload/README.md documents the plan's JSON.

import { formatBytes } from "./dashboard.js";
import { addStyle, el } from "./dom.js";

const STYLE = `
.placement h2 { margin: 0 0 .3em; font-size: 1.2em; }
.placement h3 { font-size: 1em; margin: 1.2em 0 .4em; }
.placement .bar { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; }
.placement table { border-collapse: collapse; background: #fff; font-size: .9em; font-variant-numeric: tabular-nums; }
.placement th, .placement td { border: 1px solid var(--line, #ddd); padding: .25em .6em; text-align: left; }
.placement td.num, .placement th.num { text-align: right; }
.placement .facts { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; margin: .5em 0; }
.placement .facts dt { color: var(--muted, #666); }
.placement .facts dd { margin: 0; }
.placement .dev { display: inline-block; padding: 0 .5em; border-radius: 4px; color: #fff; font-size: .85em; background: var(--c); }
.placement .strip { display: flex; gap: 2px; flex-wrap: wrap; margin: .4em 0; }
.placement .strip div { width: 1.4em; display: grid; gap: 2px; }
.placement .strip span { height: .9em; border-radius: 2px; background: var(--c); }
.placement .strip span.none { background: transparent; border: 1px dashed var(--line, #ddd); }
.placement meter { width: 8em; }
.placement .constraint { font-weight: 600; }
`;

const GPU_COLORS = ["#1a7f37", "#2457c5", "#8250df", "#bf3989", "#0a7ea4", "#9a6700"];
const CPU_COLOR = "#6e7781";


function table(caption, headers, rows, attrs = {}) {
  const head = el("tr", {}, ...headers.map(([label, cls]) => el("th", { scope: "col", class: cls ?? "" }, label)));
  return el("table", attrs, el("caption", { class: "visually-hidden" }, caption), el("thead", {}, head),
    el("tbody", {}, ...rows));
}

function rate(value) {
  return value == null ? "–" : `${value.toFixed(value < 10 ? 1 : 0)} tok/s`;
}

export function mount(container, api) {
  if (container.dataset.mounted) return container._unmount;
  container.dataset.mounted = "placement";
  addStyle("placement-style", STYLE);

  const body = el("div", { "aria-live": "polite" }, "Loading the plan…");
  const error = el("p", { class: "error", role: "alert" });
  const refresh = el("button", { type: "button" }, "Refresh");
  container.replaceChildren(
    el("div", { class: "placement" }, el("div", { class: "bar" }, el("h2", {}, "Placement"), refresh), error, body),
  );

  async function load() {
    refresh.disabled = true;
    try {
      const report = await api.get("/plan");
      let stats = null;
      try {
        stats = await api.get("/ui/api/stats");
      } catch {
        stats = null; // the measured rate is optional
      }
      body.replaceChildren(...render(report, stats));
      error.textContent = "";
    } catch (exc) {
      error.textContent = `Could not read /plan: ${exc.message ?? exc}`;
    } finally {
      refresh.disabled = false;
    }
  }
  refresh.addEventListener("click", load);
  load();
  container._unmount = () => delete container.dataset.mounted;
  return container._unmount;
}

function render(report, stats) {
  const plan = report.plan;
  const parts = [];
  if (!plan) {
    parts.push(el("p", { "data-placement": "none" },
      `${report.model ?? "This model"} was loaded without --auto-offload: there is no placement plan to show. ` +
        "Start the server with --auto-offload to have it plan where each layer goes."));
    if (report.extra_bufts) parts.push(el("p", {}, `Extra buffer types: ${report.extra_bufts.reason}`));
    return parts;
  }

  const colors = new Map();
  let gpu = 0;
  for (const device of plan.devices) {
    colors.set(device.name, device.kind === "cpu" ? CPU_COLOR : GPU_COLORS[gpu++ % GPU_COLORS.length]);
  }
  const badge = (name) =>
    name == null ? el("span", {}, "dense (no experts)") : el("span", { class: "dev", style: `--c: ${colors.get(name) ?? CPU_COLOR}` }, name);

  const measured = stats?.decode_tokens_per_second ?? null;
  const facts = el("dl", { class: "facts" });
  const fact = (label, value, key) => facts.append(el("dt", {}, label), el("dd", key ? { "data-fact": key } : {}, value));
  fact("Model", `${plan.model} (${plan.architecture}, ${formatBytes(plan.model_bytes)}, ${plan.layers.length} layers)`);
  fact("Binding constraint", el("span", { class: "constraint" }, plan.binding_constraint), "binding-constraint");
  fact("Decode, predicted", `${rate(plan.predicted.decode_tokens_per_s)} with ${plan.parallel} slots ` +
    `(${rate(plan.predicted.decode_tokens_per_s_single)} for one)`, "predicted");
  fact("Decode, measured", measured == null ? "– (no tokens generated yet)" : `${rate(measured)} (since start)`, "measured");
  fact("Prefill, predicted", rate(plan.predicted.prefill_tokens_per_s));
  fact("Context", `${plan.n_ctx_seq} tokens per slot × ${plan.parallel} slots, KV ${plan.kv_type}`);
  fact("GPU layers", `n_gpu_layers ${plan.n_gpu_layers}, output layer on ${plan.output_device}`);
  parts.push(facts);

  parts.push(el("h3", { id: "layer-map-title" }, "Layers"));
  const strip = el("div", { class: "strip", role: "img",
    "aria-label": "Each layer: top, its attention/SSM weights; bottom, its routed experts; coloured by device" });
  for (const layer of plan.layers) {
    const cell = (name) => el("span", name == null ? { class: "none" } : { style: `--c: ${colors.get(name) ?? CPU_COLOR}` });
    strip.append(el("div", { title: `layer ${layer.index}: ${layer.device} / ${layer.experts_device ?? "dense"}` },
      cell(layer.device), cell(layer.experts_device)));
  }
  parts.push(el("div", { class: "bar" }, ...[...colors].map(([name]) => badge(name)),
    el("small", {}, "each column a layer: top, attention/SSM weights; bottom, routed experts (dashed: none)")), strip);
  const layerRows = plan.layers.map((layer) => el("tr", { "data-layer": layer.index },
    el("th", { scope: "row" }, String(layer.index)),
    el("td", {}, layer.kind === "ssm" ? "SSM (linear attention)" : "attention"),
    el("td", { "data-part": "weights" }, badge(layer.device)),
    el("td", { "data-part": "experts" }, badge(layer.experts_device)),
    el("td", { class: "num" }, formatBytes(layer.weights_bytes)),
    el("td", { class: "num" }, formatBytes(layer.expert_bytes))));
  parts.push(table("Where each layer's weights and routed experts live",
    [["Layer"], ["Kind"], ["Attention/SSM weights"], ["Routed experts"], ["Weights", "num"], ["Experts", "num"]],
    layerRows, { "data-table": "layers", "aria-labelledby": "layer-map-title" }));

  parts.push(el("h3", {}, "Devices"));
  const deviceRows = plan.devices.map((d) => {
    const meter = el("meter", { min: 0, max: d.budget_bytes, value: d.total_bytes, "aria-label": `${d.name} use of its budget` });
    return el("tr", { "data-device": d.name },
      el("td", {}, badge(d.name), " ", d.description ?? d.kind),
      ...["weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "overhead_bytes", "total_bytes", "budget_bytes"]
        .map((k) => el("td", { class: "num" }, formatBytes(d[k]))),
      el("td", {}, meter, ` ${Math.round((100 * d.total_bytes) / d.budget_bytes)} %`));
  });
  parts.push(table("Bytes the plan places on each device",
    [["Device"], ["Weights", "num"], ["KV cache", "num"], ["Recurrent", "num"], ["Compute", "num"], ["Overhead", "num"],
      ["Total", "num"], ["Budget", "num"], ["Used"]],
    deviceRows, { "data-table": "devices" }));

  if (plan.tradeoffs?.length) {
    parts.push(el("h3", {}, "Trade-offs"), el("ul", {}, ...plan.tradeoffs.map((t) => el("li", {}, t))));
  }
  if (report.memory_check?.length) {
    parts.push(el("h3", {}, "Memory: predicted vs allocated"));
    parts.push(table("Each buffer's predicted and allocated size",
      [["Kind"], ["Buffer"], ["Predicted", "num"], ["Allocated", "num"], ["Within tolerance"]],
      report.memory_check.map((m) => el("tr", {}, el("td", {}, m.kind), el("td", {}, m.buffer),
        el("td", { class: "num" }, formatBytes(m.predicted_bytes)), el("td", { class: "num" }, formatBytes(m.reported_bytes)),
        el("td", {}, m.within_tolerance ? "yes" : "no"))),
      { "data-table": "memory" }));
  }
  return parts;
}
