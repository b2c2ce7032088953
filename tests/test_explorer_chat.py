"""The Explorer chat page (explore.html) in Debian's chromium, against a real llamachat_server running the real
module on SmolLM2: hosted by the server's Explorer page (as the real Explorer hosts it, `_MID_` → `LlamaChat_`)
and opened on its own from the file, pointed at the server with its Server box.

Every page is watched: a JavaScript error, an alert dialog or a request leaving the machine fails the test."""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from contextlib import ExitStack

import pytest
from playwright.sync_api import Page, Request, expect

from live_server import ROOT, free_port, poll, running_server, serve_in_thread
from llamachat_server.explorer import extract_explorer_ui
from llamachat_server.server_state import ServerConfig
from page_requests import form_fields

EXPLORE_HTML = ROOT / "explore.html"
REPLY_TIMEOUT_MS = 90_000
CONTEXT_SIZE = 2048  # the module's context (tokens) in the shared test server
# A story runs to hundreds of tokens on any machine, whichever words it takes: a chat still running when a test
# stops it (the tests wait for a few polls or 40 characters of it, never for particular words).
LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."


def shows(markdown: str, shown: str, whole: bool = True) -> bool:
    """Whether a bubble's text can be what the page shows for this Markdown (or, not whole, for a start of it):
    rendering only drops markup and whitespace, so the shown characters are, in order, the source's, and nearly
    all of them."""
    source, shown = re.sub(r"\s", "", markdown), re.sub(r"\s", "", shown)
    rest = iter(source)
    return all(char in rest for char in shown) and (not whole or len(shown) >= 0.8 * len(source))


class ChatPage:
    """The chat UI in a browser tab. Its ids start with `prefix`: `LlamaChat_` where the Explorer hosts it,
    `_MID_` in the file opened on its own."""

    def __init__(self, page: Page, prefix: str):
        self.page, self.prefix = page, prefix
        self.api_requests: list[Request] = []
        page.on("request", lambda request: "/v1/" in request.url and self.api_requests.append(request))

    def el(self, name: str):
        return self.page.locator(f"#{self.prefix}{name}")

    @property
    def user_bubbles(self):
        return self.page.locator(f".{self.prefix}user .{self.prefix}bubble")

    @property
    def assistant_bubbles(self):
        return self.page.locator(f".{self.prefix}assistant .{self.prefix}bubble")

    def settings(self, **values: str) -> None:
        """Fills the Settings fields (max_tokens=..., temperature=..., system_prompt=...), opening the panel."""
        if not self.page.locator(f"#{self.prefix}root details").evaluate("d => d.open"):
            self.page.locator(f"#{self.prefix}root summary").click()
        names = {"max_tokens": "maxTokens", "temperature": "temperature", "system_prompt": "systemPrompt"}
        for key, value in values.items():
            self.el(names[key]).fill(value)

    def send(self, prompt: str) -> None:
        self.el("prompt").fill(prompt)
        self.el("sendBtn").click()

    def wait_state(self, state: str, timeout: float = REPLY_TIMEOUT_MS) -> None:
        expect(self.el("root")).to_have_attribute("data-state", state, timeout=timeout)

    def wait_reply_text(self, min_chars: int) -> None:
        """Waits until the newest reply has grown to at least min_chars characters."""
        self.page.wait_for_function(
            """([selector, n]) => { const all = document.querySelectorAll(selector);
                                    return all.length > 0 && all[all.length - 1].textContent.length >= n; }""",
            arg=[f".{self.prefix}assistant .{self.prefix}bubble", min_chars],
            timeout=REPLY_TIMEOUT_MS,
        )

    def calls(self, api: str) -> list[tuple[dict, dict | None]]:
        """(form fields, JSON answer or None when no answer came) of each call to /v1/.../<api>, in order."""
        result = []
        for request in self.api_requests:
            if request.url.endswith("/" + api):
                response = request.response()
                result.append((form_fields(request), response.json() if response else None))
        return result

    def record_changes(self) -> None:
        """From now on, keeps every distinct text the newest reply and the live figures show (window.__seen)."""
        self.page.evaluate(
            """prefix => {
            const seen = window.__seen = { replies: [], stats: [] };
            const keep = (list, text) => { if (text && list[list.length - 1] !== text) list.push(text); };
            const root = document.getElementById(prefix + "root");
            new MutationObserver(() => {
                const bubbles = root.querySelectorAll("." + prefix + "assistant ." + prefix + "bubble");
                if (bubbles.length) keep(seen.replies, bubbles[bubbles.length - 1].textContent);
                keep(seen.stats, document.getElementById(prefix + "stats").textContent);
            }).observe(root, { subtree: true, childList: true, characterData: true });
        }""",
            self.prefix,
        )

    def seen(self) -> dict:
        return self.page.evaluate("window.__seen")

    def kept_turns(self) -> list[dict]:
        """The conversation the page keeps for its server in localStorage: {prompt, reply, meta, failed}."""
        return self.page.evaluate(
            """prefix => { const key = Object.keys(localStorage).find(k => k.startsWith(prefix + "conversation "));
                          return key ? JSON.parse(localStorage.getItem(key)).turns : []; }""",
            self.prefix,
        )


