// The shell: the key prompt, the tabs (Chat for every key; Dashboard and Placement for admin keys only) and
// the pages behind them. Admin pages are ES modules loaded on first use: `mount(container, api)`.
import { api, ApiError } from "./api.js";
import { startChat } from "./chat.js";

const $ = (id) => document.getElementById(id);
const ADMIN_PAGES = { dashboard: "./dashboard.js", placement: "./placement.js" };
const mounted = new Set();
let chatStarted = false;

// Who this key is: U2's /ui/api/whoami; where that route is missing, a 200 from /slots means admin.
async function whoami(key) {
  try {
    return await api.get("/ui/api/whoami", { key });
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 404) throw error;
  }
  await api.get("/v1/models", { key });
  try {
    await api.get("/slots", { key });
    return { name: "", scopes: ["inference", "admin"] };
  } catch {
    return { name: "", scopes: ["inference"] };
  }
}

function tabs() {
  return [...document.querySelectorAll("[role=tab]")].filter((tab) => !tab.hidden);
}

async function select(tab) {
  for (const other of document.querySelectorAll("[role=tab]")) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  const name = tab.id.replace("tab-", "");
  const panel = $(`panel-${name}`);
  if (ADMIN_PAGES[name] && !mounted.has(name)) {
    mounted.add(name);
    try {
      const page = await import(ADMIN_PAGES[name]);
      page.mount(panel, api);
    } catch (error) {
      panel.textContent = `This page could not be loaded: ${error.message}`;
    }
  }
}

function showApp(who) {
  const admin = who.scopes.includes("admin");
  $("tab-dashboard").hidden = !admin;
  $("tab-placement").hidden = !admin;
  $("who").textContent = who.name && who.name !== "anonymous" ? `${who.name} · ${who.scopes.join(", ")}` : "";
  $("key-prompt").hidden = true;
  $("app").hidden = false;
  if (!chatStarted) {
    chatStarted = true;
    startChat(api, { onUnauthorized: () => askForKey("The key was refused: enter it again.") });
  }
}

function askForKey(message = "") {
  $("app").hidden = true;
  $("key-prompt").hidden = false;
  $("key-error").textContent = message;
  $("key-input").value = "";
  $("key-input").focus();
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  $("key-error").textContent = "";
  try {
    const who = await whoami(key);
    api.setKey(key);
    $("change-key").hidden = false;
    showApp(who);
  } catch (error) {
    $("key-error").textContent =
      error.status === 401 || error.status === 403 ? `That key was not accepted (${error.status}): ${error.message}` : error.message;
  }
});

$("change-key").addEventListener("click", () => {
  api.setKey(null);
  askForKey();
});

for (const tab of document.querySelectorAll("[role=tab]")) {
  tab.addEventListener("click", () => select(tab));
  tab.addEventListener("keydown", (event) => {
    const list = tabs();
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = list[(list.indexOf(tab) + step + list.length) % list.length];
    next.focus();
    select(next);
  });
}

async function boot() {
  try {
    const who = await whoami(api.key());
    $("change-key").hidden = !api.key();
    showApp(who);
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      const saved = api.key();
      api.setKey(null);
      askForKey(saved ? "The saved key was refused." : "");
    } else {
      askForKey(`The server answered: ${error.message}`);
    }
  }
}

boot();
