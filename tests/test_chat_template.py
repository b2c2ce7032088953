"""Template choice and the system role without a model: choose_template reads a GGUF's metadata and its BOS/EOS
texts, so a named stand-in with just those parts drives every branch; the templates are rendered by
llama-cpp-python's real Jinja formatter. tests/test_llama_chat.py checks the same choices on real GGUFs."""

from __future__ import annotations

import pytest

from llama_chat import DEFAULT_SYSTEM_PROMPT, conversation
from llamachat.chat_template import ARCHITECTURE_TEMPLATES, CHATML, GEMMA, TEMPLATES, ChatTemplate, choose_template
from llamachat.llama_settings import CHAT_FORMATS

BOS, EOS = 1, 2
DROPS_SYSTEM = (  # a template that has no system role and silently leaves the system text out
    "{% for m in messages %}{% if m['role'] != 'system' %}[{{ m['role'] }}] {{ m['content'] }}\n{% endif %}{% endfor %}"
)


class _VocabStandIn:
    def __init__(self, texts: dict[int, str]) -> None:
        self.texts = texts

    def token_get_text(self, token: int) -> str:
        return self.texts[token]


class GgufStandIn:
    """What choose_template reads from a loaded Llama: the GGUF metadata and the BOS/EOS tokens' ids and texts."""

    def __init__(self, metadata: dict[str, str], bos: str | None = "<s>", eos: str | None = "</s>") -> None:
        self.metadata = metadata
        self._bos, self._eos = (BOS if bos is not None else -1), (EOS if eos is not None else -1)
        self._model = _VocabStandIn({BOS: bos, EOS: eos})

    def token_bos(self) -> int:
        return self._bos

    def token_eos(self) -> int:
        return self._eos


def render(template: ChatTemplate, *turns: tuple[str, str]) -> str:
    return template.render([{"role": role, "content": content} for role, content in turns])


def test_the_gguf_s_own_template_wins_over_its_architecture_and_gets_its_bos_and_eos_texts():
    own = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{{ eos_token }}"
    choice = choose_template(GgufStandIn({"tokenizer.chat_template": own, "general.architecture": "gemma3"}))
    assert choice.source == "the model's own chat template"
    assert render(choice.template, ("user", "Hi")) == "<s><user>Hi</s>"
    assert choice.template(messages=[{"role": "user", "content": "Hi"}]).stop == ["</s>"]  # no extra stops


@pytest.mark.parametrize("override", CHAT_FORMATS)
def test_an_override_forces_its_template_even_over_the_gguf_s_own(override):
    template, stops = TEMPLATES[override]
    gguf = GgufStandIn({"tokenizer.chat_template": "{{ messages[0]['content'] }}", "general.architecture": "llama"})
    choice = choose_template(gguf, override)
    assert choice.source == f"the '{override}' template set by CPAI_MODULE_LLAMA_CHAT_FORMAT"
    reference = ChatTemplate(template, "</s>", "<s>", EOS, stops)
    assert render(choice.template, ("user", "Hi")) == render(reference, ("user", "Hi"))


def test_the_settings_accept_exactly_the_templates_there_are():
    assert set(CHAT_FORMATS) == set(TEMPLATES)


def test_an_unknown_override_is_refused_listing_the_known_ones():
    with pytest.raises(ValueError) as raised:
        choose_template(GgufStandIn({"general.architecture": "qwen2"}), "llama-9")
    assert str(raised.value) == (
        "Unknown chat format 'llama-9' in CPAI_MODULE_LLAMA_CHAT_FORMAT; use one of chatml, gemma, phi3 "
        "or leave it empty to use the model's own template"
    )


