"""Which chat template a model gets, and whether that template can carry a system prompt.

The GGUF's own template wins unless CPAI_MODULE_LLAMA_CHAT_FORMAT forces one. A GGUF without one gets the
template of its architecture's family (llama-cpp-python would silently fall back to Llama-2's, which is wrong for
almost every model today).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama_cpp import Llama, llama_chat_format

# Our own templates for GGUFs that carry none, in the Hugging Face Jinja dialect llama-cpp-python renders.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA = (  # Gemma has no system role: the caller folds the system prompt into the first user turn.
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('Gemma has no system role') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEMPLATES = {
    "chatml": (CHATML, ["<|im_end|>"]),
    "gemma": (GEMMA, ["<end_of_turn>"]),
    "phi3": (PHI3, ["<|end|>"]),
}

# general.architecture -> template, for architectures whose chat format is unambiguous.
ARCHITECTURE_TEMPLATES = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "qwen": "chatml",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "phi3": "phi3",
}
DEFAULT_TEMPLATE = "chatml"

_MARKER = "\x1fsystem-prompt-probe\x1f"


class ChatTemplate:
    """A llama-cpp-python chat formatter that also adds the template's end-of-turn markers as stop strings."""

    def __init__(self, template: str, eos_token: str, bos_token: str, eos_token_id: int, extra_stops: list[str]):
        self._jinja = llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=eos_token, bos_token=bos_token, stop_token_ids=[eos_token_id]
        )
        self._extra_stops = extra_stops

    # messages: the plain dicts llama-cpp-python's message TypedDicts describe (list[Any] accepts both).
    def __call__(self, *, messages: list[Any], **kwargs: Any) -> llama_chat_format.ChatFormatterResponse:
        # A conversation that ends with the assistant's text is continued (prefill, as llama-server does): the
        # turns before it are rendered up to the assistant's cue, then its text follows, unclosed.
        prefill = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else None
        response = self._jinja(messages=messages[:-1] if prefill is not None else messages, **kwargs)
        if prefill is not None:
            response.prompt += prefill
        stops = response.stop if isinstance(response.stop, list) else [response.stop]
        response.stop = [s for s in stops + self._extra_stops if s]
        return response

    @property
    def stops(self) -> list[str]:
        """The stop strings __call__ adds to every prompt's (for engines that tokenize the prompt themselves)."""
        return [s for s in [self._jinja.eos_token, *self._extra_stops] if s]

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        return self(messages=messages, tools=tools).prompt

    def renders_tools(self) -> bool:
        """Renders a probe: a template that describes tools to its model shows a tool's name."""
        probe = [{"type": "function", "function": {"name": _MARKER.strip(), "parameters": {"type": "object"}}}]
        try:
            return _MARKER.strip() in self.render([{"role": "user", "content": "hi"}], tools=probe)
        except Exception:
            return False

    def supports_system_role(self) -> bool:
        """Renders a probe: templates without a system role either raise or drop the system text."""
        try:
            prompt = self.render([{"role": "system", "content": _MARKER}, {"role": "user", "content": "hi"}])
        except Exception:
            return False
        return _MARKER in prompt


@dataclass
class TemplateChoice:
    template: ChatTemplate
    source: str  # what a person reads in the log: where the template came from


def choose_template(llm: Llama, override: str | None = None) -> TemplateChoice:
    """The override, else the GGUF's template, else the architecture's, else ChatML (said out loud)."""
    metadata = llm.metadata
    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
    bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""

    def build(template: str, stops: list[str], source: str) -> TemplateChoice:
        return TemplateChoice(ChatTemplate(template, eos, bos, eos_id, stops), source)

    if override:
        if override not in TEMPLATES:
            raise ValueError(
                f"Unknown chat format {override!r} in CPAI_MODULE_LLAMA_CHAT_FORMAT; use one of {', '.join(TEMPLATES)} "
                "or leave it empty to use the model's own template"
            )
        return build(*TEMPLATES[override], f"the '{override}' template set by CPAI_MODULE_LLAMA_CHAT_FORMAT")
    if metadata.get("tokenizer.chat_template"):
        return build(metadata["tokenizer.chat_template"], [], "the model's own chat template")
    architecture = metadata.get("general.architecture", "unknown")
    name = ARCHITECTURE_TEMPLATES.get(architecture)
    if name:
        return build(
            *TEMPLATES[name], f"the '{name}' template for its '{architecture}' architecture (the GGUF has none)"
        )
    return build(
        *TEMPLATES[DEFAULT_TEMPLATE],
        f"the '{DEFAULT_TEMPLATE}' template: the GGUF has no chat template and its '{architecture}' architecture "
        "has no known format; set CPAI_MODULE_LLAMA_CHAT_FORMAT if replies look wrong",
    )
