"""The Explorer page's own defences, in a real browser (Debian's chromium through Playwright) against a real server
with no module (the test plays the module's first poll, so the page shows the module's UI):
- with --api-key, the page asks for the key once when a call answers 401, keeps it in sessionStorage only, and sends
  it with every call, the module UI's included;
- its Content-Security-Policy lets the module's script run (by hash) and nothing inline that a page injection could
  add."""

import threading

import pytest
import requests

from live_server import no_module_config, serve_in_thread

KEY = "page-key-0123456789"
RECORD_VIOLATIONS = (
    "window.violations = [];"
    "document.addEventListener('securitypolicyviolation', e => window.violations.push(e.violatedDirective));"
)


def serve(tmp_path_factory, **config):
    return serve_in_thread(no_module_config(tmp_path_factory.mktemp("data"), response_timeout=2.0, **config))


def module_polls_once(url: str) -> None:
    """The module's first poll, which makes it Started (the page then shows its UI); it waits up to 10 s."""
    poll = threading.Thread(
        target=requests.get,
        args=(f"{url}/v1/queue/llamachat_queue",),
        kwargs={"params": {"moduleId": "LlamaChat"}, "timeout": 20},
        daemon=True,
    )
    poll.start()


@pytest.fixture(scope="module")
def keyed_url(tmp_path_factory):
    with serve(tmp_path_factory, api_keys=[KEY]) as url:
        module_polls_once(url)
        yield url


@pytest.fixture(scope="module")
def open_url(tmp_path_factory):
    with serve(tmp_path_factory) as url:
        module_polls_once(url)
        yield url


def test_the_page_asks_for_the_key_once_and_keeps_it_for_the_tab_only(keyed_url, browser):
    with browser.new_context() as context:
        page = context.new_page()
        asked, chats = [], []
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept(KEY)))
        page.on("request", lambda r: chats.append(r) if r.url.endswith("/v1/text/chat") else None)
        page.goto(f"{keyed_url}/")
        page.wait_for_function("() => document.getElementById('moduleStatus').textContent === 'LlamaChat: Started'")
        page.wait_for_selector("#LlamaChat_root", timeout=30_000)

        page.fill("#LlamaChat_prompt", "Hello")
        page.click("#LlamaChat_sendBtn")  # the module UI's own call, through the page's submitRequest
        page.wait_for_function("() => document.body.classList.contains('communicating')")
        assert len(asked) == 1
        assert "API key" in asked[0]
        assert chats
        assert chats[-1].headers["authorization"] == f"Bearer {KEY}"
        assert page.evaluate("sessionStorage.getItem('llamachat.apiKey')") == KEY
        stored = page.evaluate("JSON.stringify(Object.assign({}, localStorage))")
        assert KEY not in stored  # never kept beyond the tab


def test_without_keys_the_page_never_asks(open_url, browser):
    with browser.new_context() as context:
        page = context.new_page()
        asked = []
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
        page.goto(f"{open_url}/")
        page.wait_for_function("() => document.getElementById('moduleStatus').textContent === 'LlamaChat: Started'")
        page.wait_for_selector("#LlamaChat_root", timeout=30_000)
        assert asked == []


def test_the_module_script_runs_and_injected_inline_script_does_not(open_url, browser):
    with browser.new_context() as context:
        page = context.new_page()
        page.add_init_script(RECORD_VIOLATIONS)
        page.goto(f"{open_url}/")
        page.wait_for_selector("#LlamaChat_root", timeout=30_000)
        page.wait_for_selector("#script_LlamaChat", state="attached")
        # The module's script ran (it binds the send button: a click posts the chat) and broke no rule.
        chats = []
        page.on("request", lambda r: chats.append(r.url) if r.url.endswith("/v1/text/chat") else None)
        page.fill("#LlamaChat_prompt", "Hello")
        page.click("#LlamaChat_sendBtn")
        page.wait_for_function("() => document.body.classList.contains('communicating')")
        assert chats
        assert page.evaluate("window.violations") == []

        # Markup that slipped into the page (say, through a rendering bug) cannot run script.
        page.evaluate(
            """() => {
                document.body.insertAdjacentHTML("beforeend", '<img src="data:," onerror="window.pwned = 1">');
                const script = document.createElement("script");
                script.textContent = "window.pwned = 2";
                document.body.appendChild(script);
            }"""
        )
        page.wait_for_function("() => window.violations.length >= 2")
        assert page.evaluate("window.pwned") is None
        assert set(page.evaluate("window.violations")) <= {"script-src-attr", "script-src-elem", "script-src"}