@pytest.fixture(scope="module")
def server(smollm2):
    # The page opened from a file has the origin null, which the server refuses unless told otherwise. One chat may
    # wait while another runs, so a test can fill the queue.
    with running_server(
        smollm2, context_size=CONTEXT_SIZE, server_args=("--allow-origin", "null"), CPAI_MODULE_LLAMA_QUEUE_SIZE="1"
    ) as base_url:
        yield base_url


@pytest.fixture
def open_chat(browser):
    """open_chat(base_url, hosted=True, viewport=None) -> ChatPage; watches each page for errors."""
    contexts, problems = [], {"page errors": [], "dialogs": [], "requests leaving the machine": []}

    def guard(route):
        url = urllib.parse.urlsplit(route.request.url)
        if url.scheme in ("file", "data") or url.hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            problems["requests leaving the machine"].append(route.request.url)
            route.abort()

    def open_page(base_url: str, hosted: bool = True, viewport: dict | None = None) -> ChatPage:
        context = browser.new_context(viewport=viewport or {"width": 1000, "height": 860})
        contexts.append(context)
        context.route("**/*", guard)
        page = context.new_page()
        page.on("pageerror", lambda error: problems["page errors"].append(str(error)))
        page.on("dialog", lambda dialog: (problems["dialogs"].append(dialog.message), dialog.dismiss()))
        if hosted:
            chat = ChatPage(page, "LlamaChat_")
            page.goto(f"{base_url}/")
        else:
            chat = ChatPage(page, "_MID_")
            page.goto(EXPLORE_HTML.as_uri())
            page.locator("#serviceUrl").fill(base_url)
        expect(chat.el("root")).to_be_visible(timeout=30_000)
        return chat

    yield open_page
    for context in contexts:
        context.close()
    assert problems == {"page errors": [], "dialogs": [], "requests leaving the machine": []}


def post_form(url: str, **fields: str) -> dict:
    data = urllib.parse.urlencode(fields).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:
        return json.load(response)


def route_inputs() -> dict:
    settings = json.loads((ROOT / "modulesettings.json").read_text())
    route = settings["Modules"]["LlamaChat"]["RouteMaps"][0]
    return {item["Name"]: item.get("DefaultValue") for item in route["Inputs"]}


# ---- The page on its own, no model needed ----------------------------------------------------------------


def test_page_defaults_are_the_route_defaults_of_modulesettings(open_chat):
    chat = open_chat(f"http://127.0.0.1:{free_port()}", hosted=False)
    defaults = route_inputs()
    assert chat.el("systemPrompt").input_value() == defaults["system_prompt"] == ""
    assert int(chat.el("maxTokens").input_value()) == int(defaults["max_tokens"])
    assert float(chat.el("temperature").input_value()) == float(defaults["temperature"])
    assert chat.page.locator("#serviceUrl").evaluate("box => box.defaultValue") == "http://localhost:32168"


