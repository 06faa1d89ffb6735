// The chat page: sends prompts, stops replies, loads older messages, and follows the chat live.
//
// Live: one WebSocket to /chat/stream?id=<chat> (the `sess` cookie signs it in). Every event carries
// `seq`; after a drop the page reconnects with backoff and resumes with ?after=<last seq seen>, so nothing
// is shown twice or missed; when the server says the events are gone (stream.gap), or there is nothing
// to resume from, the page catches up from /chat/read instead. Replies are rendered by markdown.js,
// which builds DOM nodes from text and never parses HTML.

import { renderMarkdown } from "./markdown.js";

const PAGE_SIZE = 50;
const RENDER_INTERVAL_MS = 40; // replies being streamed are re-rendered at most this often
const PING_INTERVAL_MS = 25000;
const PONG_TIMEOUT_MS = 10000;
const FINAL = new Set(["complete", "error"]);
// Close codes after which reconnecting cannot help (chats.consumers.CLOSE_CODES).
const CLOSED_FOR_GOOD = {
  4401: "Your session has ended: log in again to follow this chat.",
  4403: "You no longer have access to this chat.",
  4404: "This chat was deleted.",
};

const body = document.body;
const chatId = body.dataset.chatId;
const me = body.dataset.userId;
const isOwner = me === body.dataset.ownerId;
const log = document.getElementById("messages");
const olderButton = document.getElementById("load-older");
const form = document.getElementById("prompt-form");
const promptBox = document.getElementById("prompt");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const promptError = document.getElementById("prompt-error");
const connection = document.getElementById("connection");
const notice = document.getElementById("chat-notice");
const title = document.getElementById("chat-title");

const userNames = new Map(Object.entries(JSON.parse(document.getElementById("chat-users").textContent || "{}")));
const articles = new Map(); // message id -> its <article>
const replies = new WeakMap(); // <article> -> {text, timer}

// --- messages ---------------------------------------------------------------------------------------

