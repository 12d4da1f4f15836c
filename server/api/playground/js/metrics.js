// metrics.js: the live strip of server metrics. Owns parsing Prometheus' text exposition
// format, polling GET /metrics, and turning counters into rates (tokens/s from the
// generation-token counter between two polls). It shows, never stores, what it reads.

import { api } from "./api.js";

// {name: [{labels: {...}, value}]} from Prometheus text (comments and blank lines skipped).
export function parsePrometheus(text) {
  const out = {};
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const raw of text.split("\n")) {
    if (!raw || raw.startsWith("#")) continue;
    const m = raw.match(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(label)) labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
    (out[m[1]] ||= []).push({ labels, value: Number(m[3]) });
  }
  return out;
}

const sum = (metrics, name) => (metrics[name] || []).reduce((a, s) => a + s.value, 0);

const ITEMS = [
  ["tok/s", "tokens per second generated", (m, rate) => (rate === null ? "–" : rate.toFixed(1))],
  ["running", "sequences running", (m) => String(sum(m, "alignserve_num_requests_running"))],
  ["waiting", "sequences waiting", (m) => String(sum(m, "alignserve_num_requests_waiting"))],
  ["KV", "KV cache in use", (m) => `${(100 * sum(m, "alignserve_kv_cache_usage_ratio")).toFixed(1)}%`],
  ["adapters", "LoRA adapters loaded", (m) => String(sum(m, "alignserve_lora_adapters_loaded"))],
  ["requests", "requests served", (m) => String(sum(m, "alignserve_requests_total"))],
];

export class MetricsStrip {
  constructor(el, periodMs = 2000) {
    this.el = el;
    this.periodMs = periodMs;
    this.timer = null;
    this.last = null; // {t, tokens}
    this.cells = {};
    for (const [name, title] of ITEMS) {
      const cell = document.createElement("span");
      cell.className = "metric";
      cell.title = title;
      const k = document.createElement("span");
      k.className = "k";
      k.textContent = name;
      const v = document.createElement("span");
      v.className = "v";
      v.dataset.metric = name;
      v.textContent = "–";
      cell.append(k, " ", v);
      el.append(cell);
      this.cells[name] = v;
    }
  }

  start() {
    this.stop();
    this.poll();
    this.timer = setInterval(() => this.poll(), this.periodMs);
  }

  stop() {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  async poll() {
    let metrics;
    try {
      metrics = parsePrometheus(await api.metrics());
    } catch (exc) {
      this.el.dataset.error = exc.message;
      this.el.title = `metrics unavailable: ${exc.message}`;
      if (exc.status === 401) this.stop();
      return;
    }
    delete this.el.dataset.error;
    this.el.title = "";
    const now = performance.now();
    const tokens = sum(metrics, "alignserve_generation_tokens_total");
    const rate = this.last && now > this.last.t ? ((tokens - this.last.tokens) * 1000) / (now - this.last.t) : null;
    this.last = { t: now, tokens };
    for (const [name, , value] of ITEMS) this.cells[name].textContent = value(metrics, rate);
    this.el.dataset.polled = String(Number(this.el.dataset.polled || 0) + 1);
  }
}
