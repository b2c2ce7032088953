"""Fitting a conversation to the context: the logic on a FakeTokenizer (fast, against a brute-force answer), then on
the real SmolLM2 model (long histories, exact token counts, cancel while a chat is being prepared)."""

import json
import random
import threading

import pytest

from llama_chat import conversation as template_conversation
from llamachat.chat_request import ChatError, ChatRequest
from llamachat.context_fit import ContextFitter, FitCancelled, reply_room, split_turns
from module_harness import cancel, load_adapter, start_chat, status, wait_until


class FakeTokenizer:
    """Stands in for LlamaChat in unit tests of the fitting logic: a token per word, a template that frames each
    message with 3 tokens, and optionally `skew` tokens more (or fewer) per message of several words, which the probe
    the fitter measures the framing with cannot see (as with a real template that trims, or tokens that merge)."""

    def __init__(self, n_ctx: int, skew: int = 0) -> None:
        self.n_ctx, self.skew = n_ctx, skew
        self.rendered_tokens = 0
        self.counted = 0

    def messages(self, prompt, system_prompt=None, history=None, as_sent=False, prefill=None):
        return template_conversation(prompt, system_prompt or "Be helpful.", history, True, as_sent, prefill)

    def tokenize_messages(self, messages):
        tokens = []
        for m in messages:
            words = m["content"].split()
            if len(words) > 1:
                words = words + ["~"] * self.skew if self.skew >= 0 else words[: self.skew]
            tokens += ["<s>", m["role"], *words, "</s>"]
        tokens += ["<s>", "assistant"]
        self.rendered_tokens += len(tokens)
        return tokens

    def count_tokens(self, text):
        self.counted += 1
        return len(text.split())


def request(history, prompt="What now?", max_tokens=20, system_prompt=None):
    return ChatRequest(prompt=prompt, system_prompt=system_prompt, history=history, max_tokens=max_tokens)


def conversation(rng, exchanges):
    history = []
    for i in range(exchanges):
        history.append({"role": "user", "content": " ".join(["ask"] * rng.randint(1, 12)) + f" {i}"})
        for _ in range(rng.choice((1, 1, 1, 2))):  # sometimes two assistant messages in one turn
            history.append({"role": "assistant", "content": " ".join(["say"] * rng.randint(1, 30))})
    return history


def slow_exact_fit(chat, req):
    """The answer by brute force: the fewest oldest turns dropped so that the prompt fits."""
    turns = split_turns(req.history)
    for k in range(len(turns) + 1):
        kept = [m for turn in turns[k:] for m in turn]
        if (
            len(chat.tokenize_messages(chat.messages(req.prompt, req.system_prompt, kept)))
            + reply_room(req, chat.n_ctx)
            <= chat.n_ctx
        ):
            return k, kept
    return None


@pytest.mark.parametrize("skew", [0, 2, -1])
def test_fake_fit_drops_exactly_the_fewest_oldest_turns(skew):
    rng = random.Random(skew)
    for trial in range(60):
        chat = FakeTokenizer(n_ctx=rng.choice((120, 300, 800)), skew=skew)
        req = request(conversation(rng, rng.randint(0, 40)), max_tokens=rng.choice((0, 10, 50)))
        fitted = ContextFitter(chat).fit(req)
        dropped, kept = slow_exact_fit(chat, req)
        assert (fitted.dropped_turns, fitted.history) == (dropped, kept), f"trial {trial}"
        assert fitted.prompt_tokens == chat.tokenize_messages(chat.messages(req.prompt, None, kept))


def test_fake_fit_work_grows_with_the_context_not_the_history():
    chat = FakeTokenizer(n_ctx=2000, skew=1)
    history = conversation(random.Random(1), 5000)
    fitted = ContextFitter(chat).fit(request(history))
    kept_turns = len(split_turns(fitted.history))
    assert fitted.dropped_turns > 4000
    assert kept_turns > 50
    # Every message kept, and one turn more, counted once; a few renders of at most the context each.
    assert chat.counted <= len(fitted.history) + 3 + 2  # + the framing probe
    assert chat.rendered_tokens < 5 * chat.n_ctx


def test_fake_fit_remembers_counts_when_the_conversation_comes_back_longer():
    chat = FakeTokenizer(n_ctx=100_000)
    fitter = ContextFitter(chat)
    history = conversation(random.Random(2), 50)
    fitter.fit(request(history))
    counted = chat.counted
    grown = history + [{"role": "user", "content": "What now?"}, {"role": "assistant", "content": "This."}]
    assert fitter.fit(request(grown)).dropped_turns == 0
    assert chat.counted - counted == 2  # only the new turn


def test_fake_fit_turns_start_at_each_user_message():
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    assert split_turns(history) == [history[:3], history[3:]]


def test_fake_fit_prompt_alone_too_long_says_how_long():
    chat = FakeTokenizer(n_ctx=50)
    with pytest.raises(ChatError, match=r"it takes 60 tokens .* needs 20 more \(max_tokens\).* context holds 50"):
        ContextFitter(chat).fit(request([], prompt="word " * 50))


def test_fake_fit_too_long_is_context_length_exceeded_naming_messages():
    with pytest.raises(ChatError) as caught:
        ContextFitter(FakeTokenizer(n_ctx=50)).fit(request([], prompt="word " * 50))
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "messages")


def test_fake_fit_without_trimming_keeps_everything_or_refuses():
    history = [{"role": "user", "content": "word " * 10}, {"role": "assistant", "content": "word " * 10}] * 3
    untrimmed = ChatRequest("hi", None, history, max_tokens=20, trim_history=False)
    assert ContextFitter(FakeTokenizer(n_ctx=200)).fit(untrimmed).history == history
    with pytest.raises(ChatError, match="does not fit.*trim_history") as caught:
        ContextFitter(FakeTokenizer(n_ctx=60)).fit(untrimmed)
    assert caught.value.code == "context_length_exceeded"