def test_unreachable_server_gives_the_prompt_back_with_an_error(open_chat):
    chat = open_chat(f"http://127.0.0.1:{free_port()}", hosted=False)
    chat.send("Hello?")
    expect(chat.el("status")).to_contain_text("No answer from the server", timeout=30_000)
    chat.wait_state("idle", timeout=1000)
    expect(chat.el("prompt")).to_have_value("Hello?")
    expect(chat.user_bubbles).to_have_count(0)
    expect(chat.page.locator("#pageError")).to_contain_text("Cannot reach")
    assert len(chat.calls("chat")) == 1  # no retry loop on a dead server


def test_file_page_is_refused_by_default_and_says_how_to_allow_it(open_chat, tmp_path):
    config = ServerConfig(module_dir=ROOT, port=0, launch_module=False, data_dir=tmp_path, log_level="critical")
    with serve_in_thread(config) as base_url:
        chat = open_chat(base_url, hosted=False)
        chat.send("Hello?")
        expect(chat.el("status")).to_contain_text("No answer from the server", timeout=30_000)
        expect(chat.page.locator("#pageError")).to_contain_text("--allow-origin null")
        expect(chat.page.locator("#pageError")).to_contain_text(f"open {base_url}/ instead")
        expect(chat.el("prompt")).to_have_value("Hello?")
        assert len(chat.calls("chat")) == 1


def test_explorer_injection_survives_other_modules_names_and_a_restart(open_chat):
    """Inject the UI as the real Explorer does (docs/protocol.md §5.1) beside a module declaring the top-level names
    upstream's page collided on (§4.3), next to a second copy under another prefix, then again after a restart."""
    chat = open_chat(f"http://127.0.0.1:{free_port()}", hosted=False)
    page = chat.page
    page.set_content("<html><body><div id='panel'></div></body></html>")
    page.add_script_tag(content="let renderMarkdown = false; let chat = null; let commandId = null;")
    ui = extract_explorer_ui(EXPLORE_HTML.read_text(encoding="utf-8"))
    inject = """([key, ui]) => {
        const sub = text => text.replace(/_MID_/g, key + "_");
        document.getElementById("panel").insertAdjacentHTML("beforeend",
            `<div class="card moduleui" data-moduleid="${key}"><div class="card-body">${sub(ui.html)}</div></div>`);
        for (const [tag, text] of [["script", ui.script], ["style", ui.css]]) {
            const node = document.createElement(tag);
            node.id = tag + "_" + key;
            node.textContent = sub(text);
            document.body.appendChild(node);
        }
    }"""
    globals_before = set(page.evaluate("Object.keys(window)"))
    page.evaluate(inject, ["LlamaChat", ui])
    page.evaluate(inject, ["OtherChat", ui])
    # The module restarts: the Explorer removes its card, script and style, then injects them again.
    page.evaluate("""() => { for (const id of ["script_LlamaChat", "style_LlamaChat"])
                                 document.getElementById(id).remove();
                             document.querySelector("[data-moduleid=LlamaChat]").remove(); }""")
    page.evaluate(inject, ["LlamaChat", ui])
    assert set(page.evaluate("Object.keys(window)")) == globals_before

    # The re-injected UI is live, and acts on its own card only.
    page.click("#LlamaChat_sendBtn")
    expect(page.locator("#LlamaChat_status")).to_have_text("Type a message first.")
    expect(page.locator("#OtherChat_status")).to_have_text("")


# ---- Chatting with the real module ---------------------------------------------------------------------


