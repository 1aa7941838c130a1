// The chat page: streamed answers rendered as Markdown (marked + DOMPurify, code highlighted by highlight.js),
// reasoning collapsed, tool calls shown, Stop / Regenerate, conversations kept in localStorage, and a context
// meter from POST /tokenize. 429 and 503 before the answer starts are retried with back-off.
import { marked } from "./vendor/marked.esm.js";
import hljs from "./vendor/highlight.es.min.js";
import { ApiError } from "./api.js";

const STORE = "qwen3-local.conversations";
const CURRENT = "qwen3-local.current";
const WARN_AT = 0.75;
const RETRIES = 4;
// Back-off without Retry-After: 1, 2, 4, 8 s. A Retry-After longer than MAX_WAIT_S is shown, not waited out:
// nobody should watch a page sit still for minutes.
const MAX_BACKOFF_S = 8;
const MAX_WAIT_S = 60;
const $ = (id) => document.getElementById(id);

let api;
let onUnauthorized;
let conversations = [];
let current = null;
let controller = null; // the AbortController of the answer being streamed
let meterTimer = null;
let meterSeq = 0;

function load() {
  try {
    conversations = JSON.parse(localStorage.getItem(STORE) || "[]");
  } catch {
    conversations = [];
  }
  current = conversations.find((c) => c.id === localStorage.getItem(CURRENT)) || null;
  if (!current) newConversation();
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
  localStorage.setItem(CURRENT, current.id);
}

function newConversation() {
  current = { id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`, title: "New chat", messages: [] };
  conversations.unshift(current);
  save();
}

function renderList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conversation of conversations) {
    const item = document.createElement("li");
    if (conversation === current) item.setAttribute("aria-current", "true");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = conversation.title;
    open.addEventListener("click", () => {
      if (controller) return;
      current = conversation;
      save();
      renderAll();
    });
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Delete conversation ${conversation.title}`);
    remove.addEventListener("click", () => {
      if (controller) return;
      conversations = conversations.filter((c) => c !== conversation);
      if (conversation === current) {
        current = conversations[0] || null;
        if (!current) newConversation();
      }
      save();
      renderAll();
    });
    item.append(open, remove);
    list.append(item);
  }
}

function markdown(target, text) {
  target.innerHTML = DOMPurify.sanitize(marked.parse(text));
  for (const block of target.querySelectorAll("pre code")) hljs.highlightElement(block);
}

function renderMessage(message, element = null) {
  const box = element || document.createElement("article");
  box.className = `msg ${message.role}`;
  box.replaceChildren();
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role;
  box.append(role);
  if (message.reasoning) {
    const details = document.createElement("details");
    details.className = "reasoning";
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const text = document.createElement("div");
    text.className = "reasoning-text";
    text.textContent = message.reasoning;
    details.append(summary, text);
    box.append(details);
  }
  const content = document.createElement("div");
  content.className = "content";
  if (message.role === "assistant") markdown(content, message.content || "");
  else content.textContent = message.content;
  box.append(content);
  for (const call of message.tool_calls || []) {
    const tool = document.createElement("div");
    tool.className = "tool-call";
    tool.textContent = `Tool call: ${call.function?.name ?? "?"}(${call.function?.arguments ?? ""})`;
    box.append(tool);
  }
  if (message.note) {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = message.note;
    box.append(note);
  }
  return box;
}

function renderAll() {
  renderList();
  const messages = $("messages");
  messages.replaceChildren(...current.messages.map((m) => renderMessage(m)));
  messages.scrollTop = messages.scrollHeight;
  updateButtons();
  scheduleMeter(0);
}

function updateButtons() {
  const busy = controller !== null;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || !current.messages.some((m) => m.role === "assistant");
}

// What the server is sent: the system prompt, then the conversation's turns as plain role/content.
function requestMessages(extraUser = null) {
  const out = [];
  const system = $("system").value.trim();
  if (system) out.push({ role: "system", content: system });
  for (const m of current.messages) out.push({ role: m.role, content: m.content || "" });
  if (extraUser) out.push({ role: "user", content: extraUser });
  return out;
}

function scheduleMeter(delay = 300) {
  clearTimeout(meterTimer);
  meterTimer = setTimeout(updateMeter, delay);
}

async function updateMeter() {
  const seq = ++meterSeq;
  const messages = requestMessages($("prompt").value.trim() || null);
  if (messages.length === 0) messages.push({ role: "user", content: "" });
  try {
    const { n_tokens: used, n_ctx: total } = await api.post("/tokenize", { messages });
    if (seq !== meterSeq) return;
    const ratio = total ? used / total : 0;
    $("context-meter").value = Math.min(ratio, 1);
    $("context-text").textContent = `${used} / ${total} tokens (${Math.round(ratio * 100)} %)`;
    $("context-warning").hidden = ratio < WARN_AT;
  } catch (error) {
    if (seq === meterSeq) $("context-text").textContent = `unknown (${error.message})`;
  }
}