def test_fake_fit_of_a_conversation_as_sent_keeps_its_leading_system_messages():
    """Trimming a conversation sent whole leaves out its oldest turns, never the system messages before them."""
    system = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."}]
    turns = [{"role": "user", "content": "word " * 10}, {"role": "assistant", "content": "word " * 10}] * 4
    sent = ChatRequest("hi", None, system + turns, max_tokens=20, as_sent=True)
    fitted = ContextFitter(FakeTokenizer(n_ctx=80)).fit(sent)
    assert fitted.history[:2] == system
    assert 0 < fitted.dropped_turns < 4
    assert fitted.history[2:] == turns[2 * fitted.dropped_turns :]


@pytest.mark.parametrize("checks_before_cancel", [0, 1, 5, 30])
def test_fake_fit_stops_when_cancelled(checks_before_cancel):
    chat = FakeTokenizer(n_ctx=3000)
    checks = []

    def cancelled():
        checks.append(1)
        return len(checks) > checks_before_cancel

    with pytest.raises(FitCancelled):
        ContextFitter(chat).fit(request(conversation(random.Random(3), 2000)), cancelled)
    assert len(checks) == checks_before_cancel + 1  # it stopped at the first check that said so


def test_fake_fit_template_rejection_is_a_chat_error():
    class Strict(FakeTokenizer):
        def tokenize_messages(self, messages):
            raise ValueError("Conversation roles must alternate user/assistant")

    with pytest.raises(ChatError, match="chat template rejected the conversation: Conversation roles must alternate"):
        ContextFitter(Strict(n_ctx=100)).fit(request([{"role": "user", "content": "a"}]))


# --- the real model ----------------------------------------------------------------------------------------------


class RenderCountingChat:
    """The real LlamaChat, with its renders counted (to show that they do not grow with the history)."""

    def __init__(self, chat):
        self.chat, self.n_ctx, self.renders = chat, chat.n_ctx, 0

    def messages(self, *args, **shape):
        return self.chat.messages(*args, **shape)

    def count_tokens(self, text):
        return self.chat.count_tokens(text)

    def tokenize_messages(self, messages):
        self.renders += 1
        return self.chat.tokenize_messages(messages)


@pytest.fixture(scope="module")
def smol(smollm2):
    from llama_chat import LlamaChat

    chat = LlamaChat.from_file(smollm2, n_ctx=4096, n_threads=1)
    yield chat
    chat.close()


def natural_history(exchanges):
    rng = random.Random(4)
    words = "the model reads every turn of a long conversation and answers with care about rivers mountains".split()
    return [
        {"role": role, "content": " ".join(rng.choice(words) for _ in range(70)) + f" ({i})"}
        for i in range(exchanges)
        for role in ("user", "assistant")
    ]


def assert_fewest_turns_dropped(chat, req, fitted):
    limit = chat.n_ctx - reply_room(req, chat.n_ctx)
    turns = split_turns(req.history)
    kept = [m for turn in turns[fitted.dropped_turns :] for m in turn]
    assert fitted.history == kept
    assert fitted.prompt_tokens == chat.tokenize_messages(chat.messages(req.prompt, req.system_prompt, kept))
    assert len(fitted.prompt_tokens) <= limit
    one_more = [m for turn in turns[fitted.dropped_turns - 1 :] for m in turn]
    assert len(chat.tokenize_messages(chat.messages(req.prompt, req.system_prompt, one_more))) > limit


@pytest.mark.parametrize(
    "history",
    [
        # 800 short pairs: 62 s before the fit was linear
        [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "ok"}] * 800,
        natural_history(200),
    ],
    ids=["800-pairs", "200-natural-exchanges"],
)
def test_real_long_history_fits_exactly_with_a_few_renders(smol, history):
    counting = RenderCountingChat(smol)
    req = request(history, prompt="hi", max_tokens=4, system_prompt="You are brief.")
    fitted = ContextFitter(counting).fit(req)
    assert 0 < fitted.dropped_turns < len(split_turns(history))
    assert counting.renders <= 1 + 2 + 3  # prompt alone, the framing probe, the estimate's checks
    assert_fewest_turns_dropped(smol, req, fitted)


def test_real_chat_cancelled_while_being_prepared_stops_before_the_model_runs(smollm2):
    monkeypatch = pytest.MonkeyPatch()
    adapter = load_adapter(monkeypatch, smollm2)
    try:
        # Hold the llama thread so the chat is certainly still being prepared when the cancel arrives.
        release = threading.Event()
        adapter.runner.llama_thread.submit(release.wait)
        history = natural_history(200)
        ack = start_chat(adapter, prompt="Summarise our talk.", messages=json.dumps(history), max_tokens=200)
        assert ack["success"]
        preparing = status(adapter, ack["commandId"])
        assert preparing["commandStatus"] == "running"
        assert not preparing.get("prompt_tokens")
        assert cancel(adapter, ack["commandId"])["success"]
        release.set()
        final = wait_until(lambda: (s := status(adapter, ack["commandId"]))["commandStatus"] == "completed" and s)
        assert final["success"]
        assert final["stop_reason"] == "cancelled"
        assert final["reply"] == ""
        assert final["prompt_tokens"] == 0
        assert final["completion_tokens"] == 0
        assert final["inferenceMs"] == 0  # the model never started on it
    finally:
        adapter.cleanup()
        monkeypatch.undo()
