"""The chat page's replies as Markdown, its buttons and its kept conversation, in Debian's chromium: the page is
served by a real llamachat_server (the real module on SmolLM2) at `/`, as the Explorer hosts it.

A model cannot be made to answer with exact Markdown, so most tests here feed known replies through the page's own
code path with `ReplyDouble`, a named test double of the two chat endpoints installed in the browser (page.route):
the page sends its real requests and renders what the double answers, step by step while "running". The real
end-to-end chats (growth over polls, Stop, Esc, Regenerate/Edit against the model) are in test_explorer_chat.py.

One browser and one page for the whole module; each test starts from a fresh load with empty storage. A JavaScript
error, a dialog, or a request to anything but the server fails the test."""

from __future__ import annotations

import json

import pytest
from playwright.sync_api import Page, Route, expect

from css_colours import luminance
from live_server import ROOT, running_server
from page_requests import form_fields

P = "LlamaChat_"  # the prefix the Explorer gives the page's ids and classes
BUBBLES = f".{P}assistant .{P}bubble"
# Every element a rendered reply may contain, and the only attributes they may carry.
ALLOWED_TAGS = {
    "P", "H1", "H2", "H3", "H4", "H5", "H6", "STRONG", "EM", "DEL", "CODE", "PRE", "UL", "OL", "LI", "BLOCKQUOTE",
    "TABLE", "THEAD", "TBODY", "TR", "TH", "TD", "A", "HR", "BR", "DIV", "SPAN", "BUTTON",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {"class", "href", "target", "rel", "start", "style", "data-lang", "type", "aria-label", "tabindex"}


class ReplyDouble:
    """Test double of POST /v1/text/chat and /v1/LlamaChat/get_command_status, in the browser. Each chat gets its
    own command id and answers "queued" with the entries of `queued`, then "running" with the texts in `steps` (one
    per poll, the last one repeated while `hold` is set), then "completed" with `reply`; a cancel while queued ends
    it with nothing generated, as the module's queue does. Keeps every chat request's form fields in `chats`."""

    def __init__(self, page: Page):
        self.page = page
        self.chats: list[dict] = []
        self.steps: list[str] = []
        self.reply = ""
        self.hold = False
        self.queued: list[dict] = []  # "queued" answers to give before the first "running" one
        self.cancels: list[str] = []  # the command ids the page cancelled
        self._served: dict[str, int] = {}
        page.route("**/v1/text/chat", self._chat)
        page.route("**/v1/LlamaChat/get_command_status", self._status)
        page.route("**/v1/LlamaChat/cancel_command", self._cancel)

    def answer(self, reply: str, steps: list[str] | None = None, hold: bool = False) -> ReplyDouble:
        self.reply, self.steps, self.hold = reply, list(steps or []), hold
        return self

    def _chat(self, route: Route) -> None:
        self.chats.append(form_fields(route.request))
        command_id = f"double-{len(self.chats)}"
        self._served[command_id] = 0
        route.fulfill(json={"success": True, "commandId": command_id, "moduleId": "LlamaChat", "message": "started"})

    def _cancel(self, route: Route) -> None:
        self.cancels.append(form_fields(route.request)["commandId"])
        route.fulfill(json={"success": True, "message": "cancelled"})

    def _status(self, route: Route) -> None:
        command_id = form_fields(route.request)["commandId"]
        served = self._served[command_id]
        self._served[command_id] = served + 1
        base = {"success": True, "commandId": command_id, "moduleId": "LlamaChat", "model": "double.gguf"}
        if command_id in self.cancels and served < len(self.queued):  # cancelled while queued: nothing generated
            route.fulfill(json={**base, "commandStatus": "completed", "reply": "", "stop_reason": "cancelled"})
        elif served < len(self.queued):
            route.fulfill(json={**base, "commandStatus": "queued", "reply": "", **self.queued[served]})
        elif served - len(self.queued) < len(self.steps) or (self.hold and self.steps):
            text = self.steps[min(served - len(self.queued), len(self.steps) - 1)]
            route.fulfill(json={**base, "commandStatus": "running", "reply": text, "completion_tokens": len(text)})
        else:
            route.fulfill(
                json={
                    **base,
                    "commandStatus": "completed",
                    "reply": self.reply,
                    "stop_reason": "stop",
                    "completion_tokens": len(self.reply),
                    "elapsed_ms": 1000,
                }
            )

    def messages(self, chat: int = -1) -> list[dict]:
        fields = self.chats[chat]
        return json.loads(fields["messages"]) if "messages" in fields else []


@pytest.fixture(scope="module")
def server(smollm2):
    with running_server(smollm2) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def shared(browser, server):
    """The module's one page (clipboard allowed) and what went wrong on it: errors, dialogs, foreign requests."""
    context = browser.new_context(viewport={"width": 1000, "height": 860})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    problems = {"page errors": [], "dialogs": [], "requests to anything but the server": []}

    def guard(route: Route) -> None:
        # The page itself opened from its file (for the system dark mode) is no request to anyone.
        if route.request.url.startswith((server + "/", "file://")):
            route.continue_()
        else:
            problems["requests to anything but the server"].append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    page.on("pageerror", lambda error: problems["page errors"].append(str(error)))
    page.on("dialog", lambda dialog: (problems["dialogs"].append(dialog.message), dialog.dismiss()))
    yield page, problems
    context.close()


def load(page: Page, server: str) -> None:
    page.goto(f"{server}/")
    expect(page.locator(f"#{P}root")).to_be_visible(timeout=30_000)


@pytest.fixture
def page(shared, server) -> Page:
    """The shared page, freshly loaded with nothing kept from an earlier test."""
    page, problems = shared
    page.unroute_all(behavior="ignoreErrors")
    page.emulate_media(color_scheme="light")
    load(page, server)
    page.evaluate("localStorage.clear()")
    load(page, server)
    yield page
    page.unroute_all(behavior="ignoreErrors")
    assert problems == {"page errors": [], "dialogs": [], "requests to anything but the server": []}


@pytest.fixture
def double(page) -> ReplyDouble:
    return ReplyDouble(page)


def el(page: Page, name: str):
    return page.locator(f"#{P}{name}")


def send(page: Page, prompt: str) -> None:
    el(page, "prompt").fill(prompt)
    el(page, "prompt").press("Enter")


def wait_idle(page: Page) -> None:
    expect(el(page, "root")).to_have_attribute("data-state", "idle", timeout=30_000)


def chat(page: Page, double: ReplyDouble, prompt: str, reply: str) -> None:
    double.answer(reply)
    send(page, prompt)
    expect(page.locator(BUBBLES)).not_to_have_count(0)
    wait_idle(page)


def storage_key(server: str) -> str:
    return f"{P}conversation {server}"


EVERY_ELEMENT = """# Heading one
## Heading two
### Heading three

Some **bold**, *italic*, _also italic_, ~~struck~~ and `inline code`.
A second line of the same paragraph.

> A quoted line
> with **emphasis**.

- one
- two
  - two point one
  - two point two
- three

3. third
4. fourth

| Name | Count |
|:-----|------:|
| a    | 1     |
| `b`  | 22    |

```python
def greet(name):
    return f"Hello, {name} <b>!</b>"
```

[a site](https://example.com/page?q=1), <mailto:someone@example.com> and https://example.org/path.

---

Last words."""


def structure(page: Page) -> dict:
    """What the newest reply rendered to, as plain data."""
    return page.evaluate(
        """selector => {
        const all = document.querySelectorAll(selector), b = all[all.length - 1];
        const texts = css => Array.from(b.querySelectorAll(css), n => n.textContent);
        return {
            children: Array.from(b.children, n => n.tagName),
            h: [1, 2, 3].map(level => texts("h" + level)),
            strong: texts("strong"), em: texts("em"), del: texts("del"),
            inlineCode: texts(":not(pre) > code"),
            paragraphs: Array.from(b.querySelectorAll(":scope > p"), p => p.innerHTML),
            quote: texts("blockquote > p"),
            ul: Array.from(b.querySelectorAll(":scope > ul > li"), li => li.firstChild.textContent.trim()),
            nested: texts(":scope > ul > li > ul > li"),
            ol: texts(":scope > ol > li"), olStart: b.querySelector("ol").getAttribute("start"),
            th: texts("th"), td: texts("td"),
            align: Array.from(b.querySelectorAll("th"), n => n.style.textAlign),
            lang: Array.from(b.querySelectorAll("[data-lang]"), n => n.dataset.lang),
            code: texts("pre > code"),
            copyLabels: Array.from(b.querySelectorAll("button"), n => n.getAttribute("aria-label")),
            links: Array.from(b.querySelectorAll("a"), a => [a.textContent, a.getAttribute("href"), a.target, a.rel]),
            hr: b.querySelectorAll("hr").length,
        };
    }""",
        BUBBLES,
    )


def test_every_markdown_element_renders_to_its_element(page, double):
    chat(page, double, "Show me everything.", EVERY_ELEMENT)
    seen = structure(page)
    assert seen["children"] == [
        "H1", "H2", "H3", "P", "BLOCKQUOTE", "UL", "OL", "DIV", "DIV", "P", "HR", "P",
    ]  # fmt: skip
    assert seen["h"] == [["Heading one"], ["Heading two"], ["Heading three"]]
    assert seen["strong"] == ["bold", "emphasis"]
    assert seen["em"] == ["italic", "also italic"]
    assert seen["del"] == ["struck"]
    assert seen["inlineCode"] == ["inline code", "b"]
    assert seen["paragraphs"][0].endswith("<code>inline code</code>.<br>A second line of the same paragraph.")
    assert seen["quote"] == ["A quoted linewith emphasis."]  # one paragraph, its line break a <br>
    assert seen["ul"] == ["one", "two", "three"]
    assert seen["nested"] == ["two point one", "two point two"]
    assert seen["ol"] == ["third", "fourth"]
    assert seen["olStart"] == "3"
    assert seen["th"] == ["Name", "Count"]
    assert seen["td"] == ["a", "1", "b", "22"]
    assert seen["align"] == ["left", "right"]
    assert seen["lang"] == ["python"]
    assert seen["code"] == ['def greet(name):\n    return f"Hello, {name} <b>!</b>"']
    assert seen["copyLabels"] == ["Copy code (python)"]
    assert seen["links"] == [
        ["a site", "https://example.com/page?q=1", "_blank", "noopener noreferrer"],
        ["someone@example.com", "mailto:someone@example.com", "_blank", "noopener noreferrer"],
        ["https://example.org/path", "https://example.org/path", "_blank", "noopener noreferrer"],
    ]
    assert seen["hr"] == 1
    # A wide code block scrolls sideways inside the reply instead of widening the page.
    pre = page.locator(f"{BUBBLES} pre").last
    assert pre.evaluate("pre => getComputedStyle(pre).overflowX") == "auto"
    assert "monospace" in pre.evaluate("pre => getComputedStyle(pre.firstChild).fontFamily")


def test_prompts_stay_plain_text(page, double):
    prompt = "**not bold** and `not code`\n- not a list"
    chat(page, double, prompt, "ok")
    user = page.locator(f".{P}user .{P}bubble").last
    expect(user).to_have_text(prompt)
    assert user.evaluate("b => b.children.length") == 0


def test_streaming_reply_re_renders_in_place_and_an_open_fence_is_code(page, double):
    lines = "\n".join(f"line {i} of a long paragraph that makes the reply taller than its box" for i in range(60))
    wide = "x = " + "1 + " * 200 + "1"
    first = f"Intro paragraph.\n\n{lines}\n\n```python\n{wide}\nprint(x"
    double.answer(first + ")\n```\n\nDone.", steps=[first], hold=True)
    send(page, "Stream please.")
    bubble = page.locator(BUBBLES).last
    # The fence is not closed yet: its text is still shown as a code block.
    expect(bubble.locator("pre code")).to_have_text(f"{wide}\nprint(x")
    expect(bubble.locator("[data-lang]")).to_have_attribute("data-lang", "python")
    expect(el(page, "root")).to_have_attribute("data-state", "streaming")

    transcript = el(page, "transcript")
    page.evaluate(
        """([bubbles, transcriptId]) => {
        const all = document.querySelectorAll(bubbles), bubble = all[all.length - 1];
        window.__kept = { paragraph: bubble.querySelector("p"), pre: bubble.querySelector("pre") };
        bubble.querySelector("pre").scrollLeft = 300;
        document.getElementById(transcriptId).scrollTop = 0;  // the user scrolls up to read
    }""",
        [BUBBLES, f"{P}transcript"],
    )
    double.hold = False
    wait_idle(page)
    expect(bubble.locator("p").last).to_have_text("Done.")
    expect(bubble.locator("pre code")).to_have_text(f"{wide}\nprint(x)")
    # The same nodes, updated: no flicker, the code block keeps its sideways scroll, the reader their place.
    assert page.evaluate(
        """bubbles => { const all = document.querySelectorAll(bubbles), bubble = all[all.length - 1];
                        return [bubble.querySelector("p") === window.__kept.paragraph,
                                bubble.querySelector("pre") === window.__kept.pre,
                                window.__kept.pre.scrollLeft]; }""",
        BUBBLES,
    ) == [True, True, 300]
    assert transcript.evaluate("t => t.scrollTop") == 0


def test_auto_scroll_follows_only_while_at_the_bottom(page, double):
    tall = "\n\n".join(f"Paragraph {i}." for i in range(80))
    double.answer(tall + "\n\nEnd.", steps=["Start.", tall], hold=True)
    send(page, "A tall reply.")
    transcript = el(page, "transcript")
    at_bottom = "t => t.scrollHeight - t.scrollTop - t.clientHeight < 2"
    expect(page.locator(BUBBLES).last.locator("p").last).to_have_text("Paragraph 79.")
    assert transcript.evaluate(at_bottom), "follows the reply while the reader is at the bottom"
    transcript.evaluate("t => { t.scrollTop = 100; }")
    double.hold = False
    wait_idle(page)
    expect(page.locator(BUBBLES).last.locator("p").last).to_have_text("End.")
    assert transcript.evaluate("t => t.scrollTop") == 100


def test_copy_puts_the_exact_markdown_source_on_the_clipboard(page, double):
    chat(page, double, "Everything again.", EVERY_ELEMENT)
    page.locator(f".{P}assistant .{P}action[data-action=copy]").last.click()
    expect(el(page, "status")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == EVERY_ELEMENT
    page.locator(f"{BUBBLES} .{P}copyCode").click()
    assert page.evaluate("navigator.clipboard.readText()") == ('def greet(name):\n    return f"Hello, {name} <b>!</b>"')
    expect(page.locator(f"{BUBBLES} .{P}copyCode")).to_have_attribute("data-copied", "yes")


def test_copy_works_without_the_clipboard_api(page, double, server):
    """A page served over plain http from another machine (the Explorer on a LAN address) has no
    navigator.clipboard; a loopback page does, so the test takes it away: the page falls back to the copy command."""
    chat(page, double, "Q", "Some *Markdown* source.")
    page.evaluate("Object.defineProperty(navigator, 'clipboard', { value: undefined })")
    copy = page.locator(f".{P}action[data-action=copy]").last
    copy.click()
    expect(el(page, "status")).to_have_text("Copied.")
    expect(copy).to_be_focused()
    reader = page.context.new_page()
    reader.goto(f"{server}/assets/explorer.css")
    assert reader.evaluate("navigator.clipboard.readText()") == "Some *Markdown* source."
    reader.close()


HOSTILE = """[click me](javascript:alert(1)) [data](data:text/html,<script>alert(1)</script>) [rel](/v1/x)
![pic](https://example.com/x.png) ![local](x)

<img src=x onerror=alert(1)> outside code, `<img src=x onerror=alert(1)>` inline.

<script>alert(1)</script>

<iframe src="https://example.com"></iframe>

&lt;b&gt;not bold&lt;/b&gt; &amp; &#x3C;i&#x3E; &nbsp;

```html
<img src=x onerror=alert(1)><script>alert(1)</script>
```

<a href="javascript:alert(1)" onclick="alert(1)">a</a> <svg onload=alert(1)>
"""


def test_hostile_markdown_stays_inert(page, double):
    long_tail = "\n".join(f"{i}: <img src=x onerror=alert({i})> **{i}**" for i in range(5000))
    deep = ">" * 10_000 + " deep\n\n" + "\n".join(" " * (2 * level) + "- level" for level in range(2000))
    reply = HOSTILE + deep + "\n\n" + long_tail + "\n\n```js\nunterminated(<script>alert(1)</script>"
    chat(page, double, "Be hostile.", reply)
    bubble = page.locator(BUBBLES).last
    found = bubble.evaluate(
        """b => ({
        tags: [...new Set(Array.from(b.querySelectorAll("*"), n => n.tagName))],
        attributes: [...new Set(Array.from(b.querySelectorAll("*"), n => n.getAttributeNames()).flat())],
        hrefs: Array.from(b.querySelectorAll("a"), a => a.getAttribute("href")),
        text: b.textContent,
        lastCode: Array.from(b.querySelectorAll("pre code")).pop().textContent,
        pageHas: ["img", "script:not([id^=script_])", "iframe", "svg", "object", "embed"].filter(
            css => b.closest("body").querySelector(".moduleui " + css)),
    })"""
    )
    assert set(found["tags"]) <= ALLOWED_TAGS, set(found["tags"]) - ALLOWED_TAGS
    assert set(found["attributes"]) <= ALLOWED_ATTRIBUTES, set(found["attributes"]) - ALLOWED_ATTRIBUTES
    assert found["pageHas"] == []
    # Only http(s) links (the iframe's address, as a bare URL in text); the image is a link to it, never loaded.
    assert found["hrefs"] == ["https://example.com/x.png", "https://example.com"]
    for text in ("<img src=x onerror=alert(1)> outside code", "<script>alert(1)</script>", "<iframe src=",
                 "&lt;b&gt;not bold&lt;/b&gt; &amp; &#x3C;i&#x3E; &nbsp;", '<a href="javascript:alert(1)"',
                 "4999: <img src=x onerror=alert(4999)> 4999"):  # fmt: skip
        assert text in found["text"]
    assert found["lastCode"] == "unterminated(<script>alert(1)</script>"
    expect(bubble.locator("pre code").first).to_have_text("<img src=x onerror=alert(1)><script>alert(1)</script>")
    assert bubble.locator("strong").count() == 5000
    # Nesting stops at a fixed depth (the rest is text), so no reply can exhaust the page's stack.
    assert bubble.evaluate("b => b.querySelectorAll('blockquote').length") <= 17
    assert bubble.evaluate("b => b.querySelectorAll('ul').length") <= 17
    assert ">>> deep" in found["text"]
    # (The `page` fixture fails the test on any dialog, page error or request to anything but the server.)


def test_reload_keeps_the_conversation_and_clear_forgets_it(page, double, server):
    chat(page, double, "First question", "First **answer**.")
    chat(page, double, "Second question", "- a\n- b")
    load(page, server)
    expect(page.locator(f".{P}user .{P}bubble")).to_have_text(["First question", "Second question"])
    expect(page.locator(f"{BUBBLES} strong")).to_have_text("answer")
    expect(page.locator(f"{BUBBLES} li")).to_have_text(["a", "b"])
    expect(page.locator(f".{P}meta").last).to_contain_text("7 tokens")
    expect(el(page, "empty")).to_be_hidden()

    # The restored turns are the history the model sees next (the double's routes outlive the reload).
    chat(page, double, "Third question", "ok")
    assert double.messages() == [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First **answer**."},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "- a\n- b"},
    ]
    el(page, "clearBtn").click()
    assert page.evaluate("key => localStorage.getItem(key)", storage_key(server)) is None
    load(page, server)
    expect(page.locator(f".{P}turn")).to_have_count(0)
    expect(el(page, "empty")).to_be_visible()


@pytest.mark.parametrize(
    "stored, note",
    [
        ("{not json", "could not be read"),
        (json.dumps({"version": 1, "turns": [{"prompt": 1}]}), "could not be read"),
        (json.dumps({"version": 1, "turns": [{"prompt": "x" * 1_100_000, "reply": "", "meta": ""}]}), "too large"),
    ],
    ids=["corrupt", "wrong-shape", "too-large"],
)
def test_a_bad_stored_conversation_is_dropped_with_a_note(page, double, server, stored, note):
    page.evaluate("([key, value]) => localStorage.setItem(key, value)", [storage_key(server), stored])
    load(page, server)
    expect(el(page, "status")).to_contain_text(note)
    expect(el(page, "status")).to_contain_text("dropped")
    assert page.evaluate("key => localStorage.getItem(key)", storage_key(server)) is None
    expect(el(page, "empty")).to_be_visible()
    chat(page, double, "Still works?", "Yes.")
    expect(page.locator(BUBBLES)).to_have_text(["Yes."])


def test_a_conversation_too_large_to_keep_is_not_kept_with_a_note(page, double, server):
    chat(page, double, "Small", "ok")
    assert page.evaluate("key => localStorage.getItem(key)", storage_key(server)) is not None
    chat(page, double, "Huge", "word " * 200_001)  # over the 1,000,000 characters kept
    expect(el(page, "status")).to_have_text(
        "This conversation is too large to keep across reloads; Clear starts a new one."
    )
    assert page.evaluate("key => localStorage.getItem(key)", storage_key(server)) is None
    expect(page.locator(BUBBLES)).to_have_count(2)  # the chat itself goes on


def test_regenerate_resends_the_same_history_with_a_new_seed(page, double):
    chat(page, double, "Q1", "A1")
    chat(page, double, "Q2", "A2")
    regenerate = page.locator(f".{P}action[data-action=regenerate]")
    expect(regenerate).to_have_count(2)
    expect(regenerate.first).to_be_hidden()  # only the last turn can be regenerated
    double.answer("A2, again")
    regenerate.last.click()
    wait_idle(page)
    expect(page.locator(BUBBLES)).to_have_text(["A1", "A2, again"])
    original, again = double.chats[1], double.chats[2]
    assert again["prompt"] == original["prompt"] == "Q2"
    assert (
        double.messages(2)
        == double.messages(1)
        == [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
        ]
    )
    assert "seed" not in original
    assert 0 <= int(again["seed"]) <= 2147483647
    double.answer("A2, once more")
    page.locator(f".{P}action[data-action=regenerate]").last.click()
    wait_idle(page)
    assert double.chats[3]["seed"] != again["seed"]  # a new sample each time
    # The next turn's history has the regenerated reply only.
    chat(page, double, "Q3", "A3")
    assert [m["content"] for m in double.messages()] == ["Q1", "A1", "Q2", "A2, once more"]


def test_edit_puts_the_prompt_back_and_drops_the_turn(page, double, server):
    chat(page, double, "Q1", "A1")
    chat(page, double, "Q2 with a typo", "A2")
    page.locator(f".{P}action[data-action=edit]").last.click()
    expect(el(page, "prompt")).to_have_value("Q2 with a typo")
    expect(el(page, "prompt")).to_be_focused()
    expect(page.locator(BUBBLES)).to_have_text(["A1"])
    kept = json.loads(page.evaluate("key => localStorage.getItem(key)", storage_key(server)))
    assert [turn["prompt"] for turn in kept["turns"]] == ["Q1"]
    el(page, "prompt").fill("Q2 fixed")
    el(page, "prompt").press("Enter")
    wait_idle(page)
    assert double.chats[-1]["prompt"] == "Q2 fixed"
    assert double.messages() == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]


def test_queued_chat_shows_its_place_and_wait(page, double):
    double.queued = [{"queue_position": 2, "estimated_wait_s": 12.4}, {"queue_position": 1, "estimated_wait_s": None}]
    double.answer("Hello.", steps=["Hel"])
    page.evaluate(
        """id => { const line = document.getElementById(id), seen = window.__statuses = [];
                   new MutationObserver(() => seen.push(line.textContent))
                       .observe(line, { childList: true, characterData: true, subtree: true }); }""",
        f"{P}status",
    )
    send(page, "Hi")
    wait_idle(page)
    expect(page.locator(BUBBLES)).to_have_text(["Hello."])
    seen = [text for text in page.evaluate("window.__statuses") if text]
    assert seen == [
        "In the queue, waiting: 2 chats ahead, about 12 s. Stop leaves the queue.",
        "In the queue, waiting: 1 chat ahead. Stop leaves the queue.",
    ]
    expect(el(page, "status")).to_have_text("")
    assert double.cancels == []


def test_stop_while_queued_leaves_the_queue_and_gives_the_prompt_back(page, double):
    double.queued = [{"queue_position": 3, "estimated_wait_s": None}] * 10_000
    double.answer("never shown")
    send(page, "Waiting in line")
    expect(el(page, "status")).to_have_text("In the queue, waiting: 3 chats ahead. Stop leaves the queue.")
    expect(el(page, "root")).to_have_attribute("data-state", "queued")
    el(page, "stopBtn").click()
    wait_idle(page)
    assert double.cancels == ["double-1"]
    expect(el(page, "status")).to_have_text("Stopped before the model started.")
    expect(el(page, "prompt")).to_have_value("Waiting in line")
    expect(page.locator(f".{P}turn")).to_have_count(0)


def test_a_full_queue_is_an_error_and_not_retried(page, double):
    page.route(
        "**/v1/text/chat",
        lambda route: route.fulfill(json={"success": False, "error": "The chat queue is full (4 waiting); try later."}),
    )
    send(page, "Anyone there?")
    wait_idle(page)
    expect(el(page, "status")).to_have_text("The chat queue is full (4 waiting); try later.")
    expect(el(page, "status")).to_have_class(f"{P}status {P}error")
    expect(el(page, "prompt")).to_have_value("Anyone there?")
    expect(page.locator(f".{P}turn")).to_have_count(0)
    assert double.chats == []  # refused before the double, and never sent again


def test_buttons_are_labelled_and_work_from_the_keyboard(page, double):
    transcript = el(page, "transcript")
    assert transcript.get_attribute("role") == "log"
    assert transcript.get_attribute("aria-live") == "polite"
    chat(page, double, "Q", "```sh\necho hi\n```")
    names = page.evaluate(
        """id => Array.from(document.getElementById(id).querySelectorAll("button"),
                            b => (b.getAttribute("aria-label") || b.textContent).trim())""",
        f"{P}root",
    )
    assert all(names)
    assert "Copy code (sh)" in names
    # Tab from the conversation's last focusable things to the reply's Copy, and press it.
    page.locator(f"{BUBBLES} .{P}copyCode").focus()
    page.keyboard.press("Enter")
    assert page.evaluate("navigator.clipboard.readText()") == "echo hi"
    page.keyboard.press("Tab")  # to the code block, which scrolls sideways from the keyboard
    assert page.evaluate("document.activeElement.tagName") == "PRE"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.action") == "copy"


@pytest.mark.parametrize("theme", ["explorer-dark-mode", "system-dark-mode"])
def test_dark_themes_darken_replies_code_and_tables(page, double, server, theme):
    chat(page, double, "Q", "Text and `code`.\n\n```py\nx = 1\n```\n\n| a |\n|---|\n| b |")
    if theme == "explorer-dark-mode":
        page.evaluate("document.body.classList.add('dark-mode')")  # what the Explorer's dark theme does
    else:
        # The page opened on its own follows the system's dark mode. It reads its reply from the kept
        # conversation of this server (the Server box names it).
        kept = page.evaluate("key => localStorage.getItem(key)", storage_key(server))
        page.emulate_media(color_scheme="dark")

        page.goto((ROOT / "explore.html").as_uri())
        page.evaluate("([key, value]) => localStorage.setItem(key, value)", [f"_MID_conversation {server}", kept])
        page.locator("#serviceUrl").fill(server)
        page.locator("#serviceUrl").dispatch_event("change")
    prefix = P if theme == "explorer-dark-mode" else "_MID_"
    colours = page.evaluate(
        """prefix => { const bubble = document.querySelector("." + prefix + "assistant ." + prefix + "bubble");
                       const style = node => getComputedStyle(node);
                       return [style(bubble).backgroundColor, style(bubble).color,
                               style(bubble.querySelector("pre")).backgroundColor,
                               style(bubble.querySelector("pre code")).color,
                               style(bubble.querySelector("th")).backgroundColor,
                               style(document.getElementById(prefix + "transcript")).backgroundColor]; }""",
        prefix,
    )
    background, text, code_bg, code_text, header_bg, transcript_bg = map(luminance, colours)
    assert max(background, code_bg, header_bg, transcript_bg) < 0.2, colours
    assert min(text, code_text) > 0.7, colours