# Opened on its own, the file calls the server cross-origin (origin "null"), which the server allows when started
# with --allow-origin null (the `server` fixture) and refuses by default (test_file_page_is_refused_by_default...).
@pytest.mark.parametrize("hosted", [True, False], ids=["in-explorer", "standalone"])
def test_reply_grows_over_polls_with_live_figures(open_chat, server, smollm2, hosted):
    chat = open_chat(server, hosted=hosted)
    chat.settings(max_tokens="2000", temperature="0")  # a reply still growing however fast the machine
    chat.record_changes()
    chat.send(LONG_PROMPT)
    chat.page.wait_for_function("() => window.__seen.replies.length >= 2", timeout=REPLY_TIMEOUT_MS)
    chat.el("stopBtn").click()
    chat.wait_state("idle", timeout=30_000)
    expect(chat.el("status")).not_to_have_class(f"{chat.prefix}status {chat.prefix}error")

    ((ack_fields, ack),) = chat.calls("chat")
    assert ack_fields["prompt"] == LONG_PROMPT
    assert ack_fields["max_tokens"] == "2000"
    assert "messages" not in ack_fields  # nothing said before
    polls = chat.calls("get_command_status")
    assert all(fields["commandId"] == ack["commandId"] for fields, _ in polls)
    final = polls[-1][1]
    assert final["commandStatus"] == "completed"
    assert final["stop_reason"] in ("cancelled", "length")
    partials = [answer["reply"] for _, answer in polls if answer["commandStatus"] == "running" and answer["reply"]]
    assert len(set(partials)) >= 2, "the reply should have been seen growing over at least two polls"
    assert all(final["reply"].startswith(partial) for partial in partials)

    seen = chat.seen()
    # Each text shown while it grew is the start of the final reply, rendered (what is left of it, in order).
    final_shown = chat.assistant_bubbles.last.text_content()
    partials = [text for text in seen["replies"] if text != final_shown]
    assert len(partials) >= 2
    assert all(shows(final["reply"], text, whole=False) for text in partials)
    assert any("tok/s" in text and "tokens" in text for text in seen["stats"]), seen["stats"]
    assert shows(final["reply"], final_shown)
    assert chat.kept_turns()[-1]["reply"] == final["reply"]
    expect(chat.el("model")).to_have_text(smollm2.name)
    expect(chat.page.locator(f".{chat.prefix}meta").last).to_contain_text(f"{final['completion_tokens']} tokens")
    expect(chat.el("sendBtn")).to_be_visible()
    expect(chat.el("stopBtn")).to_be_hidden()
    expect(chat.el("prompt")).to_have_value("")


@pytest.mark.parametrize("how", ["button", "escape"])
def test_stop_mid_reply_keeps_the_partial_reply(open_chat, server, how):
    chat = open_chat(server)
    chat.settings(max_tokens="1000", temperature="0")
    chat.send(LONG_PROMPT)
    chat.wait_reply_text(40)
    if how == "button":
        chat.el("stopBtn").click()
    else:
        chat.page.keyboard.press("Escape")
    chat.wait_state("idle", timeout=30_000)

    ((_, ack),) = chat.calls("chat")
    ((cancel_fields, cancelled),) = chat.calls("cancel_command")
    assert cancel_fields["commandId"] == ack["commandId"]
    assert cancelled["success"]
    final = chat.calls("get_command_status")[-1][1]
    assert final["stop_reason"] == "cancelled"
    assert 0 < final["completion_tokens"] < 1000
    assert len(final["reply"]) >= 40
    assert shows(final["reply"], chat.assistant_bubbles.last.text_content())
    assert chat.kept_turns()[-1]["reply"] == final["reply"]
    expect(chat.el("status")).to_have_text("Stopped: the partial reply is kept.")
    expect(chat.page.locator(f".{chat.prefix}meta").last).to_contain_text(f"{final['completion_tokens']} tokens")
    expect(chat.page.locator(f".{chat.prefix}meta").last).to_contain_text("stopped")


def test_markup_in_a_prompt_is_shown_as_text(open_chat, server):
    prompt = "<img src=x onerror=alert(1)>"
    chat = open_chat(server)
    chat.settings(max_tokens="24")
    chat.send(prompt)
    chat.wait_state("idle")
    expect(chat.user_bubbles.last).to_have_text(prompt)
    expect(chat.el("transcript").locator("img, script, iframe")).to_have_count(0)
    assert not [request for request in chat.api_requests if request.url.endswith("/x")]
    # (open_chat fails the test if a dialog opened)


