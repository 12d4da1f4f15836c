// tokens.js: an assistant reply drawn token by token. Owns the token spans (appended as the
// stream arrives), their decorations once the `alignment` report is in (DoLa: background by
// the premature layer chosen; GenARM: marked where the guided token differs from the base
// model's top token; RAG: citation markers linked to their passages) and the tooltip that
// shows a token's logprob and top alternatives on hover or keyboard focus.

const fmt = (x) => (x === null || x === undefined ? "–" : Number(x).toFixed(3));
const shown = (s) => JSON.stringify(s ?? "");

export class TokenView {
  constructor(el) {
    this.el = el; // a container whose children are the token spans, in order
    this.tokens = []; // {text, logprob, top, span}
  }

  // One piece of a reply: with logprobs, one entry per token; without, one text delta.
  add(text, lp = null) {
    const span = document.createElement("span");
    span.className = /^<\|[^|]*\|>$/.test(text) ? "tok special" : "tok";
    span.textContent = text;
    const token = { text, logprob: lp ? lp.logprob : null, top: lp ? lp.top_logprobs || [] : [], span, notes: [] };
    span.dataset.i = String(this.tokens.length);
    if (lp) span.tabIndex = 0;
    this.tokens.push(token);
    this.el.append(span);
  }

  addChoice(choice, text) {
    const entries = choice.logprobs && choice.logprobs.content;
    if (entries && entries.length) {
      // NOTE: token strings can split a multi-byte character; the delta text is the truth
      // for what is shown only when there are no logprobs.
      for (const e of entries) this.add(e.token, e);
    } else if (text) {
      this.add(text);
    }
  }

  text() {
    return this.tokens.map((t) => t.text).join("");
  }

  // DoLa: tint token i by premature_layers[0][i]; returns the legend's layer -> class.
  tintLayers(report) {
    const layers = (report.premature_layers || [])[0] || [];
    const candidates = report.candidate_layers || [...new Set(layers)];
    layers.forEach((layer, i) => {
      const t = this.tokens[i];
      if (!t) return;
      const slot = Math.max(0, candidates.indexOf(layer)) % 8;
      t.span.classList.add("dola", `layer-${slot}`);
      t.span.dataset.layer = String(layer);
      t.notes.push(`DoLa premature layer ${layer}`);
    });
    return candidates.map((layer, i) => [layer, `layer-${i % 8}`]);
  }

  // GenARM: mark tokens whose guided pick is not the base model's top token.
  markGuided(report) {
    const tops = (report.base_top || [])[0] || [];
    let changed = 0;
    tops.forEach((top, i) => {
      const t = this.tokens[i];
      if (!t || !top || top.differs === null) return;
      t.notes.push(top.differs ? `GenARM changed it: base top was ${shown(top.token)}` : "GenARM: same as base top");
      if (top.differs) {
        changed += 1;
        t.span.classList.add("guided");
        t.span.dataset.baseTop = top.token;
      }
    });
    return changed;
  }

  // RAG: tokens inside a "[n]" marker become links to passage anchors `${prefix}${n}`.
  linkCitations(prefix, count) {
    const text = this.text();
    const starts = [];
    let pos = 0;
    for (const t of this.tokens) {
      starts.push(pos);
      pos += t.text.length;
    }
    for (const m of text.matchAll(/\[(\d+(?:\s*,\s*\d+)*)\]/g)) {
      const first = Number(m[1].split(",")[0]);
      if (first < 1 || first > count) continue;
      const end = m.index + m[0].length;
      this.tokens.forEach((t, i) => {
        if (starts[i] < end && starts[i] + t.text.length > m.index) {
          t.span.classList.add("cite");
          t.span.dataset.cite = String(first);
          t.span.setAttribute("role", "link");
          t.span.tabIndex = 0;
          t.span.setAttribute("aria-label", `citation ${m[1]}: go to passage`);
          const go = () => document.getElementById(`${prefix}${first}`)?.scrollIntoView({ block: "nearest" });
          t.span.addEventListener("click", go);
          t.span.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
        }
      });
    }
  }
}

// One tooltip for the page: filled from the hovered / focused token's data.
export function installTooltip(tip, views) {
  const show = (ev) => {
    const span = ev.target.closest && ev.target.closest(".tok");
    if (!span) return;
    const view = views.get(span.parentElement);
    const t = view && view.tokens[Number(span.dataset.i)];
    if (!t || (t.logprob === null && !t.notes.length)) return;
    tip.replaceChildren();
    const head = document.createElement("div");
    head.className = "tip-head";
    head.textContent = `${shown(t.text)}  logprob ${fmt(t.logprob)}`
      + (t.logprob !== null ? `  p ${Math.exp(t.logprob).toFixed(3)}` : "");
    tip.append(head);
    if (t.top.length) {
      const table = document.createElement("table");
      for (const alt of t.top) {
        const row = table.insertRow();
        row.insertCell().textContent = shown(alt.token);
        row.insertCell().textContent = fmt(alt.logprob);
        if (alt.token === t.text) row.className = "picked";
      }
      tip.append(table);
    }
    for (const n of t.notes) {
      const p = document.createElement("div");
      p.textContent = n;
      tip.append(p);
    }
    tip.hidden = false;
    const r = span.getBoundingClientRect();
    const width = Math.min(280, window.innerWidth - 16);
    tip.style.maxWidth = `${width}px`;
    tip.style.left = `${Math.max(8, Math.min(r.left, window.innerWidth - width - 8)) + window.scrollX}px`;
    tip.style.top = `${r.bottom + 6 + window.scrollY}px`;
    span.setAttribute("aria-describedby", tip.id);
  };
  const hide = (ev) => {
    if (ev.target.closest && ev.target.closest(".tok")) tip.hidden = true;
  };
  document.addEventListener("mouseover", show);
  document.addEventListener("focusin", show);
  document.addEventListener("mouseout", hide);
  document.addEventListener("focusout", hide);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") tip.hidden = true; });
}