function element(name, className, text) {
  const node = document.createElement(name);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function authorName(userId) {
  if (!userId) return "former member";
  if (!userNames.has(userId)) {
    refreshUsers();
    return "member";
  }
  return userNames.get(userId);
}

function nearBottom() {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

function scrollToBottom() {
  log.scrollTop = log.scrollHeight;
}

function renderReply(article) {
  const state = replies.get(article);
  clearTimeout(state.timer);
  state.timer = null;
  const stick = nearBottom();
  article.querySelector(":scope > .reply").replaceChildren(renderMarkdown(state.text));
  if (stick) scrollToBottom();
}

// Replace the reply's text; while it streams, render at most every RENDER_INTERVAL_MS.
function setReply(article, text, now) {
  let state = replies.get(article);
  if (!state) {
    state = { text: null, timer: null };
    replies.set(article, state);
  }
  if (state.text === text) {
    if (now && state.timer) renderReply(article);
    return;
  }
  state.text = text;
  if (now) renderReply(article);
  else if (!state.timer) state.timer = setTimeout(() => renderReply(article), RENDER_INTERVAL_MS);
}

function applyMessage(article, message, now) {
  let prompt = article.querySelector(":scope > .prompt");
  if (message.prompt) {
    if (!prompt) {
      prompt = element("div", "prompt");
      prompt.append(element("span", "author"));
      if (message.otr) prompt.append(element("span", "badge", "off the record"));
      prompt.append(element("div", "prompt-text"));
      article.prepend(prompt);
    }
    prompt.dataset.userId = message.user_id || "";
    prompt.querySelector(".author").textContent = authorName(message.user_id);
    prompt.querySelector(".prompt-text").textContent = message.prompt;
  } else if (prompt) {
    prompt.remove(); // a program's message: no author, no prompt
  }
  // A final reply is on the page before its status says so.
  setReply(article, message.reply || "", now || FINAL.has(message.status));
  let error = article.querySelector(":scope > .error");
  if (message.status === "error") {
    if (!error) {
      error = element("p", "error");
      article.append(error);
    }
    error.textContent = message.error || "the reply failed";
  } else if (error) {
    error.remove();
  }
  article.dataset.status = message.status;
  // Screen readers announce the reply once it is whole, not every few words while it streams.
  article.setAttribute("aria-busy", String(message.status === "streaming"));
  decorate(article);
}

// --- a message's actions: copy the reply; edit and resend or regenerate (the prompt's author, or the
// chat's owner for regenerate); regenerate is offered on the latest message only (turbo.css).

function actionButton(className, label, onClick) {
  const button = element("button", `button-quiet ${className}`, label);
  button.type = "button";
  button.addEventListener("click", onClick);
  return button;
}

function decorate(article) {
  let actions = article.querySelector(":scope > .message-actions");
  if (!actions) {
    actions = element("div", "message-actions");
    actions.append(actionButton("copy-reply", "Copy", () => copyReply(article, actions)));
    article.append(actions);
  }
  const prompt = article.querySelector(":scope > .prompt");
  const mine = Boolean(prompt) && prompt.dataset.userId === me;
  const wanted = { "edit-prompt": mine, regenerate: Boolean(prompt) && (mine || isOwner) };
  for (const [className, shown] of Object.entries(wanted)) {
    let button = actions.querySelector(`.${className}`);
    if (shown && !button) {
      button =
        className === "edit-prompt"
          ? actionButton(className, "Edit", () => editPrompt(article))
          : actionButton(className, "Regenerate", () => regenerate(article));
      actions.append(button);
    } else if (!shown && button) {
      button.remove();
    }
  }
  actions.querySelector(".copy-reply").hidden = !(replies.get(article)?.text ?? "");
}

async function copyReply(article, actions) {
  const text = replies.get(article)?.text ?? "";
  const button = actions.querySelector(".copy-reply");
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard API (an insecure origin): the selection way.
    const scratch = element("textarea");
    scratch.value = text;
    document.body.append(scratch);
    scratch.select();
    document.execCommand("copy");
    scratch.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
}

function promptOf(article) {
  return article.querySelector(":scope > .prompt .prompt-text")?.textContent ?? "";
}

let editing = null; // the message whose prompt the composer edits: sending replaces it
const editingBar = document.getElementById("editing");

function editPrompt(article) {
  editing = article.dataset.messageId;
  promptBox.value = promptOf(article);
  editingBar.hidden = false;
  autosize();
  promptBox.focus();
}

function stopEditing() {
  editing = null;
  editingBar.hidden = true;
}

document.getElementById("editing-cancel").addEventListener("click", () => {
  stopEditing();
  promptBox.value = "";
  autosize();
});

// Replace a message: delete it (its reply stops if it still streams), then send `text` as a new prompt.
async function replaceMessage(messageId, text) {
  const removed = await postJson("/chat/message/delete", { id: messageId });
  if (!removed.response.ok) {
    showPromptError(errorText(removed.answer, removed.response));
    return false;
  }
  removeMessage(messageId);
  return sendPrompt(text);
}

async function regenerate(article) {
  if (sending) return;
  sending = true;
  showPromptError("");
  try {
    await replaceMessage(article.dataset.messageId, promptOf(article));
  } catch {
    showPromptError("The reply could not be regenerated: check your connection and try again.");
  } finally {
    sending = false;
  }
}

function newArticle(message) {
  const article = element("article", "message");
  article.dataset.messageId = message.id;
  article.dataset.createdAt = message.created_at || "";
  article.append(element("div", "reply"));
  articles.set(message.id, article);
  return article;
}

function timeOf(article) {
  const time = Date.parse(article.dataset.createdAt || "");
  return Number.isNaN(time) ? Infinity : time;
}

// Oldest at the top: a new message usually goes last, one caught up late goes where it belongs.
function insertInOrder(article) {
  const time = timeOf(article);
  let after = log.lastElementChild;
  while (after && timeOf(after) > time) after = after.previousElementSibling;
  if (after) after.after(article);
  else log.prepend(article);
}

// Show `message` (from an event, a prompt's answer or /chat/read); an older copy never undoes a newer one.
function upsert(message, now = false) {
  let article = articles.get(message.id);
  if (article) {
    const status = article.dataset.status;
    const known = replies.get(article)?.text ?? "";
    if (FINAL.has(status) && !FINAL.has(message.status)) return article;
    if (status === "streaming" && message.status === "streaming" && (message.reply || "").length < known.length) {
      return article;
    }
    applyMessage(article, message, now);
  } else {
    const stick = nearBottom();
    article = newArticle(message);
    applyMessage(article, message, true);
    insertInOrder(article);
    if (stick) scrollToBottom();
  }
  updateStop();
  return article;
}

function removeMessage(id) {
  const article = articles.get(id);
  if (!article) return;
  articles.delete(id);
  article.remove();
  updateStop();
}

function mergeUsers(users) {
  for (const user of users || []) userNames.set(user.id, user.username);
  for (const prompt of log.querySelectorAll(".prompt[data-user-id]")) {
    const name = userNames.get(prompt.dataset.userId);
    if (name) prompt.querySelector(".author").textContent = name;
  }
}

let usersRefresh = null;
function refreshUsers() {
  if (usersRefresh) return;
  usersRefresh = setTimeout(async () => {
    try {
      const body = await readChat({ limit: "1" });
      mergeUsers(body.users);
    } catch {
      // a name shows as "member" until the next refresh
    } finally {
      usersRefresh = null;
    }
  }, 200);
}

// --- the API ----------------------------------------------------------------------------------------

function errorText(body, response) {
  if (response.status === 401) return "You are signed out: log in again.";
  const message = body?.error?.message;
  if (!message) return `The request failed (HTTP ${response.status}).`;
  return message[0].toUpperCase() + message.slice(1);
}

async function postJson(path, data) {
  const response = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify(data),
  });
  const answer = await response.json().catch(() => ({}));
  return { response, answer };
}