def test_enter_sends_and_shift_enter_starts_a_new_line(open_chat, server):
    chat = open_chat(server)
    chat.settings(max_tokens="16")
    box = chat.el("prompt")
    box.fill("Say hello")
    box.press("Shift+Enter")
    box.press_sequentially("in French.")
    expect(box).to_have_value("Say hello\nin French.")
    expect(chat.user_bubbles).to_have_count(0)  # a turn is added the moment a chat is sent
    box.press("Enter")
    expect(chat.user_bubbles).to_have_text(["Say hello\nin French."])
    expect(box).to_have_value("")
    chat.wait_state("idle")
    # Browsers send newlines in multipart form fields as CRLF (HTML form encoding), as any Explorer page would.
    assert chat.calls("chat")[0][0]["prompt"].replace("\r\n", "\n") == "Say hello\nin French."
    assert chat.assistant_bubbles.last.text_content()


def test_bad_input_is_refused_with_the_server_s_error(open_chat, server):
    chat = open_chat(server)
    chat.settings(temperature="7")
    chat.send("Hello")
    chat.wait_state("idle")
    ((_, refusal),) = chat.calls("chat")
    assert refusal["success"] is False
    assert "temperature" in refusal["error"]
    expect(chat.el("status")).to_have_text(refusal["error"])
    expect(chat.el("prompt")).to_have_value("Hello")
    expect(chat.user_bubbles).to_have_count(0)
    assert chat.calls("get_command_status") == []


def test_multi_turn_chat_sends_the_transcript_as_messages_and_clear_forgets_it(open_chat, server):
    chat = open_chat(server)
    chat.settings(max_tokens="48", temperature="0")
    first, second = "My name is Alice and I love green tea.", "What is my name?"
    chat.send(first)
    chat.wait_state("idle")
    chat.send(second)
    chat.wait_state("idle")
    replies = [turn["reply"] for turn in chat.kept_turns()]
    assert len(replies) == 2
    assert all(shows(*pair) for pair in zip(replies, chat.assistant_bubbles.all_text_contents()))

    (fields1, _), (fields2, _) = chat.calls("chat")
    assert "messages" not in fields1
    assert json.loads(fields2["messages"]) == [
        {"role": "user", "content": first},
        {"role": "assistant", "content": replies[0]},
    ]
    finals = [answer for _, answer in chat.calls("get_command_status") if answer["commandStatus"] == "completed"]
    # The model read turn 1 again: its prompt holds both turns' text.
    assert finals[1]["prompt_tokens"] > finals[0]["prompt_tokens"] + finals[0]["completion_tokens"]

    # A reload keeps the conversation, and the model is still sent all of it.
    shown = chat.assistant_bubbles.all_text_contents()
    chat.api_requests.clear()  # answers from before a reload cannot be read after it
    chat.page.reload()
    expect(chat.user_bubbles).to_have_text([first, second])
    expect(chat.assistant_bubbles).to_have_text(shown)
    chat.settings(max_tokens="48", temperature="0")
    chat.send("And my favourite drink?")
    chat.wait_state("idle")
    assert [message["content"] for message in json.loads(chat.calls("chat")[-1][0]["messages"])] == [
        first,
        replies[0],
        second,
        replies[1],
    ]

    chat.el("clearBtn").click()
    expect(chat.user_bubbles).to_have_count(0)
    expect(chat.el("empty")).to_be_visible()
    chat.send("Hello")
    chat.wait_state("idle")
    assert "messages" not in chat.calls("chat")[-1][0]


