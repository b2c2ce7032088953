"""The recipes in docs/integrations.md and the README's, run as the pages write them (only the server's address is
the test's) against a live server with the real module on SmolLM2: the `openai` package, LangChain, and the native
API from JavaScript in a real browser. What the model writes is not checked, only that each recipe works: it runs
to its end, and what it returns has the shape and properties any machine gives."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from live_server import ROOT

PAGES = [ROOT / "README.md", ROOT / "docs" / "integrations.md"]
RECIPE = re.compile(r"<!-- recipe: (?P<name>\w+) -->\n```\w+\n(?P<code>.*?)```", re.S)
# The address each recipe is written with on the page; the test puts its own server's there.
DOC_ADDRESS = {
    "quickstart": "http://127.0.0.1:32168",
    "openai": "http://127.0.0.1:32168",
    "langchain": "http://127.0.0.1:32168",
    "javascript": "http://localhost:32168",
}


def recipes() -> dict[str, str]:
    """Every recipe on the pages, by name: its code."""
    return {m["name"]: m["code"] for page in PAGES for m in RECIPE.finditer(page.read_text(encoding="utf-8"))}


def recipe(name: str, base_url: str) -> str:
    """The recipe's code from its page, pointed at base_url."""
    code = recipes().get(name)
    assert code is not None, f"no recipe '{name}' on the pages (<!-- recipe: {name} --> before its block)"
    assert DOC_ADDRESS[name] in code, f"the {name} recipe no longer uses {DOC_ADDRESS[name]}"
    return code.replace(DOC_ADDRESS[name], base_url)


def run_python(code: str, tmp_path) -> str:
    script = tmp_path / "recipe.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, f"the recipe failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_openai_recipe_runs_as_written(smollm2_server, tmp_path):
    out = run_python(recipe("openai", smollm2_server), tmp_path)
    assert re.search(r"CompletionUsage\(completion_tokens=\d+, prompt_tokens=\d+", out), out
    parsed = out.strip().splitlines()[-1]
    assert re.fullmatch(r"name='.{0,40}' moons=\d{1,3}", parsed), (
        f"the last line should be the parsed Planet: {parsed!r}"
    )


def test_the_readmes_openai_example_runs_as_written(smollm2_server, tmp_path):
    run_python(recipe("quickstart", smollm2_server), tmp_path)


def test_the_langchain_recipe_runs_as_written(smollm2_server, tmp_path):
    out = run_python(recipe("langchain", smollm2_server), tmp_path)
    assert out.endswith("\n")  # the streamed story ends with the recipe's closing print()


class _AppPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>an app on this machine</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def app_page_url():
    """A web page of this machine on another port than LlamaChat's, from a real HTTP server: the browser allows a
    loopback page to call loopback servers (a page it cannot place is refused by Local Network Access)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AppPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _javascript_recipe_in_a_page(browser, page_url: str, base_url: str, use: str) -> dict:
    """Runs the JavaScript recipe, then `use` (JavaScript returning a value), in a page of another origin of this
    machine."""
    page = browser.new_page()
    try:
        page.goto(page_url)
        return page.evaluate("async () => {\n" + recipe("javascript", base_url) + "\n" + use + "\n}")
    finally:
        page.close()


def test_the_javascript_recipe_chats_from_a_web_page(smollm2_server, browser, app_page_url):
    result = _javascript_recipe_in_a_page(
        browser,
        app_page_url,
        smollm2_server,
        "const seen = [];\n"
        "const status = await askLlamaChat('Name three planets.', (text) => seen.push(text), { max_tokens: 16 });\n"
        "return { status, seen };",
    )
    status, seen = result["status"], result["seen"]
    assert status["commandStatus"] == "completed" and status["success"] is True
    assert status["stop_reason"] in ("completed", "length") and 0 < status["completion_tokens"] <= 16
    assert seen and seen[-1] == status["reply"]
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:])), "the reply only ever grows"


def test_the_javascript_recipe_stops_a_chat_and_keeps_its_text(smollm2_server, browser, app_page_url):
    result = _javascript_recipe_in_a_page(
        browser,
        app_page_url,
        smollm2_server,
        "let stopping = null;\n"
        "const seen = [];\n"
        "const status = await askLlamaChat('Write a long story about a dragon.', (text, commandId) => {\n"
        "  seen.push(text);\n"
        "  if (text && !stopping) stopping = stopLlamaChat(commandId);\n"
        "}, { max_tokens: 400 });\n"
        "return { status, seen, stopped: stopping ? await stopping : null };",
    )
    status, seen, stopped = result["status"], result["seen"], result["stopped"]
    assert stopped is not None and stopped["success"] is True
    first_text = next(text for text in seen if text)
    assert status["reply"].startswith(first_text)
    # The stop goes out on the first poll that shows text; a reply can only beat it by ending on its own first.
    assert status["stop_reason"] == "cancelled" or (
        status["stop_reason"] == "completed" and stopped["commandStatus"] == "completed"
    ), status


def test_every_recipe_on_the_pages_is_run_here():
    assert set(recipes()) == set(DOC_ADDRESS), "a recipe without a test here (or a test without its recipe)"


@pytest.mark.parametrize("name", sorted(DOC_ADDRESS))
def test_recipes_are_fenced_with_their_language(name):
    text = "".join(page.read_text(encoding="utf-8") for page in PAGES)
    language = "javascript" if name == "javascript" else "python"
    assert f"<!-- recipe: {name} -->\n```{language}\n" in text
