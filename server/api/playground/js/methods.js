// methods.js: the sampling fields and the test-time method switches, built from what
// GET /v1/capabilities reports (a method the server lacks never appears). Owns which
// methods are on, turning off the ones the server says conflict, the adapter / store
// pickers those options need, and turning all of it into request body fields.

import { control } from "./form.js";

// Display names only; which methods exist, and their options, come from the server.
const LABELS = {
  best_of_n: "Best-of-N", dola: "DoLa", genarm: "GenARM", search: "Block search",
  rain: "RAIN", rag: "RAG", knn_lm: "kNN-LM",
};

export class Methods {
  constructor(samplingEl, methodsEl, notify) {
    this.samplingEl = samplingEl;
    this.methodsEl = methodsEl;
    this.notify = notify;
    this.caps = null;
    this.sampling = {};
    this.methods = {}; // name -> {toggle, fields: {field: control}, box}
    this.refills = {}; // field path -> [fill(options)]
    this.adapters = [];
    this.stores = [];
  }

  picker(path, schema) {
    const caps = this.caps;
    if (path in caps.adapter_fields) {
      const role = caps.adapter_fields[path];
      return { options: this.adapterOptions(role, schema), note: role ? `an adapter with role "${role}"` : "an adapter" };
    }
    if (path in caps.store_fields) return { options: this.storeOptions(caps.store_fields[path]), note: null };
    return null;
  }

  adapterOptions(role, schema) {
    const named = this.adapters.filter((a) => !role || a.role === role).map((a) => [a.id, `${a.id} (${a.role})`]);
    if (schema && schema.default) named.unshift([schema.default, schema.default]);
    return named;
  }

  storeOptions(kind) {
    return this.stores.filter((s) => s.kind === kind).map((s) => [s.name, `${s.name} (${s.num_documents ?? "?"} docs)`]);
  }

  onRefill(path, fill) {
    (this.refills[path] ||= []).push(fill);
  }

  build(caps) {
    this.caps = caps;
    this.refills = {};
    this.samplingEl.replaceChildren();
    this.methodsEl.replaceChildren();
    const ctx = { picker: (p, s) => this.picker(p, s), onRefill: (p, f) => this.onRefill(p, f) };
    this.sampling = {};
    for (const [name, schema] of Object.entries(caps.sampling)) {
      this.sampling[name] = control(name, schema, ctx);
      this.samplingEl.append(this.sampling[name].el);
    }
    if (this.sampling.max_tokens) this.sampling.max_tokens.set(64);
    this.methods = {};
    for (const [name, info] of Object.entries(caps.methods)) {
      const box = document.createElement("fieldset");
      box.className = "method";
      box.dataset.method = name;
      const legend = document.createElement("legend");
      const toggle = document.createElement("input");
      toggle.type = "checkbox";
      toggle.id = `use-${name}`;
      toggle.dataset.method = name;
      const lab = document.createElement("label");
      lab.htmlFor = toggle.id;
      lab.textContent = LABELS[name] || name;
      legend.append(toggle, lab);
      const body = document.createElement("div");
      body.className = "method-fields";
      body.hidden = true;
      const notes = [];
      if (!info.streamable) notes.push("not streamed");
      if (!info.logprobs) notes.push("no token logprobs");
      if (notes.length) {
        const p = document.createElement("p");
        p.className = "note";
        p.textContent = `Server: ${notes.join(", ")}.`;
        body.append(p);
      }
      const fields = {};
      for (const [field, schema] of Object.entries(info.fields)) {
        fields[field] = control(field, schema, ctx);
        body.append(fields[field].el);
      }
      // Prefill the switch field with the smallest value the server accepts (not a name).
      for (const [field, value] of Object.entries(info.switch)) {
        if (typeof value !== "object" && typeof value !== "string") fields[field].set(value);
        else if (typeof value === "string" && !(field in caps.adapter_fields)) fields[field].set(value);
      }
      toggle.addEventListener("change", () => this.toggled(name));
      box.append(legend, body);
      this.methodsEl.append(box);
      this.methods[name] = { toggle, fields, body, info };
    }
    if (!Object.keys(caps.methods).length) this.methodsEl.textContent = "This server reports no test-time methods.";
  }

  toggled(name) {
    const m = this.methods[name];
    this.show(name, m.toggle.checked);
    if (!m.toggle.checked) return;
    for (const [a, b] of this.caps.conflicts) {
      const other = a === name ? b : b === name ? a : null;
      if (other && this.methods[other]?.toggle.checked) {
        this.methods[other].toggle.checked = false;
        this.show(other, false);
        this.notify(`${LABELS[other] || other} turned off: the server cannot combine it with ${LABELS[name] || name}.`);
      }
    }
  }

  show(name, on) {
    const m = this.methods[name];
    m.body.hidden = !on;
    m.body.parentElement.classList.toggle("on", on);
  }

  setLists(adapters, stores) {
    this.adapters = adapters;
    this.stores = stores;
    for (const [path, fills] of Object.entries(this.refills)) {
      const opts = path in this.caps.adapter_fields
        ? this.adapterOptions(this.caps.adapter_fields[path], null)
        : this.storeOptions(this.caps.store_fields[path]);
      if (path === "rain.evaluator") opts.unshift(["self", "self"]);
      fills.forEach((fill) => fill(opts));
    }
  }

  active() {
    return Object.keys(this.methods).filter((n) => this.methods[n].toggle.checked);
  }

  // {fields, stream, logprobs}: what the body carries for the methods and sampling set.
  requestFields() {
    const fields = {};
    for (const [name, c] of Object.entries(this.sampling)) {
      const v = c.read();
      if (v !== undefined) fields[name] = v;
    }
    const active = this.active();
    for (const name of active) {
      for (const [field, c] of Object.entries(this.methods[name].fields)) {
        const v = c.read();
        if (v !== undefined) fields[field] = v;
      }
    }
    return {
      fields,
      streamable: active.every((n) => this.methods[n].info.streamable),
      logprobs: active.every((n) => this.methods[n].info.logprobs),
    };
  }
}
