// chat.js: the conversation. Owns the message history, sending a turn (streamed when every
// switched-on method streams, with token logprobs when every one reports them), drawing the
// reply as it arrives, attaching the alignment panel when the response ends, and stopping a
// request. Errors from the server are shown in the reply and in the page's alert area.

import { api, ApiError, streamChat } from "./api.js";
import { TokenView } from "./tokens.js";
import { renderAlignment } from "./views.js";

const DEFAULT_TOP_LOGPROBS = 5;

export class Chat {
  constructor({ log, form, prompt, send, stop, clear, streamBox, logprobsBox }, methods, model, alert, views) {
    Object.assign(this, { log, form, prompt, sendBtn: send, stopBtn: stop, streamBox, logprobsBox });
    this.methods = methods;
    this.model = model; // () => the selected model id
    this.alert = alert;
    this.views = views; // Map: token container -> TokenView (for the tooltip)
    this.history = [];
    this.controller = null;
    this.turns = 0;
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
    });
    stop.addEventListener("click", () => this.controller && this.controller.abort());
    clear.addEventListener("click", () => {
      this.history = [];
      this.log.replaceChildren();
      this.views.clear();
    });
  }

  bubble(role, label) {
    const item = document.createElement("li");
    item.className = `msg ${role}`;
    item.dataset.role = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = label;
    const body = document.createElement("div");
    body.className = "content";
    item.append(who, body);
    this.log.append(item);
    return { item, body };
  }

  body(text) {
    const { fields, streamable, logprobs } = this.methods.requestFields();
    const body = { model: this.model(), messages: [...this.history, { role: "user", content: text }], ...fields };
    const stream = this.streamBox.checked && streamable;
    if (this.logprobsBox.checked && logprobs) {
      body.logprobs = true;
      body.top_logprobs = fields.top_logprobs ?? DEFAULT_TOP_LOGPROBS;
    } else {
      delete body.top_logprobs;
    }
    if (stream) body.stream = true;
    return body;
  }

  async send() {
    const text = this.prompt.value.trim();
    if (!text || this.controller) return;
    const request = this.body(text);
    const turn = ++this.turns;
    this.bubble("user", "You").body.textContent = text;
    const { item, body } = this.bubble("assistant", request.model || "assistant");
    const tokensEl = document.createElement("p");
    tokensEl.className = "tokens";
    tokensEl.setAttribute("aria-label", "reply, token by token");
    body.append(tokensEl);
    const view = new TokenView(tokensEl);
    this.views.set(tokensEl, view);
    const status = document.createElement("p");
    status.className = "status";
    status.setAttribute("role", "status");
    status.textContent = request.stream ? "streaming…" : "waiting for the full response…";
    body.append(status);
    this.controller = new AbortController();
    this.busy(true);
    item.setAttribute("aria-busy", "true");
    let alignment = null;
    let finish = null;
    let chunks = 0;
    try {
      if (request.stream) {
        for await (const chunk of streamChat(request, this.controller.signal)) {
          if (chunk.alignment) alignment = { ...(alignment || {}), ...chunk.alignment };
          for (const choice of chunk.choices || []) {
            if (choice.index !== 0) continue;
            chunks += 1;
            view.addChoice(choice, choice.delta && choice.delta.content);
            finish = choice.finish_reason || finish;
          }
          item.dataset.chunks = String(chunks);
        }
      } else {
        const res = await api.chat(request, this.controller.signal);
        const choice = res.choices[0];
        view.addChoice(choice, choice.message.content);
        finish = choice.finish_reason;
        alignment = res.alignment || null;
        chunks = 1;
      }
      this.prompt.value = "";
      this.history.push({ role: "user", content: text }, { role: "assistant", content: view.text() });
      status.textContent = `done (${finish || "?"}), ${view.tokens.length} ${request.logprobs ? "tokens" : "pieces"}`
        + (request.stream ? `, ${chunks} chunks streamed` : "");
      if (alignment) body.append(renderAlignment(alignment, view, `t${turn}-p`, text));
      item.dataset.done = "true";
    } catch (exc) {
      if (exc.name === "AbortError") {
        status.textContent = "stopped";
      } else {
        const msg = exc instanceof ApiError ? exc.describe() : String(exc);
        status.textContent = `error: ${msg}`;
        status.classList.add("error");
        item.dataset.error = msg;
        this.alert(`Chat failed: ${msg}`);
      }
    } finally {
      item.removeAttribute("aria-busy");
      this.controller = null;
      this.busy(false);
    }
  }

  busy(on) {
    this.sendBtn.disabled = on;
    this.stopBtn.disabled = !on;
  }
}
