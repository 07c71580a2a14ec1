// minillama's chat page. It speaks only the public OpenAI API (plus the server's /tokenize), so everything it
// shows -- the request, the raw stream, the rendered prompt, the tokens and their probabilities -- is what any
// client of the server could see, if it looked.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  model: null,          // the id GET /v1/models reports; every request names it
  maxModelLen: null,    // the context length, in tokens, for "context: used/total"
  modelsLoading: null,  // the pending GET /v1/models, so a send during start-up waits for it
  messages: [],         // the conversation as the API wants it: [{role, content}], without the system prompt
  controller: null,     // aborts the reply in flight (Stop, New chat): the server frees its slot on disconnect
  chatId: 0,            // bumped by New chat, so a reply that finishes afterwards is dropped, not appended
};

// ---------------------------------------------------------------------------------------------------------------
// The API key. Only asked for once the server refuses a request with 401, kept in sessionStorage (this tab, until
// it closes), never in localStorage or a cookie, and sent the way OpenAI clients send it: Authorization: Bearer.

const KEY_STORAGE = "minillama-api-key";
let keyWaiters = [];  // requests paused on a 401, resumed together when a key is entered

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// Show the key form (once, however many requests are waiting) and resolve when the user submits a key.
function waitForKey(refused) {
  const form = $("key-form");
  form.hidden = false;
  if (refused) showError("The server refused that API key; enter it again.");
  $("api-key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function onKeySubmit(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  clearError();
  const waiting = keyWaiters;
  keyWaiters = [];
  waiting.forEach((resume) => resume());
}

// fetch() with the key; on 401 ask for a key and send the same request again (the body is a string, so it can be).
async function api(path, options = {}) {
  for (;;) {
    const headers = { ...(options.headers || {}), ...authHeaders() };
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    const hadKey = sessionStorage.getItem(KEY_STORAGE) !== null;
    sessionStorage.removeItem(KEY_STORAGE);
    await waitForKey(hadKey);
  }
}

// The server's errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: show the message.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error.message;
    if (message) return `${response.status}: ${message}`;
  } catch (_) { /* not OpenAI's shape: fall through to the raw text */ }
  return `${response.status} ${response.statusText}: ${text.slice(0, 300)}`;
}

function postJSON(path, body, signal) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body, signal });
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---------------------------------------------------------------------------------------------------------------
// The model: its name and context length, from GET /v1/models.

function loadModels() {
  state.modelsLoading = (async () => {
    const response = await api("/v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    const model = (await response.json()).data[0];
    state.model = model.id;
    state.maxModelLen = model.max_model_len ?? null;
    const context = state.maxModelLen ? ` · context ${state.maxModelLen} tokens` : "";
    $("model-info").textContent = `${model.id}${context}`;
  })();
  state.modelsLoading.catch((error) => {
    $("model-info").textContent = "no model";
    showError(`GET /v1/models failed: ${error.message}`);
    state.modelsLoading = null;  // the next send tries again
  });
  return state.modelsLoading;
}

function ensureModel() {
  if (state.model) return Promise.resolve();
  return state.modelsLoading || loadModels();
}

// ---------------------------------------------------------------------------------------------------------------
// The request: the settings on the page, turned into OpenAI's parameters. Empty fields are left out, so the
// server's defaults apply; out-of-range values are sent as they are, and the server's 400 says what is wrong.

function numberField(id, parse) {
  const text = $(id).value.trim();
  if (text === "") return undefined;
  const value = parse(text);
  return Number.isNaN(value) ? undefined : value;
}

function buildRequest() {
  const system = $("system-prompt").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.messages] : [...state.messages];
  const request = {
    model: state.model,
    messages,
    stream: true,
    stream_options: { include_usage: true },  // the last chunk then carries the token counts
    logprobs: true,                            // each token's log-probability...
    top_logprobs: 5,                           // ...and the five it was chosen among
    temperature: numberField("temperature", parseFloat),
    top_p: numberField("top-p", parseFloat),
    max_tokens: numberField("max-tokens", (t) => parseInt(t, 10)),
    seed: numberField("seed", (t) => parseInt(t, 10)),
  };
  // JSON.stringify drops undefined members: an empty seed sends no seed at all.
  return request;
}

