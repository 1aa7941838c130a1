// The live dashboard: GET /ui/api/stats (admin) once a second, its numbers as cards and its history (the
// last five minutes) as small SVG charts drawn here: no chart library.

import { addStyle, el } from "./dom.js";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";

const STYLE = `
.dash h2 { margin: 0 0 .3em; font-size: 1.2em; }
.dash .status { color: var(--muted, #666); margin: 0 0 .8em; }
.dash .cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(12em, 1fr)); gap: .6em; margin: 0 0 1em; }
.dash .card { background: #fff; border: 1px solid var(--line, #ddd); border-radius: 8px; padding: .5em .8em; margin: 0; }
.dash .card dt { font-size: .8em; color: var(--muted, #666); }
.dash .card dd { margin: .1em 0 0; font-size: 1.35em; font-variant-numeric: tabular-nums; }
.dash .card dd small { font-size: .6em; color: var(--muted, #666); }
.dash .charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(22em, 1fr)); gap: .8em; }
.dash figure { margin: 0; background: #fff; border: 1px solid var(--line, #ddd); border-radius: 8px; padding: .5em .8em; }
.dash figcaption { font-size: .85em; color: var(--muted, #666); display: flex; gap: 1em; flex-wrap: wrap; }
.dash figcaption .key::before { content: ""; display: inline-block; width: .8em; height: .25em; margin-right: .3em; vertical-align: middle; background: var(--c); }
.dash svg { width: 100%; height: 7em; display: block; }
.dash svg .grid { stroke: var(--line, #ddd); stroke-width: 1; }
.dash svg text { font-size: 10px; fill: var(--muted, #666); }
.dash svg polyline { fill: none; stroke-width: 1.5; vector-effect: non-scaling-stroke; }
`;