async function readChat(extra) {
  const params = new URLSearchParams({ id: chatId, ...extra });
  const response = await fetch(`/chat/read?${params}`, {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(errorText(answer, response));
    error.status = response.status;
    throw error;
  }
  return answer;
}

function showNotice(text) {
  notice.textContent = text;
}

function showPromptError(text) {
  promptError.textContent = text;
}

// Catch up from the database: after a gap in the stream, or when there is no event to resume from.
async function catchUp() {
  const before = new Set(articles.keys());
  let answer;
  try {
    answer = await readChat({ limit: String(PAGE_SIZE) });
  } catch (error) {
    if ([401, 403, 404].includes(error.status)) finish(error.message);
    return;
  }
  mergeUsers(answer.users);
  if (answer.chat) setTitle(answer.chat.name);
  const seen = new Set();
  for (const message of answer.messages) {
    seen.add(message.id);
    upsert(message);
  }
  // Messages deleted while we were away: those in the range read that it no longer holds.
  const oldest = answer.messages.length ? Date.parse(answer.messages[0].created_at) : -Infinity;
  for (const id of before) {
    const article = articles.get(id);
    if (article && !seen.has(id) && timeOf(article) >= oldest) removeMessage(id);
  }
}

function setTitle(name) {
  if (!name) return;
  title.textContent = name;
  document.title = `${name} · Turbo`;
}

// --- older messages ---------------------------------------------------------------------------------

let hasOlder = !olderButton.hidden;
let loadingOlder = false;

async function loadOlder() {
  if (loadingOlder || !hasOlder) return;
  loadingOlder = true;
  olderButton.disabled = true;
  try {
    const oldest = log.querySelector("article.message");
    const answer = await readChat(oldest ? { limit: String(PAGE_SIZE), before: oldest.dataset.messageId } : {});
    mergeUsers(answer.users);
    const height = log.scrollHeight;
    const top = log.scrollTop;
    const older = document.createDocumentFragment();
    for (const message of answer.messages) {
      if (articles.has(message.id)) continue;
      const article = newArticle(message);
      applyMessage(article, message, true);
      older.append(article);
    }
    log.prepend(older);
    log.scrollTop = top + (log.scrollHeight - height); // the messages read stay where they were
    hasOlder = answer.messages.length === PAGE_SIZE;
    olderButton.hidden = !hasOlder;
    showNotice("");
  } catch (error) {
    showNotice(`Older messages could not be loaded: ${error.message}`);
  } finally {
    loadingOlder = false;
    olderButton.disabled = false;
  }
}

olderButton.addEventListener("click", loadOlder);
log.addEventListener("scroll", () => {
  if (log.scrollTop < 40 && log.scrollHeight > log.clientHeight) loadOlder();
});

// --- sending and stopping ---------------------------------------------------------------------------

let sending = false;
let stopping = false;

function updateStop() {
  stopButton.disabled = stopping || !log.querySelector('article.message[data-status="streaming"]');
}

function autosize() {
  promptBox.style.height = "auto";
  promptBox.style.height = `${Math.min(promptBox.scrollHeight + 2, window.innerHeight * 0.4)}px`;
}

// Send a prompt; true once the server has it (its message shows at once, its reply streams in).
async function sendPrompt(text) {
  const { response, answer } = await postJson("/chat/prompt", { id: chatId, prompt: text, stream: true });
  if (!response.ok) {
    showPromptError(errorText(answer, response));
    return false;
  }
  if (answer.message) upsert(answer.message);
  scrollToBottom();
  return true;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = promptBox.value;
  if (sending || !text.trim()) return;
  sending = true;
  sendButton.disabled = true;
  showPromptError("");
  try {
    const sent = editing ? await replaceMessage(editing, text) : await sendPrompt(text);
    if (!sent) return;
    stopEditing();
    if (promptBox.value === text) promptBox.value = "";
    autosize();
  } catch {
    showPromptError("The message could not be sent: check your connection and try again.");
  } finally {
    sending = false;
    sendButton.disabled = finished;
  }
});