// ---------------------------------------------------------------------------------------------------------------
// The conversation on screen.

function appendUserMessage(text) {
  const div = document.createElement("div");
  div.className = "message user";
  div.dataset.testid = "user-message";
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = "user";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  div.append(role, content);
  $("messages").append(div);
  return div;
}

// A reply element from the <template>, with handles on the parts app.js fills in.
function appendReply() {
  const root = $("reply-template").content.firstElementChild.cloneNode(true);
  $("messages").append(root);
  const part = (testid) => root.querySelector(`[data-testid="${testid}"]`);
  return {
    root,
    content: part("reply-content"),
    stats: part("reply-stats"),
    tokenView: part("token-view"),
    promptText: part("prompt-text"),
    promptTokens: part("prompt-tokens"),
    requestJson: part("request-json"),
    streamLines: part("stream-lines"),
  };
}

function scrollToBottom() {
  window.scrollTo(0, document.body.scrollHeight);
}

// ---------------------------------------------------------------------------------------------------------------
// The prompt behind the API: POST /tokenize renders the same messages with the model's chat template, as the
// chat endpoint will, and returns the text and its token ids with the piece of text each one stands for.

async function showPrompt(reply, messages, signal) {
  const body = JSON.stringify({ messages, add_generation_prompt: true });
  const response = await postJSON("/tokenize", body, signal);
  if (!response.ok) {
    reply.promptText.textContent = `POST /tokenize failed: ${await errorMessage(response)}`;
    return;
  }
  const result = await response.json();
  reply.promptText.textContent = result.prompt;
  reply.promptTokens.replaceChildren(tokenCount(result.count), ...result.tokens.map((id, i) =>
    promptToken(id, result.pieces[i])));
}

function tokenCount(count) {
  const p = document.createElement("p");
  p.textContent = `${count} tokens (· is a space, ↵ a newline)`;
  return p;
}

function promptToken(id, piece) {
  const chip = document.createElement("span");
  chip.className = "ptok";
  chip.dataset.testid = "prompt-token";
  const text = document.createElement("span");
  text.className = "piece";
  text.textContent = visible(piece, true);
  const number = document.createElement("span");
  number.className = "id";
  number.textContent = id;
  chip.append(text, number);
  return chip;
}

// Whitespace is part of a token; make it visible. In the reply's token view a newline keeps its line break and a
// space stays a space (the token's border shows it), so the text still reads as text; a prompt token's chip is
// one line, with a space shown as "·" (" Hello" and "Hello" are different tokens).
function visible(text, inChip = false) {
  const shown = text.replace(/\t/g, "→");
  return inChip ? shown.replace(/\n/g, "↵").replace(/ /g, "·") : shown.replace(/\n/g, "↵\n");
}

// ---------------------------------------------------------------------------------------------------------------
// The stream. Server-sent events: lines "data: {json}", an event ends at a blank line, lines starting with ":"
// are comments (the server's pings while a long prompt prefills) and carry nothing. `onLine` sees every raw line,
// for the wire view. The stream ends with "data: [DONE]".

async function* serverSentEvents(body, onLine) {
  const reader = body.getReader();
  const decoder = new TextDecoder();  // {stream: true} below keeps a UTF-8 character split across reads whole
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      onLine(line);
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
      // ":" comments and the fields OpenAI's stream never uses (event:, id:, retry:) are skipped.
    }
  }
  if (data.length) yield data.join("\n");
}