def test_regenerate_and_edit_send_the_right_messages(open_chat, server):
    chat = open_chat(server)
    chat.settings(max_tokens="12", temperature="0.8")
    for prompt in ("Name a colour.", "Name a fruit."):
        chat.send(prompt)
        chat.wait_state("idle")
    first_reply = chat.kept_turns()[0]["reply"]
    history = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": first_reply}]

    regenerate = chat.page.locator(f".{chat.prefix}action[data-action=regenerate]")
    expect(regenerate).to_have_count(2)
    expect(regenerate.first).to_be_hidden()  # only the last turn
    regenerate.last.click()
    chat.wait_state("idle")
    (_, _), (original, _), (again, _) = chat.calls("chat")
    assert again["prompt"] == original["prompt"] == "Name a fruit."
    assert json.loads(again["messages"]) == json.loads(original["messages"]) == history
    assert "seed" not in original
    assert 0 <= int(again["seed"]) <= 2147483647  # a new sample
    final = chat.calls("get_command_status")[-1][1]
    assert [turn["reply"] for turn in chat.kept_turns()] == [first_reply, final["reply"]]
    expect(chat.user_bubbles).to_have_text(["Name a colour.", "Name a fruit."])

    chat.page.locator(f".{chat.prefix}action[data-action=edit]").last.click()
    expect(chat.el("prompt")).to_have_value("Name a fruit.")
    expect(chat.user_bubbles).to_have_text(["Name a colour."])
    assert len(chat.kept_turns()) == 1
    chat.el("prompt").fill("Name a vegetable.")
    chat.el("prompt").press("Enter")
    chat.wait_state("idle")
    edited = chat.calls("chat")[-1][0]
    assert edited["prompt"] == "Name a vegetable."
    assert json.loads(edited["messages"]) == history


def test_turns_left_out_to_fit_the_context_are_reported(open_chat, server):
    chat = open_chat(server)
    prompt = LONG_PROMPT  # turn 2 runs until stopped, however fast the machine
    chat.settings(max_tokens="32", temperature="0")
    chat.send(prompt)
    chat.wait_state("idle")
    first = chat.calls("get_command_status")[-1][1]
    # The same prompt again, with room for the reply set so that it fits alone but not after turn 1.
    chat.settings(max_tokens=str(CONTEXT_SIZE - first["prompt_tokens"] - 4))
    chat.send(prompt)
    chat.wait_reply_text(1)
    chat.el("stopBtn").click()
    chat.wait_state("idle", timeout=30_000)

    final = chat.calls("get_command_status")[-1][1]
    assert final["dropped_turns"] == 1
    assert final["prompt_tokens"] == first["prompt_tokens"]
    expect(chat.page.locator(f".{chat.prefix}meta").last).to_contain_text(
        "1 earlier turn left out to fit the model's context"
    )
    # The page still holds the whole conversation; the server decides each time what fits.
    assert len(json.loads(chat.calls("chat")[-1][0]["messages"])) == 2


QUEUED_TEXT = re.compile(r"^In the queue, waiting: 1 chat ahead(, about \d+ s)?\. Stop leaves the queue\.$")


