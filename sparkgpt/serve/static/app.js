// The chat page: plain JavaScript, no build step. It talks to the same server's OpenAI-compatible API and
// renders the reply as server-sent events arrive. A server with an index (`sparkgpt serve REF --index DIR`)
// sends the reply's sources in its first chunk; they are listed under the reply, numbered as the reply cites them.
// An attached image goes with the next message as an image_url content part (a data URL); a model that does not
// read images answers it with a 400, shown as any other error.
"use strict";

const KEY_STORAGE = "sparkgpt.apiKey";
const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null, image: null };

function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = `Bearer ${apiKey()}`;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function askForKey(message) {
  $("key-message").textContent = message;
  $("key-panel").hidden = false;
  $("api-key").focus();
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (error) {
    setStatus(`Cannot reach the server: ${error.message}`);
    return;
  }
  if (response.status === 401) {
    askForKey(apiKey() ? "That API key was not accepted. Enter the server's API key." :
      "This server needs an API key.");
    return;
  }
  if (!response.ok) {
    setStatus(await errorMessage(response));
    return;
  }
  const body = await response.json();
  state.model = body.data[0].id;
  $("model-name").textContent = state.model;
  $("key-panel").hidden = true;
  setStatus("Ready.");
}

// ---- rendering: text with ``` fenced code blocks and `inline code`, everything escaped ----

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

function renderInline(text) {
  return escapeHtml(text).replace(/`([^`\n]+)`/g, "<code>$1</code>");
}

function renderMarkdown(text) {
  // Split on fences; odd pieces are code. An unclosed fence (mid-stream) is code up to the end.
  const parts = text.split(/^```/m);
  let html = "";
  parts.forEach((part, i) => {
    if (i % 2 === 0) {
      // The newlines around a fence belong to the fence: the <pre> block already breaks the line.
      if (i > 0) part = part.replace(/^[^\n]*\n/, "");
      if (i < parts.length - 1) part = part.replace(/\n$/, "");
      html += renderInline(part);
      return;
    }
    const newline = part.indexOf("\n");
    const lang = newline === -1 ? "" : part.slice(0, newline).trim();
    let code = newline === -1 ? "" : part.slice(newline + 1);
    code = code.replace(/\n$/, "");
    const label = lang ? `<span class="lang">${escapeHtml(lang)}</span>` : "";
    html += `<pre>${label}<code${lang ? ` class="language-${escapeHtml(lang)}"` : ""}>${escapeHtml(code)}</code></pre>`;
  });
  return html;
}

function addMessage(role, text, image = null) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  if (role === "user") element.textContent = text;
  else element.innerHTML = renderMarkdown(text);
  if (image) {
    const thumbnail = document.createElement("img");
    thumbnail.className = "thumbnail";
    thumbnail.alt = "attached image";
    thumbnail.src = image;
    element.prepend(thumbnail);
  }
  $("messages").appendChild(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

// ---- sources: [n] in a reply is item n of the list under it (built as DOM nodes: all text stays text) ----

const SOURCE_PREVIEW = 160;  // characters of each chunk shown; the whole chunk is the item's tooltip

function preview(text) {
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length > SOURCE_PREVIEW ? `${flat.slice(0, SOURCE_PREVIEW).trimEnd()}…` : flat;
}

function addSources(reply, sources) {
  const box = document.createElement("div");
  box.className = "sources";
  const title = document.createElement("div");
  title.className = "sources-title";
  title.textContent = "Sources";
  const list = document.createElement("ol");
  for (const source of sources) {
    const item = document.createElement("li");
    const path = document.createElement("span");
    path.className = "source-path";
    path.textContent = String(source.source);
    const excerpt = document.createElement("span");
    excerpt.className = "source-text";
    excerpt.textContent = preview(String(source.text));
    item.title = String(source.text);
    item.append(path, excerpt);
    list.append(item);
  }
  box.append(title, list);
  reply.after(box);
  return box;
}

// ---- sending and streaming ----

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function parseEvents(buffer, onData) {
  // Server-sent events are separated by a blank line; we use only their `data:` lines.
  let end;
  while ((end = buffer.indexOf("\n\n")) !== -1) {
    const event = buffer.slice(0, end);
    buffer = buffer.slice(end + 2);
    for (const line of event.split("\n")) {
      if (line.startsWith("data:")) onData(line.slice(5).trim());
    }
  }
  return buffer;
}

// ---- an image attached to the next message ----

function setAttachment(dataUrl) {
  state.image = dataUrl;
  $("attachment-preview").src = dataUrl || "";
  $("attachment").hidden = !dataUrl;
  if (!dataUrl) $("attach").value = "";
}

function userContent(text, image) {
  // OpenAI's content parts when an image goes along; plain text otherwise.
  if (!image) return text;
  return [{ type: "text", text }, { type: "image_url", image_url: { url: image } }];
}

async function send(text) {
  if (!state.model) {
    await loadModel();
    if (!state.model) return;
  }
  const image = state.image;
  setAttachment(null);
  const system = $("system-prompt").value.trim();
  const turn = { role: "user", content: userContent(text, image) };
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history, turn];
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  addMessage("user", text, image);
  state.history.push(turn);
  const reply = addMessage("assistant", "");
  reply.dataset.state = "streaming";
  let replyText = "";
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  setStatus("Generating…");
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: state.model, messages, stream: true, temperature,
        ...(Number.isFinite(maxTokens) && maxTokens > 0 ? { max_tokens: maxTokens } : {}),
      }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const message = await errorMessage(response);
      if (response.status === 401) askForKey("The server asks for an API key: " + message);
      throw new Error(message);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (Array.isArray(chunk.sources) && chunk.sources.length) addSources(reply, chunk.sources);
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) replyText += choice.delta.content;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        reply.innerHTML = renderMarkdown(replyText);
        reply.scrollIntoView({ block: "end" });
      });
    }
    reply.dataset.state = "done";
    setStatus(finish === "length" ? "Stopped at the max-tokens limit." : "Ready.");
  } catch (error) {
    if (error.name === "AbortError") {
      reply.dataset.state = "stopped";
      reply.innerHTML = renderMarkdown(replyText) + '<span class="note"> [stopped]</span>';
      setStatus("Stopped.");
    } else {
      reply.dataset.state = "error";
      reply.classList.add("error");
      reply.textContent = replyText ? `${replyText}\n\n${error.message}` : error.message;
      setStatus("Error.");
    }
  } finally {
    if (replyText) state.history.push({ role: "assistant", content: replyText });
    else state.history.pop();  // nothing was said: forget the question too, so the next try starts clean
    if (state.controller === controller) state.controller = null;
    setBusy(false);
  }
}

// ---- wiring ----

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if ((!text && !state.image) || state.controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("attach").addEventListener("change", () => {
  const file = $("attach").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.addEventListener("load", () => setAttachment(reader.result));
  reader.addEventListener("error", () => setStatus(`Cannot read ${file.name}.`));
  reader.readAsDataURL(file);
});

$("remove-attachment").addEventListener("click", () => setAttachment(null));

$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });

$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  setAttachment(null);
  $("messages").replaceChildren();
  setStatus("New chat.");
  $("input").focus();
});

$("toggle-settings").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
});

$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });

$("change-key").addEventListener("click", () => askForKey("Enter the server's API key."));

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  $("api-key").value = "";
  loadModel();
});

loadModel();