function showError(text) {
  $("chat-error").textContent = text;
}

function describe(error) {
  if (error.status === 429) return `Too many requests (429): ${error.message}`;
  if (error.status === 503) return `The server is not ready (503): ${error.message}`;
  if (error.status) return `Error ${error.status}: ${error.message}`;
  return error.message;
}

// Resolves after ms; rejects with an AbortError at once when Stop aborts the signal (before or during the wait).
const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    const aborted = () => reject(new DOMException("Aborted", "AbortError"));
    if (signal.aborted) return aborted();
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      aborted();
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });

// Seconds to wait before trying again, or null when this error is not worth retrying: only a 429 or 503 that
// came before the answer started (nothing shown yet), at most RETRIES times, never past MAX_WAIT_S.
function retryDelay(error, attempt, started) {
  const transient = error instanceof ApiError && (error.status === 429 || error.status === 503);
  if (!transient || started || attempt >= RETRIES) return null;
  const wait = error.retryAfter ?? Math.min(2 ** attempt, MAX_BACKOFF_S);
  return wait <= MAX_WAIT_S ? wait : null;
}

async function complete() {
  const assistant = { role: "assistant", content: "", reasoning: "", tool_calls: [] };
  const body = {
    model: $("model").value,
    messages: requestMessages(),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  controller = new AbortController();
  const signal = controller.signal;
  updateButtons();
  showError("");
  current.messages.push(assistant);
  const element = renderMessage(assistant);
  $("messages").append(element);
  element.setAttribute("aria-busy", "true"); // screen readers read the answer once it is whole
  let frame = 0;
  const redraw = () => {
    frame = 0;
    renderMessage(assistant, element);
    $("messages").scrollTop = $("messages").scrollHeight;
  };
  let started = false;
  try {
    for (let attempt = 0; ; attempt++) {
      try {
        for await (const chunk of api.sse("/v1/chat/completions", body, { signal })) {
          started = true;
          for (const choice of chunk.choices || []) {
            const delta = choice.delta || {};
            if (delta.content) assistant.content += delta.content;
            if (delta.reasoning_content) assistant.reasoning += delta.reasoning_content;
            for (const call of delta.tool_calls || []) {
              const slot = (assistant.tool_calls[call.index ?? 0] ||= { function: { name: "", arguments: "" } });
              if (call.function?.name) slot.function.name += call.function.name;
              if (call.function?.arguments) slot.function.arguments += call.function.arguments;
            }
            if (choice.finish_reason === "length") assistant.note = "Stopped at max tokens.";
          }
          if (!frame) frame = requestAnimationFrame(redraw);
        }
        showError("");
        break;
      } catch (error) {
        const wait = retryDelay(error, attempt, started);
        if (wait === null) throw error;
        showError(`${describe(error)} Retrying in ${wait} s…`);
        await sleep(wait * 1000, signal);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") assistant.note = "Stopped.";
    else {
      const later = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : "";
      showError(describe(error) + later);
      if (error.status === 401) onUnauthorized();
      if (!assistant.content && !assistant.reasoning) {
        current.messages.pop();
        element.remove();
      }
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    if (current.messages.includes(assistant)) redraw();
    element.removeAttribute("aria-busy");
    controller = null;
    save();
    updateButtons();
    scheduleMeter(0);
  }
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  if (current.messages.length === 0) current.title = text.slice(0, 40);
  current.messages.push({ role: "user", content: text });
  save();
  renderAll();
  await complete();
}

function stop() {
  controller?.abort();
}

async function regenerate() {
  if (controller) return;
  while (current.messages.length && current.messages.at(-1).role === "assistant") current.messages.pop();
  save();
  renderAll();
  await complete();
}

async function loadModels() {
  try {
    const { data } = await api.get("/v1/models");
    $("model").replaceChildren(
      ...data.map((m) => {
        const option = document.createElement("option");
        option.value = option.textContent = m.id;
        return option;
      }),
    );
  } catch (error) {
    showError(`Could not list the models: ${describe(error)}`);
    if (error.status === 401) onUnauthorized();
  }
}

export function startChat(client, hooks = {}) {
  api = client;
  onUnauthorized = hooks.onUnauthorized || (() => {});
  load();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && controller) {
      event.preventDefault();
      stop();
    }
  });
  $("stop").addEventListener("click", stop);
  $("regenerate").addEventListener("click", regenerate);
  $("new-chat").addEventListener("click", () => {
    if (controller) return;
    newConversation();
    renderAll();
    $("prompt").focus();
  });
  $("prompt").addEventListener("input", () => scheduleMeter());
  $("system").addEventListener("input", () => scheduleMeter());
  loadModels();
  renderAll();
  $("prompt").focus();
}
