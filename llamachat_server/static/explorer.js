// The Explorer host page: the helper functions module UIs (explore.html) call, written for this server
// with the signatures and behaviour of CodeProject.AI's explorer helpers, and the loader that inserts
// each running module's UI the way the real explorer does.

// ---- Globals module scripts may read ---------------------------------------------------------------

var serviceTimeoutSec = 30;                     // how long submitRequest waits for an answer
var apiServiceUrl = window.location.origin;     // requests go to the server that served this page

// ---- General helpers -------------------------------------------------------------------------------

function delay(ms) {
    return new Promise(resolve => setTimeout(resolve, ms));
}

function escapeHtml(text) {
    const div = document.createElement("div");
    div.textContent = text === undefined || text === null ? "" : String(text);
    return div.innerHTML;
}

// Writes a line into the status area (#status); variant is a colour: info, success, warning, danger...
function showLogOutput(text, variant) {
    const status = document.getElementById("status");
    if (!text) {
        if (status) status.innerHTML = "";
        return;
    }
    if (variant === "warning") console.log("WARN: " + text);
    else if (variant === "danger" || variant === "error") console.log("ERROR: " + text);
    else console.log(text);
    if (status) status.innerHTML = "<span class='text-" + (variant || "info") + "'>" + text + "</span>";
}

function showInfo(message) { showLogOutput(message, "info"); }
function showWarning(message) { showLogOutput(message, "warning"); }

function showError(status, error) {
    showLogOutput(error || (status ? "Error " + status : "Error"), "danger");
}

// Marks that a call to the server is under way (true) or over (false).
function showCommunication(active) {
    document.body.classList.toggle("communicating", !!active);
}

function setResultsHtml(html) {
    const results = document.getElementById("results");
    if (results) results.innerHTML = html;
}

// A small table of who processed a request and how long it took.
function getProcessingMetadataHtml(data) {
    if (!data) return "";
    const rows = [
        ["Processed by", data.moduleId],
        ["Processed on", data.processedBy],
        ["Analysis round trip", data.analysisRoundTripMs, "ms"],
        ["Processing", data.processMs, "ms"],
        ["Inference", data.inferenceMs, "ms"],
        ["Timestamp (UTC)", data.timestampUTC],
    ].filter(row => row[1] !== undefined && row[1] !== null);
    return "<table class='metadata'>" + rows.map(([label, value, unit]) =>
        "<tr><td>" + escapeHtml(label) + "</td><td>" + escapeHtml(value) + (unit ? " " + unit : "") + "</td></tr>"
    ).join("") + "</table>";
}

function displayBaseResults(data) {
    if (!data) {
        setResultsHtml("No response");
        return;
    }
    const outcome = data.success ? "Operation successful" : "Operation failed";
    const detail = data.success ? (data.message || "") : (data.error || "");
    setResultsHtml("<div>" + outcome + "</div><div>" + escapeHtml(detail) + "</div>" +
                   getProcessingMetadataHtml(data));
}

// ---- Image preview helpers (for modules that take an image) ---------------------------------------

function showPreviewImage(file) {
    const preview = document.getElementById("imgPreview");
    if (!preview || !file) return;
    preview.src = URL.createObjectURL(file);
    preview.style.display = "";
}

function previewImage(fileChooser) {
    if (fileChooser && fileChooser.files && fileChooser.files.length) showPreviewImage(fileChooser.files[0]);
}

function clearImagePreview() {
    const preview = document.getElementById("imgPreview");
    if (preview) {
        preview.removeAttribute("src");
        preview.style.display = "none";
    }
    const mask = document.getElementById("imgMask");
    if (mask && !document.getElementById("imgResult")) mask.innerHTML = "";
}

// ---- Calling the server ----------------------------------------------------------------------------

// A server started with --api-key answers 401 without the key: the page asks for it once, keeps it in
// sessionStorage (this tab only, gone when it closes; never localStorage) and sends it with every call.
const API_KEY_ITEM = "llamachat.apiKey";
let keyPrompt = null;       // the question being asked, shared by the calls that were refused meanwhile
let keyDeclined = false;    // the user cancelled: no more questions until the page is reloaded

function withKey(options) {
    const key = sessionStorage.getItem(API_KEY_ITEM);
    const headers = Object.assign({}, options && options.headers, key ? { Authorization: "Bearer " + key } : {});
    return Object.assign({}, options, { headers: headers });
}

function askForKey(refusedKey) {
    if (!keyPrompt) {
        keyPrompt = Promise.resolve().then(() => {
            const current = sessionStorage.getItem(API_KEY_ITEM);
            if (current && current !== refusedKey) return true;  // another call got a new key meanwhile
            const key = window.prompt(current ? "The server refused that API key. API key:"
                                              : "This server needs an API key (its --api-key). API key:");
            if (!key || !key.trim()) {
                keyDeclined = true;
                return false;
            }
            sessionStorage.setItem(API_KEY_ITEM, key.trim());
            return true;
        }).finally(() => { keyPrompt = null; });
    }
    return keyPrompt;
}

// fetch(), with the API key if there is one; a 401 asks for the key and tries once more.
async function fetchWithKey(url, options) {
    const sentKey = sessionStorage.getItem(API_KEY_ITEM);
    const response = await fetch(url, withKey(options));
    if (response.status !== 401 || keyDeclined || !(await askForKey(sentKey))) return response;
    return fetch(url, withKey(options));
}

