// api.js: every HTTP call the page makes. Owns the API key (sessionStorage: this tab only,
// never localStorage or a cookie), JSON requests whose failures become ApiError with the
// server's OpenAI-shaped message, and the SSE reader for streamed chat completions.
// It does not touch the DOM.

const KEY_SLOT = "alignserve.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_SLOT) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_SLOT, key);
  else sessionStorage.removeItem(KEY_SLOT);
}

export class ApiError extends Error {
  constructor(status, message, param = null, code = null) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }

  describe() {
    const where = this.param ? ` (${this.param})` : "";
    return `${this.status || "network"}: ${this.message}${where}`;
  }
}

function headers(extra = {}) {
  const out = { ...extra };
  const key = getKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorFrom(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    /* not JSON: fall back to the status text */
  }
  const err = (body && body.error) || {};
  let message = err.message || res.statusText || "request failed";
  if (!err.message && body && body.detail) message = JSON.stringify(body.detail);
  return new ApiError(res.status, message, err.param || null, err.code || null);
}

async function send(method, path, { json, form, signal, text = false } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser sets the multipart boundary
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, `cannot reach the server: ${exc.message}`);
  }
  if (!res.ok) throw await errorFrom(res);
  return text ? res.text() : res.json();
}

export const api = {
  capabilities: () => send("GET", "/v1/capabilities"),
  models: () => send("GET", "/v1/models"),
  indexes: () => send("GET", "/v1/indexes"),
  metrics: () => send("GET", "/metrics", { text: true }),
  chat: (body, signal) => send("POST", "/v1/chat/completions", { json: body, signal }),
  loadAdapter: (name, path) => send("POST", "/v1/load_lora_adapter", { json: { lora_name: name, lora_path: path } }),
  unloadAdapter: (name) => send("POST", "/v1/unload_lora_adapter", { json: { lora_name: name } }),
  createIndex: (body) => send("POST", "/v1/indexes", { json: body }),
  deleteIndex: (name) => send("DELETE", `/v1/indexes/${encodeURIComponent(name)}`),
  addDocuments: (name, documents) =>
    send("POST", `/v1/indexes/${encodeURIComponent(name)}/documents`, { json: { documents } }),
  uploadFiles: (name, files) => {
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    return send("POST", `/v1/indexes/${encodeURIComponent(name)}/documents`, { form });
  },
  search: (name, body) => send("POST", `/v1/indexes/${encodeURIComponent(name)}/search`, { json: body }),
};

// Yields each parsed SSE chunk of a streamed chat completion; an error event (sent after the
// 200 when the server hits a deadline or dies) is thrown as ApiError.
export async function* streamChat(body, signal) {
  let res;
  try {
    res = await fetch("/v1/chat/completions", {
      method: "POST", signal, body: JSON.stringify(body),
      headers: headers({ "Content-Type": "application/json" }),
    });
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, `cannot reach the server: ${exc.message}`);
  }
  if (!res.ok) throw await errorFrom(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        throw new ApiError(chunk.error.status || 500, chunk.error.message, chunk.error.param, chunk.error.code);
      }
      yield chunk;
    }
  }
}