export function formatBytes(bytes) {
  if (bytes == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function formatSeconds(seconds) {
  if (seconds == null) return "–";
  return seconds < 1 ? `${(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms` : `${seconds.toFixed(2)} s`;
}

function formatRate(rate) {
  return rate == null ? "–" : rate.toFixed(rate < 10 ? 1 : 0);
}

function percent(ratio) {
  return ratio == null ? "–" : `${Math.round(ratio * 100)} %`;
}

// One card: a <dl> pair whose value cell carries data-stat, for the tests and for updates.
function card(grid, key, label) {
  const value = el("dd", { "data-stat": key }, "–");
  grid.append(el("div", { class: "card" }, el("dt", {}, label), value));
  return value;
}

function setCard(node, main, detail) {
  node.replaceChildren(main);
  if (detail) node.append(" ", el("small", {}, detail));
}

// A line chart of several series over the last `seconds` (x: seconds ago, 0 at the right edge).
function lineChart(title, series) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 300 100");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title);
  const caption = el("figcaption", {}, el("strong", {}, title));
  for (const s of series) caption.append(el("span", { class: "key", style: `--c: ${s.color}` }, s.label));
  const figure = el("figure", { "data-chart": title }, caption, svg);
  return {
    figure,
    draw(points, maxSeconds) {
      // the x axis: the history there is, at least a minute, at most what the server keeps
      const seconds = Math.min(maxSeconds, Math.max(60, -(points[0]?.t ?? 0)));
      const max = Math.max(1e-9, ...series.flatMap((s) => points.map((p) => p[s.key] ?? 0)));
      const top = niceCeiling(max);
      const children = [];
      for (const fraction of [0, 0.5, 1]) {
        const y = 95 - fraction * 85;
        const line = document.createElementNS(SVG, "line");
        Object.entries({ x1: 0, x2: 300, y1: y, y2: y, class: "grid" }).forEach(([k, v]) => line.setAttribute(k, v));
        children.push(line);
      }
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("x", 2);
      label.setAttribute("y", 9);
      label.textContent = series[0].format(top);
      const since = document.createElementNS(SVG, "text");
      since.setAttribute("x", 2);
      since.setAttribute("y", 92);
      since.textContent = spanText(seconds);
      children.push(label, since);
      for (const s of series) {
        const line = document.createElementNS(SVG, "polyline");
        line.setAttribute("stroke", s.color);
        line.setAttribute(
          "points",
          points
            .filter((p) => p[s.key] != null)
            .map((p) => `${(300 * (1 + p.t / seconds)).toFixed(1)},${(95 - (85 * p[s.key]) / top).toFixed(1)}`)
            .join(" "),
        );
        children.push(line);
      }
      svg.replaceChildren(...children);
      const last = points.at(-1);
      svg.setAttribute(
        "aria-label",
        `${title}, last ${spanText(seconds).replace("−", "")}` +
          (last ? `: now ${series.map((s) => `${s.label} ${s.format(last[s.key] ?? 0)}`).join(", ")}` : ""),
      );
    },
  };
}

function spanText(seconds) {
  return seconds < 120 ? `−${Math.round(seconds)} s` : `−${Math.round(seconds / 60)} min`;
}

function niceCeiling(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

export function mount(container, api) {
  if (container.dataset.mounted) return container._unmount;
  container.dataset.mounted = "dashboard";
  addStyle("dashboard-style", STYLE);

  const status = el("p", { class: "status", role: "status" }, "Loading…");
  const error = el("p", { class: "error", role: "alert" });
  const grid = el("dl", { class: "cards" });
  const cards = {
    tps: card(grid, "tokens-per-second", "Tokens/s (generated)"),
    ttft: card(grid, "ttft", "Time to first token p50 / p95 (1 min)"),
    itl: card(grid, "itl", "Inter-token latency p50 / p95 (1 min)"),
    slots: card(grid, "slots", "Slots busy"),
    queue: card(grid, "queue", "Queue (waiting)"),
    tokens: card(grid, "generated-tokens", "Tokens generated (total)"),
    cache: card(grid, "prompt-cache", "Prompt cache hits / misses"),
    kv: card(grid, "kv-cache", "KV cache in use"),
    gpu: card(grid, "gpu", "GPU memory / utilisation"),
    ram: card(grid, "ram", "RAM used (server process)"),
  };
  const rate = (v) => formatRate(v);
  const count = (v) => String(Math.round(v));
  const charts = [
    [lineChart("Tokens per second", [{ key: "tokens_per_second", label: "tokens/s", color: "#2457c5", format: rate }]), null],
    [
      lineChart("Slots and queue", [
        { key: "slots_busy", label: "slots busy", color: "#1a7f37", format: count },
        { key: "queue", label: "waiting", color: "#bf3989", format: count },
      ]),
      null,
    ],
    [lineChart("RAM used", [{ key: "ram_used_bytes", label: "RAM", color: "#9a6700", format: formatBytes }]), null],
  ];
  container.replaceChildren(
    el("div", { class: "dash" }, el("h2", {}, "Dashboard"), status, error, grid,
      el("div", { class: "charts" }, ...charts.map(([c]) => c.figure))),
  );

  let timer = null;
  let stopped = false;

  function render(stats) {
    status.textContent = `${stats.model}: ${stats.status} · updated ${new Date().toLocaleTimeString()}`;
    setCard(cards.tps, formatRate(stats.tokens_per_second));
    setCard(cards.ttft, `${formatSeconds(stats.ttft_seconds.p50)} / ${formatSeconds(stats.ttft_seconds.p95)}`,
      `${stats.ttft_seconds.count} req`);
    setCard(cards.itl,
      `${formatSeconds(stats.inter_token_latency_seconds.p50)} / ${formatSeconds(stats.inter_token_latency_seconds.p95)}`);
    setCard(cards.slots, `${stats.slots.busy} / ${stats.slots.total}`, `${stats.requests_running} running`);
    setCard(cards.queue, String(stats.queue));
    setCard(cards.tokens, String(stats.generated_tokens));
    setCard(cards.cache, `${stats.prompt_cache.hits} / ${stats.prompt_cache.misses}`);
    setCard(cards.kv, percent(stats.kv_cache_usage));
    if (stats.gpus.length === 0) setCard(cards.gpu, "no GPU");
    else {
      setCard(cards.gpu, stats.gpus.map((g) => `${formatBytes(g.memory_used_bytes)} / ${formatBytes(g.memory_total_bytes)}`).join(", "),
        stats.gpus.map((g) => `${g.name}: ${percent(g.utilization_ratio)}`).join(", "));
    }
    setCard(cards.ram, `${formatBytes(stats.ram.used_bytes)} / ${formatBytes(stats.ram.total_bytes)}`,
      `process ${formatBytes(stats.ram.process_bytes)}`);
    for (const [chart] of charts) chart.draw(stats.history.points, stats.history.seconds);
  }

  async function poll() {
    timer = null;
    if (stopped || !container.isConnected) return;
    if (!container.hidden) {
      try {
        render(await api.get("/ui/api/stats"));
        error.textContent = "";
      } catch (exc) {
        error.textContent = `Could not read /ui/api/stats: ${exc.message ?? exc}`;
      }
    }
    if (!stopped) timer = setTimeout(poll, POLL_MS);
  }

  poll();
  container._unmount = () => {
    stopped = true;
    if (timer) clearTimeout(timer);
    delete container.dataset.mounted;
  };
  return container._unmount;
}