async function streamChat(reply, request, signal) {
  const body = JSON.stringify(request, null, 2);  // what is shown below is byte for byte what is sent
  // The headers too, the key masked: it is the one thing on the wire the page does not show.
  const key = sessionStorage.getItem(KEY_STORAGE) ? "Authorization: Bearer ••••••\n" : "";
  reply.requestJson.textContent = `POST /v1/chat/completions\nContent-Type: application/json\n${key}\n${body}`;
  const reading = {
    text: "", tokens: [], finishReason: null, usage: null,
    sentAt: performance.now(), firstTokenAt: null, lastTokenAt: null,
  };
  const response = await postJSON("/v1/chat/completions", body, signal);
  if (!response.ok) throw new Error(await errorMessage(response));
  const onLine = (line) => reply.streamLines.append(line + "\n");  // a text node each: no copy of what came before
  for await (const data of serverSentEvents(response.body, onLine)) {
    if (data === "[DONE]") break;
    readChunk(JSON.parse(data), reading, reply);
  }
  return reading;
}

// One chunk: the role (first), content with its tokens' log-probs, the finish reason (once), the usage (last).
function readChunk(chunk, reading, reply) {
  if (chunk.error) throw new Error(chunk.error.message);  // an error after the stream began comes as a chunk
  if (chunk.usage) reading.usage = chunk.usage;
  const choice = (chunk.choices || [])[0];
  if (!choice) return;
  const now = performance.now();
  if (choice.delta && choice.delta.content) {
    reading.text += choice.delta.content;
    reply.content.textContent = reading.text;
    scrollToBottom();
  }
  for (const entry of (choice.logprobs && choice.logprobs.content) || []) {
    if (reading.firstTokenAt === null) reading.firstTokenAt = now;
    reading.lastTokenAt = now;
    reading.tokens.push(entry);
    reply.tokenView.append(shadedToken(entry));
  }
  if (choice.finish_reason) reading.finishReason = choice.finish_reason;
}

// ---------------------------------------------------------------------------------------------------------------
// The token view: each generated token shaded by its probability, exp(logprob): green likely, red unlikely.

const tokenEntries = new WeakMap();  // token <span> -> its logprobs entry, for the tooltip

function shade(p) {
  return `hsl(${Math.round(120 * p)}, 70%, 82%)`;
}

function percent(p) {
  const pct = 100 * p;
  return pct >= 1 ? `${pct.toFixed(1)}%` : `${pct.toPrecision(2)}%`;
}

function shadedToken(entry) {
  const p = Math.exp(entry.logprob);
  const span = document.createElement("span");
  span.className = "tok";
  span.dataset.testid = "token";
  span.dataset.prob = p.toFixed(6);
  span.style.background = shade(p);
  span.textContent = visible(entry.token);
  span.tabIndex = 0;  // keyboard users get the tooltip on focus
  tokenEntries.set(span, entry);
  return span;
}

// The tooltip: the chosen token and its probability, then the alternatives the sampler chose among.
function showTooltip(span) {
  const entry = tokenEntries.get(span);
  const tip = $("tooltip");
  const head = document.createElement("div");
  head.className = "tip-head";
  head.textContent = `${JSON.stringify(entry.token)} ${percent(Math.exp(entry.logprob))}`;
  const list = document.createElement("ol");
  for (const alt of entry.top_logprobs || []) {
    const item = document.createElement("li");
    item.dataset.testid = "tooltip-alt";
    if (alt.token === entry.token) item.className = "chosen";
    const token = document.createElement("code");
    token.textContent = JSON.stringify(alt.token);
    const prob = document.createElement("span");
    prob.textContent = percent(Math.exp(alt.logprob));
    item.append(token, prob);
    list.append(item);
  }
  tip.replaceChildren(head, list);
  tip.hidden = false;
  placeTooltip(tip, span.getBoundingClientRect());
}

function placeTooltip(tip, rect) {
  const left = Math.min(rect.left, window.innerWidth - tip.offsetWidth - 8);
  tip.style.left = `${Math.max(4, left) + window.scrollX}px`;
  tip.style.top = `${rect.bottom + 4 + window.scrollY}px`;
}

function hideTooltip() {
  $("tooltip").hidden = true;
}

