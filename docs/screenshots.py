"""Takes the chat page's screenshots in docs/: a real chat with the SmolLM2 test model (a reply with a code block,
then one with a list) in Debian's chromium, light in our server's Explorer and dark in the page opened on its own
with the system's dark mode.

    .venv/bin/python docs/screenshots.py        # writes docs/explorer-chat-light.png and docs/explorer-chat-dark.png
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path[:0] = [str(DOCS.parent), str(DOCS.parent / "tests")]

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from live_server import running_server  # noqa: E402
from model_paths import smollm2_path  # noqa: E402

PROMPTS = [
    "Write a Python function that reverses a string, in a code block, then give a bulleted list of three tips.",
    "Give me three tips for naming Python functions, as a numbered list with a short example each.",
]


def chat(page, prefix: str) -> None:
    """Sends the prompts and leaves the first reply's code block in view, the second reply's list below it."""
    root = page.locator(f"#{prefix}root")
    expect(root).to_be_visible(timeout=60_000)
    page.locator(f"#{prefix}root summary").click()
    page.locator(f"#{prefix}temperature").fill("0")  # the same replies every time
    page.locator(f"#{prefix}maxTokens").fill("220")
    page.locator(f"#{prefix}root summary").click()
    for count, prompt in enumerate(PROMPTS, 1):
        page.locator(f"#{prefix}prompt").fill(prompt)
        page.locator(f"#{prefix}prompt").press("Enter")
        expect(page.locator(f".{prefix}user")).to_have_count(count)
        expect(root).to_have_attribute("data-state", "idle", timeout=120_000)
    page.locator(f"#{prefix}prompt").blur()
    page.locator(f".{prefix}assistant").first.evaluate("turn => turn.scrollIntoView()")


def main() -> None:
    # The page opened from a file (for the dark shot) has the origin null, which the server must allow.
    with running_server(smollm2_path(), server_args=("--allow-origin", "null")) as base_url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        viewport = {"width": 1000, "height": 1200}
        # Light: in our server's Explorer (dark at first, as the real one: its toggle), the card cut out of the page.
        page = browser.new_page(viewport=viewport)
        page.goto(f"{base_url}/")
        page.get_by_role("button", name="Switch to light mode").click()
        chat(page, "LlamaChat_")
        page.locator(".moduleui").screenshot(path=DOCS / "explorer-chat-light.png")
        # Dark: explore.html opened on its own, following the system's dark mode.
        page = browser.new_page(viewport=viewport, color_scheme="dark")
        page.goto((DOCS.parent / "explore.html").as_uri())
        page.locator("#serviceUrl").fill(base_url)
        chat(page, "_MID_")
        page.screenshot(path=DOCS / "explorer-chat-dark.png")
        browser.close()


if __name__ == "__main__":
    main()
