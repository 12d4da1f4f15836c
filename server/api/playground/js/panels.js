// panels.js: the side panels that change server state. Owns the adapters panel (list with
// roles, load by name + path under --adapter-root, unload) and the RAG panel (list of
// collections and datastores, create a collection, add documents by upload or pasted text).
// Every server error is shown inline in the panel and in the page's alert area.

import { api, ApiError } from "./api.js";
import { el } from "./dom.js";

let uid = 0;
function input(label, attrs = {}) {
  const id = `p-${attrs.name || "in"}-${++uid}`;
  const box = el("input", { id, ...attrs });
  return { box, wrap: el("div", { class: "field" }, el("label", { for: id, text: label }), box) };
}

// A panel's result line: role=status for success, an alert for errors.
function reporter(line, alert) {
  return {
    ok(text) {
      line.className = "result ok";
      line.setAttribute("role", "status");
      line.textContent = text;
    },
    fail(what, exc) {
      const msg = exc instanceof ApiError ? exc.describe() : String(exc);
      line.className = "result error";
      line.setAttribute("role", "alert");
      line.textContent = `${what} failed: ${msg}`;
      alert(`${what} failed: ${msg}`);
    },
  };
}

export class AdapterPanel {
  constructor(root, features, refresh, alert) {
    this.refresh = refresh; // () => Promise: reload /v1/models and what depends on it
    this.list = el("ul", { class: "items", "data-testid": "adapter-list" });
    const line = el("p", { class: "result" });
    this.report = reporter(line, alert);
    const name = input("Adapter name", { name: "lora_name", autocomplete: "off" });
    const path = input("Path (inside --adapter-root)", { name: "lora_path", autocomplete: "off" });
    const load = el("button", { type: "submit", text: "Load adapter" });
    const form = el("form", { class: "panel-form", "aria-label": "Load an adapter" }, name.wrap, path.wrap, load);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      load.disabled = true;
      try {
        const res = await api.loadAdapter(name.box.value.trim(), path.box.value.trim());
        this.report.ok(`Loaded ${res.id} (role ${res.role}, rank ${res.rank}).`);
        await this.refresh();
      } catch (exc) {
        this.report.fail(`Loading ${name.box.value.trim() || "the adapter"}`, exc);
      } finally {
        load.disabled = false;
      }
    });
    root.replaceChildren(this.list);
    if (!features.adapter_loading) {
      root.append(el("p", { class: "note", text: "Runtime loading is off: start the server with --adapter-root DIR." }));
    }
    root.append(form, line);
  }

  show(adapters) {
    this.list.replaceChildren();
    if (!adapters.length) this.list.append(el("li", { class: "note", text: "No adapters loaded." }));
    for (const a of adapters) {
      const unload = el("button", { type: "button", class: "small", text: "Unload", "aria-label": `Unload ${a.id}` });
      unload.addEventListener("click", async () => {
        unload.disabled = true;
        try {
          await api.unloadAdapter(a.id);
          this.report.ok(`Unloaded ${a.id}.`);
          await this.refresh();
        } catch (exc) {
          unload.disabled = false;
          this.report.fail(`Unloading ${a.id}`, exc);
        }
      });
      this.list.append(el("li", { "data-adapter": a.id },
        el("span", { text: `${a.id}` }), el("span", { class: "tag", text: a.role || "?" }), unload));
    }
  }
}

export class RagPanel {
  constructor(root, features, refresh, alert) {
    this.refresh = refresh; // () => Promise: reload /v1/indexes and what depends on it
    root.replaceChildren();
    if (!features.retrieval) {
      root.append(el("p", { class: "note", text: "This server has no retrieval layer." }));
      return;
    }
    this.list = el("ul", { class: "items", "data-testid": "index-list" });
    const line = el("p", { class: "result" });
    this.report = reporter(line, alert);
    const name = input("New collection name", { name: "index_name", autocomplete: "off" });
    const create = el("button", { type: "submit", text: "Create collection" });
    const createForm = el("form", { class: "panel-form", "aria-label": "Create a collection" }, name.wrap, create);
    createForm.addEventListener("submit", (e) => {
      e.preventDefault();
      this.act(`Creating ${name.box.value.trim()}`, async () => {
        const res = await api.createIndex({ name: name.box.value.trim() });
        return `Created ${res.name} (${res.index_type}, ${res.embedder}).`;
      });
    });
    const targetId = `p-target-${++uid}`;
    this.target = el("select", { id: targetId });
    const files = input("Files (.txt, .md, .jsonl)", { name: "files", type: "file", multiple: "", accept: ".txt,.md,.jsonl" });
    const title = input("Or paste: title", { name: "doc_title", autocomplete: "off" });
    const textId = `p-text-${++uid}`;
    const text = el("textarea", { id: textId, rows: "3" });
    const add = el("button", { type: "submit", text: "Add documents" });
    const addForm = el("form", { class: "panel-form", "aria-label": "Add documents" },
      el("div", { class: "field" }, el("label", { for: targetId, text: "Collection" }), this.target),
      files.wrap, title.wrap, el("div", { class: "field" }, el("label", { for: textId, text: "Text" }), text), add);
    addForm.addEventListener("submit", (e) => {
      e.preventDefault();
      const index = this.target.value;
      this.act(`Adding documents to ${index || "a collection"}`, async () => {
        let res;
        if (files.box.files.length) res = await api.uploadFiles(index, [...files.box.files]);
        else res = await api.addDocuments(index, [{ title: title.box.value.trim(), text: text.value }]);
        files.box.value = "";
        text.value = "";
        return `Added ${res.added_documents} documents (${res.added_passages} passages) to ${res.index}.`;
      });
    });
    root.append(this.list, createForm, addForm, line);
  }

  async act(what, fn) {
    try {
      this.report.ok(await fn());
      await this.refresh();
    } catch (exc) {
      this.report.fail(what, exc);
    }
  }

  show(stores) {
    if (!this.list) return;
    this.list.replaceChildren();
    if (!stores.length) this.list.append(el("li", { class: "note", text: "No collections yet." }));
    for (const s of stores) {
      const size = s.kind === "collection" ? `${s.num_documents} docs, ${s.num_passages} passages` : s.kind;
      this.list.append(el("li", { "data-index": s.name }, el("span", { text: s.name }), el("span", { class: "tag", text: size })));
    }
    const keep = this.target.value;
    this.target.replaceChildren(...stores.filter((s) => s.kind === "collection").map((s) => new Option(s.name, s.name)));
    if ([...this.target.options].some((o) => o.value === keep)) this.target.value = keep;
  }
}
