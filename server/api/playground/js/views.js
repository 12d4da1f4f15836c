// views.js: the "what ran" panel under a reply, one section per entry of the response's
// `alignment` object: best-of-N candidates with reward bars (chosen marked), block search
// and RAIN as small trees (chosen branches, rewound / pruned ones), RAG passages with the
// answer's citations, kNN-LM weights, DoLa / GenARM legends; anything else as JSON.
// Token-level decorations live in tokens.js.

import { api } from "./api.js";
import { el } from "./dom.js";

const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(d));

function section(title, testid) {
  const box = el("section", { class: "align", "data-testid": testid });
  box.append(el("h3", { text: title }));
  return box;
}

function bar(value, lo, hi, label) {
  const frac = hi > lo ? (value - lo) / (hi - lo) : 1;
  const outer = el("span", { class: "bar", role: "img", "aria-label": label });
  const inner = el("span", { class: "fill" });
  inner.style.width = `${Math.round(6 + 94 * frac)}%`;
  outer.append(inner);
  return outer;
}

function bestOfN(r) {
  const box = section(`Best-of-N: ${r.n} candidates, scored by ${r.scorer}`, "best-of-n");
  const key = r.scorer === "mean_logprob" ? "mean_logprob" : "reward";
  const values = r.candidates.map((c) => c[key]).filter((v) => Number.isFinite(v));
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const list = el("ol", { class: "cands" });
  for (const c of r.candidates) {
    const chosen = r.chosen.includes(c.index);
    const item = el("li", { class: chosen ? "cand chosen" : "cand", "data-testid": "candidate",
      "data-reward": String(c[key]), "data-chosen": String(chosen) });
    item.append(
      el("span", { class: "cand-head" },
        el("strong", { text: `#${c.index}` }),
        chosen ? el("span", { class: "badge", text: "chosen" }) : null,
        bar(c[key], lo, hi, `${key} ${fmt(c[key])}`),
        el("span", { class: "num", "data-testid": "reward", text: fmt(c[key]) })),
      el("span", { class: "cand-text", text: c.text }));
    list.append(item);
  }
  box.append(list, el("p", { class: "note", text: `KL bound log N − (N−1)/N = ${fmt(r.kl_bound)}` }));
  return box;
}

function treeNode(label, cls, testid) {
  return el("li", { class: `node ${cls}`, "data-testid": testid }, el("span", { class: "node-label", text: label }));
}

function blockSearch(r) {
  const box = section(`Block search: ${r.num_blocks} blocks, beam ${r.beam_width}, scored by ${r.reward_model}`,
    "search-tree");
  const root = el("ul", { class: "tree" });
  let parent = treeNode("prompt", "root", "tree-root");
  root.append(parent);
  for (const [b, block] of r.blocks.entries()) {
    const kids = el("ul");
    let next = null;
    block.candidates.forEach((c, i) => {
      const chosen = i === block.chosen;
      const node = treeNode(`${JSON.stringify(c.text)}  reward ${fmt(c.reward)}${chosen ? "  ✓ kept" : "  pruned"}`,
        chosen ? "chosen" : "pruned", `block-${b}`);
      kids.append(node);
      if (chosen) next = node;
    });
    parent.append(kids);
    parent = next || parent;
  }
  box.append(root);
  return box;
}

function rain(r) {
  const box = section(`RAIN: ${r.iterations} iterations, ${r.rewinds} rewinds, evaluator ${r.evaluator}`, "rain-tree");
  const root = el("ul", { class: "tree" });
  let parent = treeNode("prompt", "root", "tree-root");
  root.append(parent);
  for (const [s, step] of r.steps.entries()) {
    const kids = el("ul");
    let next = null;
    step.visits.forEach((visits, i) => {
      const chosen = i === step.chosen;
      const rewound = !chosen && visits > 0;
      const what = chosen ? JSON.stringify(step.text) : `option ${i + 1}`;
      const tag = chosen ? "  ✓ committed" : rewound ? "  ↺ rewound" : "  unvisited";
      const node = treeNode(`${what}  visits ${visits}, value ${fmt(step.values[i], 2)}${tag}`,
        chosen ? "chosen" : rewound ? "rewound" : "pruned", `rain-${s}`);
      kids.append(node);
      if (chosen) next = node;
    });
    parent.append(kids);
    parent = next || parent;
  }
  box.append(root, el("p", { class: "note",
    text: `${r.num_generated_tokens} tokens generated, ${r.num_evaluations} evaluations (${r.mode})` }));
  return box;
}