promptBox.addEventListener("keydown", (event) => {
  // Enter sends; Shift+Enter adds a line; Enter that ends an IME composition only confirms it.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    form.requestSubmit();
  }
});
promptBox.addEventListener("input", autosize);

stopButton.addEventListener("click", async () => {
  stopping = true;
  updateStop();
  showPromptError("");
  try {
    const { response, answer } = await postJson("/chat/stop", { id: chatId });
    if (!response.ok) showPromptError(errorText(answer, response));
  } catch {
    showPromptError("The reply could not be stopped: check your connection and try again.");
  } finally {
    stopping = false;
    updateStop();
  }
});

// --- renaming and deleting the chat (its owner) -----------------------------------------------------

const renameButton = document.getElementById("rename-chat");
const renameForm = document.getElementById("rename-form");
if (renameButton && renameForm) {
  const nameBox = document.getElementById("rename-name");
  renameButton.addEventListener("click", () => {
    renameForm.hidden = !renameForm.hidden;
    if (!renameForm.hidden) {
      nameBox.value = title.textContent;
      nameBox.focus();
      nameBox.select();
    }
  });
  document.getElementById("rename-cancel").addEventListener("click", () => {
    renameForm.hidden = true;
  });
  renameForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = nameBox.value.trim();
    if (!name) return;
    try {
      const { response, answer } = await postJson("/chat/update", { id: chatId, name });
      if (!response.ok) {
        showNotice(`The chat could not be renamed: ${errorText(answer, response)}`);
        return;
      }
      setTitle(name);
      renameForm.hidden = true;
      showNotice("");
    } catch {
      showNotice("The chat could not be renamed: check your connection and try again.");
    }
  });
}

const deleteButton = document.getElementById("delete-chat");
if (deleteButton) {
  deleteButton.addEventListener("click", async () => {
    if (!window.confirm("Delete this chat and all its messages for everyone?")) return;
    try {
      const { response, answer } = await postJson("/chat/delete", { id: chatId });
      if (!response.ok) {
        showNotice(`The chat could not be deleted: ${errorText(answer, response)}`);
        return;
      }
      finished = true; // its stream ends now: no "deleted" notice, the page goes
      location.assign("/");
    } catch {
      showNotice("The chat could not be deleted: check your connection and try again.");
    }
  });
}

// --- live -------------------------------------------------------------------------------------------

let socket = null;
let lastSeq = null; // the seq of the last event shown
let attempts = 0;
let retryTimer = null;
let pingTimer = null;
let pongTimer = null;
let finished = false;

function setConnection(state, label) {
  connection.dataset.state = state;
  connection.textContent = label;
}

// The stream cannot come back (the chat was deleted, access or the session ended): say so and stop.
function finish(text) {
  if (finished) return;
  finished = true;
  clearTimeout(retryTimer);
  stopHeartbeat();
  const open = socket;
  socket = null;
  if (open) open.close();
  setConnection("closed", "Offline");
  showNotice(text);
  sendButton.disabled = true;
  promptBox.disabled = true;
}