@pytest.mark.parametrize(
    "architecture, prompt",
    [
        ("gemma3", "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"),
        ("qwen2", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        ("phi3", "<|user|>\nHi<|end|>\n<|assistant|>\n"),
    ],
)
def test_a_gguf_without_a_template_gets_its_architecture_family_s(architecture, prompt):
    # An empty chat_template counts as none.
    gguf = GgufStandIn({"tokenizer.chat_template": "", "general.architecture": architecture}, bos="<bos>")
    choice = choose_template(gguf)
    name = ARCHITECTURE_TEMPLATES[architecture]
    assert choice.source == f"the '{name}' template for its '{architecture}' architecture (the GGUF has none)"
    assert render(choice.template, ("user", "Hi")) == prompt


@pytest.mark.parametrize("metadata, architecture", [({"general.architecture": "llama"}, "llama"), ({}, "unknown")])
def test_an_unknown_family_falls_back_to_chatml_and_says_so(metadata, architecture):
    choice = choose_template(GgufStandIn(metadata))
    assert choice.source == (
        f"the 'chatml' template: the GGUF has no chat template and its '{architecture}' architecture has no known "
        "format; set CPAI_MODULE_LLAMA_CHAT_FORMAT if replies look wrong"
    )
    assert render(choice.template, ("user", "Hi")) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_the_template_s_end_of_turn_markers_are_added_to_the_stop_strings():
    gemma = choose_template(GgufStandIn({"general.architecture": "gemma3"}, bos="<bos>", eos="<eos>")).template
    assert gemma(messages=[{"role": "user", "content": "Hi"}]).stop == ["<eos>", "<end_of_turn>"]


def test_a_vocabulary_without_bos_or_eos_gives_no_empty_stop_string():
    chatml = choose_template(GgufStandIn({"general.architecture": "qwen3"}, bos=None, eos=None)).template
    # An empty stop string would end every reply at once.
    assert chatml(messages=[{"role": "user", "content": "Hi"}]).stop == ["<|im_end|>"]


@pytest.mark.parametrize(
    "template, system_role",
    [(CHATML, True), (TEMPLATES["phi3"][0], True), (GEMMA, False), (DROPS_SYSTEM, False)],
    ids=["chatml", "phi3", "gemma-raises", "drops-system-text"],
)
def test_supports_system_role_only_when_the_system_text_reaches_the_prompt(template, system_role):
    assert ChatTemplate(template, "</s>", "<s>", EOS, []).supports_system_role() is system_role


def test_gemma_refuses_a_system_turn_rather_than_rendering_it_wrongly():
    with pytest.raises(ValueError, match="Gemma has no system role"):
        render(ChatTemplate(GEMMA, "<eos>", "<bos>", EOS, []), ("system", "Be brief."), ("user", "Hi"))


HISTORY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_with_a_system_role_the_system_prompt_leads_then_history_then_the_prompt():
    assert conversation("And?", "Be brief.", HISTORY, system_role=True) == [
        {"role": "system", "content": "Be brief."},
        *HISTORY,
        {"role": "user", "content": "And?"},
    ]


def test_without_a_system_role_the_system_prompt_is_folded_into_the_first_user_turn():
    history = [dict(turn) for turn in HISTORY]
    assert conversation("And?", "Be brief.", history, system_role=False) == [
        {"role": "user", "content": "Be brief.\n\nHi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And?"},
    ]
    assert history == HISTORY  # the caller's turns are left as they were (they are compared with the next request's)
    assert conversation("Hi", "Be brief.", None, system_role=False) == [{"role": "user", "content": "Be brief.\n\nHi"}]


@pytest.mark.parametrize("system_prompt", [None, ""])
def test_no_system_prompt_means_the_default_one(system_prompt):
    assert conversation("Hi", system_prompt, [], system_role=True)[0] == {
        "role": "system",
        "content": DEFAULT_SYSTEM_PROMPT,
    }
    assert conversation("Hi", system_prompt, [], system_role=False) == [
        {"role": "user", "content": f"{DEFAULT_SYSTEM_PROMPT}\n\nHi"}
    ]


def test_a_folded_conversation_renders_with_gemma_and_keeps_the_system_prompt():
    template = choose_template(GgufStandIn({"general.architecture": "gemma3"}, bos="<bos>", eos="<eos>")).template
    messages = conversation("And?", "Answer in French.", HISTORY, template.supports_system_role())
    assert template.render(messages) == (
        "<bos><start_of_turn>user\nAnswer in French.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nAnd?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_a_conversation_as_sent_has_no_default_system_prompt_and_keeps_system_messages_in_place():
    history = [{"role": "system", "content": "Be brief."}, *HISTORY, {"role": "system", "content": "In French."}]
    assert conversation("And?", None, history, system_role=True, as_sent=True) == [
        *history,
        {"role": "user", "content": "And?"},
    ]
    assert conversation("Hi", None, [], system_role=True, as_sent=True) == [{"role": "user", "content": "Hi"}]
    # Without a system role, each system message goes to the head of the next user turn.
    assert conversation("And?", None, history, system_role=False, as_sent=True) == [
        {"role": "user", "content": "Be brief.\n\nHi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "In French.\n\nAnd?"},
    ]


def test_a_last_assistant_message_is_continued_not_closed():
    """Prefill: the turns before it are rendered up to the assistant's cue, then its text, unclosed."""
    template = ChatTemplate(CHATML, "<|im_end|>", "", EOS, [])
    messages = conversation("Count to three.", None, [], system_role=True, as_sent=True, prefill="One,")
    assert messages[-1] == {"role": "assistant", "content": "One,"}
    assert template.render(messages) == ("<|im_start|>user\nCount to three.<|im_end|>\n<|im_start|>assistant\nOne,")


TOOLS_TEMPLATE = (  # a template that describes tools to its model, as Qwen's and Llama 3.1's do
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_a_template_that_renders_tools_is_told_apart_and_given_them():
    renders = ChatTemplate(TOOLS_TEMPLATE, "<|im_end|>", "", EOS, [])
    assert renders.renders_tools()
    assert not ChatTemplate(CHATML, "<|im_end|>", "", EOS, []).renders_tools()
    hi = [{"role": "user", "content": "Hi"}]
    assert renders.render(hi, [WEATHER_TOOL]).startswith("<tools>get_weather;</tools>\n<|im_start|>user\nHi")
    assert renders.render(hi) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