function rag(r, prefix, query) {
  const box = section(`RAG: ${r.passages.length} passages from “${r.index}” (${r.mode})`, "rag");
  const cited = new Set((r.citations || []).map((c) => c.marker));
  const list = el("ol", { class: "passages" });
  const texts = {};
  for (const p of r.passages) {
    const item = el("li", { id: `${prefix}${p.marker}`, class: cited.has(p.marker) ? "passage cited" : "passage",
      "data-testid": "passage" },
      el("span", { class: "cand-head" }, el("strong", { text: `[${p.marker}]` }),
        el("span", { text: `${p.title || p.doc_id}  score ${fmt(p.score)}` }),
        cited.has(p.marker) ? el("span", { class: "badge", text: "cited" }) : null));
    texts[p.id] = el("span", { class: "cand-text" });
    item.append(texts[p.id]);
    list.append(item);
  }
  const cites = (r.citations || []).map((c) => el("a", { href: `#${prefix}${c.marker}`, text: `[${c.marker}]` }));
  const line = el("p", { class: "note" }, cites.length ? "Cited: " : "No citations in the answer.");
  cites.forEach((a, i) => line.append(i ? ", " : "", a));
  if ((r.invalid_citations || []).length) line.append(`  (markers naming no passage: ${r.invalid_citations.join(", ")})`);
  box.append(line, list);
  // The report names passages by id; their text comes from the same search the server ran.
  if (query && r.passages.length) {
    api.search(r.index, { query, top_k: r.top_k }).then((res) => {
      for (const hit of res.data) if (texts[hit.id]) texts[hit.id].textContent = hit.text;
    }).catch(() => {});
  }
  return box;
}

function knnLm(r) {
  const box = section(`kNN-LM: datastore “${r.datastore}”, k ${r.k}, λ ${r.lambda}`, "knn-lm");
  box.append(el("p", { text: `kNN weight of the sampled token: mean ${fmt(r.mean_knn_weight)}, max `
    + `${fmt(r.max_knn_weight)}; ${r.tokens_mostly_knn} of ${r.tokens} tokens mostly from the datastore.` }));
  return box;
}

function legend(title, testid, entries) {
  const box = section(title, testid);
  const list = el("ul", { class: "legend" });
  for (const [text, cls] of entries) list.append(el("li", {}, el("span", { class: `swatch ${cls}` }), text));
  box.append(list);
  return box;
}

// The panel for one reply; `tokens` is its TokenView, `prefix` an id prefix for anchors.
export function renderAlignment(alignment, tokens, prefix, query) {
  const panel = el("div", { class: "alignment", "data-testid": "alignment" });
  for (const [name, report] of Object.entries(alignment || {})) {
    if (name === "best_of_n") panel.append(bestOfN(report));
    else if (name === "search") panel.append(blockSearch(report));
    else if (name === "rain") panel.append(rain(report));
    else if (name === "rag") {
      panel.append(rag(report, prefix, query));
      tokens.linkCitations(prefix, report.passages.length);
    } else if (name === "knn_lm") panel.append(knnLm(report));
    else if (name === "dola") {
      const classes = tokens.tintLayers(report);
      panel.append(legend("DoLa: tokens tinted by the premature layer chosen", "dola-legend",
        classes.map(([layer, cls]) => [`layer ${layer}`, cls])));
    } else if (name === "genarm") {
      const changed = tokens.markGuided(report);
      panel.append(legend(`GenARM (${report.reward_model}, α ${report.alpha}): ${changed} of ${report.guided_tokens} `
        + "guided tokens differ from the base model's top token", "genarm-legend", [["differs from base top", "guided"]]));
    }
  }
  const raw = el("details", { class: "raw" }, el("summary", { text: "alignment JSON" }),
    el("pre", { text: JSON.stringify(alignment, null, 2) }));
  panel.append(raw);
  return panel;
}