// ---------------------------------------------------------------------------------------------------------------
// Per reply: how fast and how much of the context it used. The rate is measured here, in the browser, from the
// first token's arrival to the last's, so it is the decode rate a client sees (the wait for the first token --
// queue and prefill -- is shown apart).

function showStats(reply, reading) {
  const count = reading.usage ? reading.usage.completion_tokens : reading.tokens.length;
  const parts = [`${count} tokens`];
  if (reading.firstTokenAt !== null) {
    parts.push(`first token ${Math.round(reading.firstTokenAt - reading.sentAt)} ms`);
    const seconds = (reading.lastTokenAt - reading.firstTokenAt) / 1000;
    if (count > 1 && seconds > 0) parts.push(`${((count - 1) / seconds).toFixed(1)} tok/s`);
  }
  if (reading.usage) {
    const total = state.maxModelLen ? `/${state.maxModelLen}` : "";
    parts.push(`context: ${reading.usage.total_tokens}${total}`);
  }
  if (reading.finishReason) parts.push(`finish: ${reading.finishReason}`);
  reply.stats.textContent = parts.join(" · ");
  reply.stats.dataset.completionTokens = count;
}

// ---------------------------------------------------------------------------------------------------------------
// Sending a message: render the prompt (/tokenize), stream the reply, keep it in the history.

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  clearError();
  const chatId = state.chatId;
  state.messages.push({ role: "user", content: text });
  const userElement = appendUserMessage(text);
  const reply = appendReply();
  state.controller = new AbortController();
  const signal = state.controller.signal;
  setBusy(true);
  try {
    await ensureModel();
    const request = buildRequest();
    await showPrompt(reply, request.messages, signal);
    const reading = await streamChat(reply, request, signal);
    if (chatId !== state.chatId) return;
    state.messages.push({ role: "assistant", content: reading.text });
    showStats(reply, reading);
  } catch (error) {
    if (chatId !== state.chatId) return;  // New chat was pressed: this reply is gone already
    const partial = reply.content.textContent;
    if (error.name === "AbortError" && partial) {
      // Stopped by the user mid-reply: keep what came, as the history the next turn builds on.
      state.messages.push({ role: "assistant", content: partial });
      reply.stats.textContent = "stopped";
    } else {
      // Not sent (or stopped before a word came): take the turn back out of the history, and put the text back
      // in the box to retry.
      state.messages.pop();
      userElement.remove();
      reply.root.remove();
      $("user-input").value = text;
      if (error.name !== "AbortError") showError(error.message);
    }
  } finally {
    if (chatId === state.chatId) setBusy(false);
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.chatId += 1;
  state.messages = [];
  $("messages").replaceChildren();
  hideTooltip();
  clearError();
  setBusy(false);
  $("user-input").focus();
}

// ---------------------------------------------------------------------------------------------------------------
// Wiring.

function onChatSubmit(event) {
  event.preventDefault();
  const input = $("user-input");
  const text = input.value.trim();
  if (!text || !$("stop").hidden) return;  // nothing to send, or a reply is still coming
  input.value = "";
  send(text);
}

function onInputKey(event) {
  // Enter sends, Shift+Enter is a new line, as in most chat boxes.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
}

function onTokenHover(event) {
  const span = event.target.closest(".tok");
  if (span && tokenEntries.has(span)) showTooltip(span);
}

function onTokenLeave(event) {
  if (event.target.closest(".tok")) hideTooltip();
}

document.addEventListener("DOMContentLoaded", () => {
  $("chat-form").addEventListener("submit", onChatSubmit);
  $("user-input").addEventListener("keydown", onInputKey);
  $("key-form").addEventListener("submit", onKeySubmit);
  $("new-chat").addEventListener("click", newChat);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  const messages = $("messages");
  messages.addEventListener("mouseover", onTokenHover);
  messages.addEventListener("mouseout", onTokenLeave);
  messages.addEventListener("focusin", onTokenHover);
  messages.addEventListener("focusout", onTokenLeave);
  loadModels();
});
