// main.js: wires the page together. Owns connecting (the key form, GET /v1/capabilities, a
// 401 asking for the key), the model picker, the page's alert area, and refreshing the
// lists (adapters, collections) the other modules show. Each module owns its own part.

import { api, ApiError, getKey, setKey } from "./api.js";
import { Chat } from "./chat.js";
import { MetricsStrip } from "./metrics.js";
import { Methods } from "./methods.js";
import { AdapterPanel, RagPanel } from "./panels.js";
import { installTooltip } from "./tokens.js";

const $ = (id) => document.getElementById(id);
const alerts = $("alerts");

function alert(message) {
  const item = document.createElement("div");
  item.className = "alert-item";
  item.textContent = message;
  const close = document.createElement("button");
  close.type = "button";
  close.className = "small";
  close.textContent = "Dismiss";
  close.setAttribute("aria-label", `Dismiss: ${message}`);
  close.addEventListener("click", () => item.remove());
  item.append(close);
  alerts.append(item);
  while (alerts.children.length > 4) alerts.firstChild.remove();
}

function note(message) {
  $("notes").textContent = message;
}

const state = { caps: null, adapters: [], stores: [] };
const methods = new Methods($("sampling"), $("methods"), note);
const views = new Map();
const metrics = new MetricsStrip($("metrics"));
let adapterPanel = null;
let ragPanel = null;
new Chat({ log: $("log"), form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  clear: $("clear"), streamBox: $("stream"), logprobsBox: $("logprobs") }, methods, () => $("model").value, alert, views);
installTooltip($("tip"), views);

async function refreshModels() {
  const res = await api.models();
  const select = $("model");
  const keep = select.value;
  select.replaceChildren();
  state.adapters = res.data.filter((m) => m.parent);
  for (const m of res.data) {
    const label = m.parent ? `${m.id} (adapter, ${m.role || "?"})` : `${m.id} (base)`;
    select.append(new Option(label, m.id));
  }
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  adapterPanel && adapterPanel.show(state.adapters);
  methods.setLists(state.adapters, state.stores);
}

async function refreshStores() {
  if (!state.caps.features.retrieval) return;
  state.stores = (await api.indexes()).data;
  ragPanel && ragPanel.show(state.stores);
  methods.setLists(state.adapters, state.stores);
}

async function connect() {
  const status = $("conn");
  status.textContent = "connecting…";
  try {
    state.caps = await api.capabilities();
  } catch (exc) {
    metrics.stop();
    if (exc instanceof ApiError && exc.status === 401) {
      status.textContent = getKey() ? "The API key was refused." : "This server needs an API key.";
      $("api-key").focus();
    } else {
      status.textContent = `Cannot connect: ${exc.message}`;
    }
    document.body.dataset.connected = "false";
    return;
  }
  methods.build(state.caps);
  adapterPanel = new AdapterPanel($("adapters-panel"), state.caps.features, () => refreshModels().catch(showError), alert);
  ragPanel = new RagPanel($("rag-panel"), state.caps.features, () => refreshStores().catch(showError), alert);
  try {
    await refreshModels();
    await refreshStores();
  } catch (exc) {
    showError(exc);
  }
  status.textContent = `connected to ${state.caps.model}`;
  document.body.dataset.connected = "true";
  metrics.start();
}

function showError(exc) {
  alert(exc instanceof ApiError ? exc.describe() : String(exc));
}

// On a narrow screen the conversation comes first; the long sampling list starts folded.
if (window.matchMedia("(max-width: 800px)").matches) $("sampling-details").open = false;
$("api-key").value = getKey();
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  setKey($("api-key").value.trim());
  connect();
});
connect();
