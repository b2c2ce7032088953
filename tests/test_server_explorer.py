"""llamachat_server's Explorer: the module UI cut from explore.html's markers, and the host page at `/` that runs
it in a real browser (Debian's chromium) with `_MID_` substituted and our helpers, against the real module.

The explore.html here is a small one written for this test (in a copy of the module folder), so the host page
is tested on its own, whatever the module's real explore.html looks like."""

import re

import pytest
import requests

from css_colours import luminance
from live_server import ROOT, running_server

STYLE = "._MID_card { color: rgb(1, 2, 3); }"
MARKUP = """<div class="_MID_card" id="_MID_panel">
  <input id="_MID_prompt" value="Say hello.">
  <button id="_MID_send">Send</button>
  <script>window.markupScriptRan = true;</script>
</div>"""
SCRIPT = """async function _MID_chat() {
    setResultsHtml("Sending...");
    const ack = await submitRequest("text", "chat", null, [["prompt", _MID_prompt.value], ["max_tokens", "8"]]);
    if (!ack || !ack.success) { showLogOutput("chat failed", "danger"); return; }
    let answer;
    do {
        await delay(100);
        answer = await submitRequest("LlamaChat", "get_command_status", null, [["commandId", ack.commandId]]);
    } while (answer && answer.commandStatus === "running");
    setResultsHtml("<span id='_MID_reply'></span>");
    document.getElementById("_MID_reply").textContent = answer.reply;
    showLogOutput("done: " + answer.stop_reason, "success");
}
document.getElementById("_MID_send").addEventListener("click", _MID_chat);"""
EXPLORE_HTML = f"""<!DOCTYPE html>
<html><head><style>
/* START EXPLORER STYLE */
{STYLE}
/* END EXPLORER STYLE */
</style></head>
<body>
<div id="standalone-only">not part of the Explorer UI</div>
<!-- START EXPLORER MARKUP -->
{MARKUP}
<!-- END EXPLORER MARKUP -->
<script>
// START EXPLORER SCRIPT
{SCRIPT}
// END EXPLORER SCRIPT
</script>
</body></html>"""


@pytest.fixture(scope="module")
def base_url(smollm2, tmp_path_factory):
    """The real module, from a copy of the module folder whose explore.html is the one above."""
    module_dir = tmp_path_factory.mktemp("module")
    for source in ROOT.iterdir():
        if source.is_file() and source.suffix in (".py", ".json") or source.name == "llamachat":
            (module_dir / source.name).symlink_to(source)
    (module_dir / "explore.html").write_text(EXPLORE_HTML)
    with running_server(smollm2, module_dir) as url:
        yield url


def test_running_module_lists_its_ui_cut_from_the_markers(base_url):
    modules = requests.get(f"{base_url}/v1/module/list/running", timeout=10).json()["modules"]
    ui = modules[0]["uiElements"]["explorerUI"]
    # Cut verbatim: `_MID_` is left for the Explorer page to replace, as the real server does.
    assert ui == {"html": MARKUP, "css": STYLE, "script": SCRIPT}


def test_host_page_is_self_contained(base_url):
    page = requests.get(f"{base_url}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert 'id="status"' in page.text
    assert 'id="results"' in page.text
    assert 'id="serviceUrl"' not in page.text  # requests go to the page's own origin
    assets = re.findall(r'(?:src|href)="(/assets/[^"]+)"', page.text)
    assert sorted(assets) == ["/assets/explorer.css", "/assets/explorer.js"]
    for text in [page.text] + [requests.get(f"{base_url}{asset}", timeout=10).text for asset in assets]:
        assert not re.search(r"https?://", text), "the Explorer must load nothing from outside (no CDN)"


def test_explorer_page_runs_the_module_ui_and_chats_through_the_helpers(base_url, browser):
    requested = []
    with browser.new_context() as context:
        page = context.new_page()
        page.on("request", lambda request: requested.append(request.url))
        page.goto(f"{base_url}/")
        page.wait_for_selector("#LlamaChat_panel", timeout=30_000)

        assert "_MID_" not in page.content()
        assert page.eval_on_selector(".LlamaChat_card", "e => getComputedStyle(e).color") == "rgb(1, 2, 3)"
        # Markup goes in as HTML, so a <script> inside it does not run (as in the real Explorer).
        assert page.evaluate("window.markupScriptRan") is None
        assert page.locator("#standalone-only").count() == 0
        page.wait_for_function("() => document.getElementById('moduleStatus').textContent === 'LlamaChat: Started'")

        page.click("#LlamaChat_send")
        page.wait_for_function(
            "() => (document.getElementById('status').textContent || '').startsWith('done: ')", timeout=60_000
        )
        assert page.inner_text("#LlamaChat_reply").strip()
        assert page.inner_text("#status") in ("done: completed", "done: length")
        assert page.locator("#status .text-success").count() == 1
    assert requested
    assert all(url.startswith(base_url) for url in requested)
    assert f"{base_url}/v1/text/chat" in requested
    assert f"{base_url}/v1/LlamaChat/get_command_status" in requested


def test_explorer_starts_dark_and_the_toggle_switches_module_uis_too(base_url, browser):
    """As the real Explorer: dark at first, a header toggle (a labelled button, so also from the keyboard) switches
    the dark-mode class on <body> that module UIs style themselves by."""
    with browser.new_context(color_scheme="light") as context:
        page = context.new_page()
        page.goto(f"{base_url}/")
        page.wait_for_selector("#LlamaChat_panel", timeout=30_000)
        toggle = page.get_by_role("button", name="Switch to light mode")

        def look():
            return page.evaluate(
                """() => [document.body.classList.contains("dark-mode"),
                          getComputedStyle(document.body).backgroundColor,
                          getComputedStyle(document.querySelector(".card")).backgroundColor]"""
            )

        dark, body, card = look()
        assert dark
        assert luminance(body) < 0.2
        assert luminance(card) < 0.2

        toggle.focus()
        page.keyboard.press("Enter")
        dark, body, card = look()
        assert not dark
        assert luminance(body) > 0.8
        assert luminance(card) > 0.8
        assert page.get_by_role("button", name="Switch to dark mode").count() == 1

        page.get_by_role("button", name="Switch to dark mode").click()
        assert look()[0]
