// The fusionlm chat page: plain ES2020, no dependencies. Server text only ever goes in through
// textContent; only data:image/ URLs become <img> sources.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
};
const KEY = "fusionlm.apiKey";
const IMAGE_MD = /!\[([^\]\n]*)\]\((data:image\/[a-z0-9.+-]+;base64,[A-Za-z0-9+/=\s]+)\)/gi;

let history = [];      // the conversation as sent: {role, content}
let attached = [];     // {name, url}: images waiting for the next message
let modelId = null;
let busy = null;       // the AbortController of the request in flight
let chatId = 0;        // bumped by "new chat": a request of an older chat writes nothing more

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function safeImage(url, alt) {
  if (typeof url !== "string" || !url.startsWith("data:image/")) return null;
  const img = el("img", "picture");
  img.alt = alt || "image";
  img.setAttribute("src", url);
  return img;
}

// Text, with markdown images of data:image/ URLs drawn as pictures.
function render(node, text) {
  if (!text.includes("![")) {
    node.textContent = text;
    return;
  }
  node.replaceChildren();
  let at = 0;
  for (const m of text.matchAll(IMAGE_MD)) {
    if (m.index > at) node.append(document.createTextNode(text.slice(at, m.index)));
    const img = safeImage(m[2].replace(/\s+/g, ""), m[1]);
    node.append(img || document.createTextNode(m[0]));
    at = m.index + m[0].length;
  }
  if (at < text.length) node.append(document.createTextNode(text.slice(at)));
}

function bubble(cls) {
  const node = el("div", "bubble " + cls);
  $("messages").append(node);
  scrollDown();
  return node;
}

function showError(message) {
  const node = bubble("error");
  node.append(el("strong", "", "Error: "), document.createTextNode(message));
  return node;
}

async function loadModel() {
  const label = $("model");
  label.classList.remove("bad");
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(body?.error?.message || "HTTP " + res.status);
    modelId = body.data?.[0]?.id ?? null;
    label.textContent = modelId ?? "no model";
  } catch (err) {
    modelId = null;
    label.textContent = "unavailable: " + err.message;
    label.classList.add("bad");
  }
}

// ---------------------------------------------------------------- attachments

function drawThumbs() {
  const box = $("thumbs");
  box.replaceChildren();
  attached.forEach((item, i) => {
    const thumb = el("div", "thumb");
    const img = safeImage(item.url, item.name);
    if (img) thumb.append(img);
    const remove = el("button", "remove", "×");
    remove.type = "button";
    remove.title = "Remove " + item.name;
    remove.addEventListener("click", () => { attached.splice(i, 1); drawThumbs(); });
    thumb.append(remove);
    box.append(thumb);
  });
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    try {
      const url = await readFile(file);
      if (url.startsWith("data:image/")) attached.push({ name: file.name || "pasted image", url });
    } catch (err) {
      showError("could not read " + file.name + ": " + err);
    }
  }
  drawThumbs();
}

// ---------------------------------------------------------------- sending

function settings() {
  const max = parseInt($("max-tokens").value, 10);
  const temp = parseFloat($("temperature").value);
  return { max_tokens: Number.isFinite(max) ? max : 64, temperature: Number.isFinite(temp) ? temp : 0 };
}

function showUsage(node, use) {
  const images = use.prompt_tokens_details?.image_tokens ?? 0;
  node.textContent = `prompt ${use.prompt_tokens} · completion ${use.completion_tokens} · image ${images} tokens`;
}

// Reads server-sent events from a fetch body, calling onEvent with each parsed `data:` object.
async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const lines = buffer.split("\n");
    buffer = done ? "" : lines.pop();
    for (const raw of lines) {
      const line = raw.replace(/\r$/, "");
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return true;
      let event;
      try { event = JSON.parse(data); } catch { continue; }
      onEvent(event);
    }
    if (done) return false;
  }
}

async function send() {
  if (busy) { busy.abort(); return; }
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text && !attached.length) return;
  const parts = attached.map((a) => ({ type: "image_url", image_url: { url: a.url } }));
  if (text) parts.push({ type: "text", text });

  const user = bubble("user");
  for (const a of attached) {
    const img = safeImage(a.url, a.name);
    if (img) user.append(img);
  }
  if (text) user.append(el("div", "text", text));
  history.push({ role: "user", content: parts });
  const turn = history.length, mine = chatId;
  prompt.value = "";
  attached = [];
  drawThumbs();

  const answer = bubble("assistant pending");
  const body = el("div", "text");
  const meta = el("div", "usage");
  answer.append(body, meta);
  let written = "", chunks = 0, failed = null;
  busy = new AbortController();
  $("send").textContent = "Stop";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: busy.signal,
      body: JSON.stringify({
        model: modelId ?? undefined, messages: history, ...settings(),
        stream: true, stream_options: { include_usage: true },
      }),
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      answer.remove();
      failed = err?.error?.message || `HTTP ${res.status} ${res.statusText}`;
    } else {
      const finished = await readEvents(res.body, (event) => {
        if (event.error) { failed = event.error.message || "the server failed"; return; }
        const piece = event.choices?.[0]?.delta?.content;
        if (piece) {
          written += piece;
          chunks += 1;
          answer.classList.remove("pending");
          render(body, written);
          scrollDown();
        }
        if (event.usage) showUsage(meta, event.usage);
      });
      if (!finished && !failed) failed = "the answer was cut off";
    }
  } catch (err) {
    failed = err.name === "AbortError" ? "stopped" : "request failed: " + err.message;
  } finally {
    busy = null;
    $("send").textContent = "Send";
    answer.classList.remove("pending");
    answer.dataset.chunks = String(chunks);
    answer.dataset.done = "1";
  }
  if (mine !== chatId) return;
  if (failed) {
    if (history.length === turn) history.pop(); // the failed turn is not sent again
    user.classList.add("failed");
    showError(failed);
  } else {
    history.push({ role: "assistant", content: written });
  }
  scrollDown();
}

function newChat() {
  chatId += 1;
  if (busy) busy.abort();
  history = [];
  attached = [];
  drawThumbs();
  $("messages").replaceChildren();
  $("prompt").focus();
}

// ---------------------------------------------------------------- wiring

$("api-key").value = localStorage.getItem(KEY) || "";
$("api-key").addEventListener("change", () => {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
  loadModel();
});
$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    if (!busy) send();
  }
});
$("attach").addEventListener("change", async (e) => {
  const files = [...e.target.files];
  e.target.value = "";
  await attach(files);
});
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData?.items || [])]
    .filter((item) => item.kind === "file" && item.type.startsWith("image/"))
    .map((item) => item.getAsFile()).filter(Boolean);
  if (files.length) { e.preventDefault(); attach(files); }
});
$("new-chat").addEventListener("click", newChat);
loadModel();