function serverUrl() {
    // A page that has a #serviceUrl box (a standalone explore.html) may point elsewhere; ours has none.
    const box = document.getElementById("serviceUrl");
    const chosen = box && box.value ? box.value.trim().replace(/\/+$/, "") : "";
    return chosen || apiServiceUrl;
}

function timeoutSec() {
    const box = document.getElementById("serviceTimeoutSecTxt");
    const chosen = box ? parseFloat(box.value) : NaN;
    return chosen > 0 ? chosen : serviceTimeoutSec;
}

// POSTs a multipart form to /v1/<route>[/<apiName>]: images as image1, image2..., parameters as
// [name, value] pairs. Returns the parsed JSON (also when it says success: false) or null on failure.
async function submitRequest(route, apiName, images, parameters) {
    const form = new FormData();
    (images || []).forEach((image, i) => form.append("image" + (i + 1), image));
    (parameters || []).forEach(([name, value]) => form.append(name, value));

    const url = serverUrl() + "/v1/" + route + (apiName ? "/" + apiName : "");
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), timeoutSec() * 1000);
    showCommunication(true);
    try {
        const response = await fetchWithKey(url, { method: "POST", body: form, signal: controller.signal });
        if (!response.ok) {
            showError(response.status, "Unable to complete API call (" + response.status + " " +
                      response.statusText + ")");
            return null;
        }
        return await response.json();
    } catch (error) {
        if (error.name === "AbortError")
            showError(null, "Response timeout. Try increasing the timeout value");
        else
            showError(null, "Error contacting API server: " + error.message);
        return null;
    } finally {
        clearTimeout(timer);
        showCommunication(false);
    }
}

async function makeGET(path) {
    try {
        const response = await fetchWithKey(serverUrl() + "/v1/" + path);
        if (!response.ok) return { success: false, error: "HTTP " + response.status + " " + response.statusText };
        return await response.json();
    } catch (error) {
        return { success: false, error: error.message };
    }
}

async function makePOST(path, key, value) {
    const form = new FormData();
    form.append("name", key);
    form.append("value", value);
    try {
        const response = await fetchWithKey(serverUrl() + "/v1/" + path, { method: "POST", body: form });
        if (!response.ok) return { success: false, error: "HTTP " + response.status + " " + response.statusText };
        return await response.json();
    } catch (error) {
        return { success: false, error: error.message };
    }
}

// ---- Colour mode ----------------------------------------------------------------------------------

// The real Explorer starts dark and switches with a toggle in its header, by the dark-mode class on <body> that
// module UIs style themselves by.
function toggleColourMode() {
    const dark = document.body.classList.toggle("dark-mode");
    const toggle = document.getElementById("colourModeToggle");
    const label = dark ? "Switch to light mode" : "Switch to dark mode";
    toggle.textContent = dark ? "☀️" : "🌙";
    toggle.setAttribute("aria-label", label);
    toggle.title = label;
}

// ---- Loading module UIs ----------------------------------------------------------------------------

const insertedModules = new Set();

// Like the real explorer: _MID_ becomes "<ModuleId>_" so ids and globals of different modules can't clash.
function substituteModuleId(text, moduleId) {
    const key = moduleId.replace(/[^a-zA-Z0-9]+/g, "");
    return (text || "").replace(/_MID_/g, key + "_");
}

// Inserted once per page load: re-running a module's script would redeclare its top-level names.
function insertModuleUi(module) {
    const ui = (module.uiElements && module.uiElements.explorerUI) || {};
    const key = module.moduleId.replace(/[^a-zA-Z0-9]+/g, "");

    const style = document.createElement("style");
    style.id = "style_" + key;
    style.textContent = substituteModuleId(ui.css, module.moduleId);
    document.head.appendChild(style);

    const card = "<div class='card moduleui " + escapeHtml(module.launchSettings && module.launchSettings.queue) +
                 "' data-moduleid='" + escapeHtml(module.moduleId) + "'>" +
                 "<div class='card-header'>" + escapeHtml(module.name) + "</div>" +
                 "<div class='card-body'>" + substituteModuleId(ui.html, module.moduleId) + "</div></div>";
    document.getElementById("modulePanels").insertAdjacentHTML("beforeend", card);

    const script = document.createElement("script");
    script.id = "script_" + key;
    script.textContent = substituteModuleId(ui.script, module.moduleId);
    document.body.appendChild(script);
    insertedModules.add(module.moduleId);
}

async function showModuleStatus() {
    const badge = document.getElementById("moduleStatus");
    const data = await makeGET("module/list/status");
    if (!data.success) {
        badge.textContent = "Server unreachable";
        badge.className = "badge badge-danger";
        return;
    }
    badge.textContent = data.statuses.map(s => s.name + ": " + s.status).join(", ");
    const allStarted = data.statuses.every(s => s.status === "Started");
    badge.className = "badge " + (allStarted ? "badge-success" : "badge-warning");
}

async function loadModuleUis() {
    const data = await makeGET("module/list/running");
    for (const module of (data.success ? data.modules : [])) {
        if (!insertedModules.has(module.moduleId)) insertModuleUi(module);
    }
    document.getElementById("waiting").style.display = insertedModules.size ? "none" : "";
}

async function runExplorer() {
    while (true) {
        await showModuleStatus();
        await loadModuleUis();
        await delay(insertedModules.size ? 5000 : 1000);
    }
}

document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("colourModeToggle").addEventListener("click", toggleColourMode);
    runExplorer();
});