function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  if (finished || socket) return;
  const params = new URLSearchParams({ id: chatId });
  if (lastSeq !== null) params.set("after", String(lastSeq));
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/chat/stream?${params}`);
  socket = ws;
  ws.addEventListener("open", () => {
    if (socket !== ws) return;
    attempts = 0;
    setConnection("open", "Live");
    startHeartbeat(ws);
    if (lastSeq === null) catchUp(); // what happened between the page's rendering and now
  });
  ws.addEventListener("message", (event) => {
    if (socket !== ws) return;
    clearTimeout(pongTimer);
    onFrame(event.data);
  });
  ws.addEventListener("close", (event) => {
    if (socket === ws) dropped(event.code);
  });
}

function dropped(code) {
  stopHeartbeat();
  socket = null;
  if (finished) return;
  if (CLOSED_FOR_GOOD[code]) {
    finish(CLOSED_FOR_GOOD[code]);
    return;
  }
  setConnection("reconnecting", "Reconnecting…");
  const delay = Math.min(30000, 500 * 2 ** attempts) * (0.5 + Math.random() / 2);
  attempts = Math.min(attempts + 1, 10);
  if (attempts >= 3) probe(); // a refused handshake says nothing: ask the API why
  retryTimer = setTimeout(connect, delay);
}

async function probe() {
  try {
    await readChat({ limit: "1" });
  } catch (error) {
    if ([401, 403, 404].includes(error.status)) finish(error.message);
  }
}

// A connection that died without a close frame is noticed by a ping that gets no answer.
function startHeartbeat(ws) {
  stopHeartbeat();
  pingTimer = setInterval(() => {
    if (ws.readyState !== WebSocket.OPEN) return;
    ws.send(JSON.stringify({ type: "ping" }));
    clearTimeout(pongTimer);
    pongTimer = setTimeout(() => {
      if (socket !== ws) return;
      socket = null; // its close event, whenever it comes, is ignored
      ws.close();
      dropped(1006);
    }, PONG_TIMEOUT_MS);
  }, PING_INTERVAL_MS);
}

function stopHeartbeat() {
  clearInterval(pingTimer);
  clearTimeout(pongTimer);
  pingTimer = pongTimer = null;
}

function onFrame(text) {
  let event;
  try {
    event = JSON.parse(text);
  } catch {
    return;
  }
  if (typeof event.seq === "number" && event.seq > 0) {
    if (lastSeq !== null && event.seq <= lastSeq) return; // shown already
    lastSeq = event.seq;
  }
  switch (event.type) {
    case "message.created":
    case "message.delta":
    case "message.completed":
    case "message.failed":
      if (event.message) upsert(event.message);
      break;
    case "message.deleted":
      removeMessage(event.message_id);
      break;
    case "chat.updated":
      setTitle(event.chat?.name);
      break;
    case "chat.deleted":
      finish(CLOSED_FOR_GOOD[4404]);
      break;
    case "member.added":
      refreshUsers();
      break;
    case "stream.gap":
      catchUp();
      break;
    case "stream.closed":
      finish(
        { chat_deleted: CLOSED_FOR_GOOD[4404], access: CLOSED_FOR_GOOD[4403], session: CLOSED_FOR_GOOD[4401] }[
          event.reason
        ] || event.message || "The live stream has ended.",
      );
      break;
    default:
      break; // pong, and notices followed by a close (stream.error, server.shutdown): reconnect then
  }
}

window.addEventListener("online", () => {
  if (retryTimer) connect();
});
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && retryTimer) connect();
});
window.addEventListener("pagehide", () => {
  finished = true;
  clearTimeout(retryTimer);
  if (socket) socket.close();
});

// --- start ------------------------------------------------------------------------------------------

for (const article of log.querySelectorAll("article.message")) {
  articles.set(article.dataset.messageId, article);
  const reply = article.querySelector(":scope > .reply");
  replies.set(article, { text: reply.textContent, timer: null });
  reply.replaceChildren(renderMarkdown(reply.textContent));
  article.setAttribute("aria-busy", String(article.dataset.status === "streaming"));
  decorate(article);
}
scrollToBottom();
updateStop();
setConnection("closed", "Connecting…");
connect();

// For tests and debugging in the console: the socket and where the stream stands.
window.turboChat = {
  get socket() {
    return socket;
  },
  get lastSeq() {
    return lastSeq;
  },
};