def test_a_chat_behind_a_long_one_waits_in_the_queue_and_stop_leaves_it(open_chat, server):
    chat = open_chat(server)
    chat.settings(max_tokens="16")

    def other_client_chats() -> dict:
        # A long story up to the end of the context: still running (or waiting) however fast the machine.
        return post_form(f"{server}/v1/text/chat", prompt=LONG_PROMPT, max_tokens="2000", temperature="0")

    def status_of(command_id: str) -> dict:
        return post_form(f"{server}/v1/LlamaChat/get_command_status", commandId=command_id)

    def cancel(command_id: str) -> None:
        assert post_form(f"{server}/v1/LlamaChat/cancel_command", commandId=command_id)["success"]
        poll(lambda: status_of(command_id)["commandStatus"] == "completed", 30, "a chat to end")

    # Queued behind another client's chat, then Stop: the page leaves the queue and gives the prompt back.
    running = other_client_chats()["commandId"]
    chat.send("Say hello.")
    expect(chat.el("status")).to_have_text(QUEUED_TEXT, timeout=15_000)
    chat.wait_state("queued", timeout=5000)
    expect(chat.user_bubbles).to_have_text(["Say hello."])
    chat.el("stopBtn").click()
    chat.wait_state("idle", timeout=15_000)
    expect(chat.el("status")).to_have_text("Stopped before the model started.")
    expect(chat.el("prompt")).to_have_value("Say hello.")
    expect(chat.user_bubbles).to_have_count(0)
    ((_, ack),) = chat.calls("chat")
    ((cancel_fields, cancelled),) = chat.calls("cancel_command")
    assert cancel_fields["commandId"] == ack["commandId"]
    assert cancelled["success"]
    answers = [answer for _, answer in chat.calls("get_command_status")]
    assert answers[0]["commandStatus"] == "queued"
    assert answers[0]["queue_position"] == 1
    assert answers[-1]["commandStatus"] == "completed"
    assert answers[-1]["stop_reason"] == "cancelled"
    assert status_of(running)["commandStatus"] == "running"  # the other chat is left alone

    # A full queue (one chat may wait here) is shown as the server's error, once: the page does not retry.
    waiting = other_client_chats()
    assert waiting["success"]
    assert status_of(waiting["commandId"])["commandStatus"] == "queued"
    chat.el("prompt").press("Enter")
    chat.wait_state("idle", timeout=15_000)
    refusal = chat.calls("chat")[-1][1]
    assert refusal["success"] is False
    assert "queue is full" in refusal["error"]
    expect(chat.el("status")).to_have_text(refusal["error"])
    expect(chat.el("prompt")).to_have_value("Say hello.")
    assert len(chat.calls("chat")) == 2
    cancel(waiting["commandId"])

    # Queued again; once the chat ahead ends, ours starts by itself and its reply arrives.
    chat.el("prompt").press("Enter")
    expect(chat.el("status")).to_have_text(QUEUED_TEXT, timeout=15_000)
    cancel(running)
    chat.wait_state("idle")
    expect(chat.el("status")).not_to_have_text(QUEUED_TEXT)
    assert chat.calls("get_command_status")[-1][1]["reply"] == chat.kept_turns()[-1]["reply"] != ""
    calls = chat.calls("get_command_status") + chat.calls("cancel_command")
    used_ids = {fields["commandId"] for fields, _ in calls}
    assert not used_ids & {running, waiting["commandId"]}  # the page only ever polls or cancels its own chats


def test_server_stopped_mid_chat_ends_polling_with_an_error(open_chat, smollm2):
    with ExitStack() as server_running:
        base_url = server_running.enter_context(running_server(smollm2))
        chat = open_chat(base_url)
        chat.settings(max_tokens="2000", temperature="0")
        chat.send(LONG_PROMPT)
        chat.wait_reply_text(20)
    # The server is gone (stopped as a person would, with Ctrl+C).

    chat.wait_state("idle", timeout=60_000)
    expect(chat.el("status")).to_have_class(f"{chat.prefix}status {chat.prefix}error")
    assert chat.el("status").text_content()
    assert len(chat.assistant_bubbles.last.text_content()) >= 20  # the partial reply stays
    polls = chat.calls("get_command_status")
    # Polling stopped at the first failed poll.
    failed = [
        i
        for i, (_, answer) in enumerate(polls)
        if answer is None or not answer["success"] or answer["commandStatus"] != "running"
    ]
    assert failed == [len(polls) - 1]
    expect(chat.el("sendBtn")).to_be_visible()


def test_narrow_window_fits_and_a_long_reply_scrolls(open_chat, server):
    chat = open_chat(server, viewport={"width": 360, "height": 640})
    chat.settings(max_tokens="200", temperature="0")
    chat.el("root").locator("summary").click()  # close Settings again
    chat.send(LONG_PROMPT)
    chat.wait_state("idle")
    page = chat.page
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    transcript = chat.el("transcript")
    assert transcript.evaluate("t => t.scrollHeight > t.clientHeight"), "the reply should be longer than the box"
    assert transcript.evaluate("t => t.scrollHeight - t.scrollTop - t.clientHeight < 2"), "follows the reply"
    for button in ("sendBtn", "clearBtn"):
        box = chat.el(button).bounding_box()
        assert box["x"] >= 0
        assert box["x"] + box["width"] <= 360
