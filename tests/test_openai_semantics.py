"""OpenAI's semantics on our /v1/chat/completions, driven by the real `openai` package against a real server with the
real module and SmolLM2: a conversation too long is a 400 (context_length_exceeded) before any streaming and nothing
is left out unless asked; messages reach the model's template as sent (no default system prompt, system messages
where they are, a last assistant message continued); a stop string is one string; models are retrieved by id; range
errors name their field; answers carry a system_fingerprint. Prompt sizes are checked against the model's own
template rendered and tokenized by raw llama-cpp-python in the same run."""

from __future__ import annotations

import httpx
import openai
import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from llamachat.model_file import SMALL_MODEL_FILENAME
from module_chat import follow, start_chat

MODEL = SMALL_MODEL_FILENAME
CONTEXT = 2048  # running_server's
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(smollm2_server):
    # The package's own retries left on: a 400 must not be sent again (a 5xx would be, twice more).
    return openai.OpenAI(base_url=f"{smollm2_server}/v1", api_key="any key", timeout=120)


@pytest.fixture(scope="module")
def template_tokens(smollm2):
    """The prompt tokens the model's own chat template gives a conversation, by raw llama-cpp-python."""
    vocab = Llama(model_path=str(smollm2), vocab_only=True, verbose=False)
    eos = vocab._model.token_get_text(vocab.token_eos())
    bos = vocab._model.token_get_text(vocab.token_bos())
    formatter = Jinja2ChatFormatter(vocab.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)

    def count(messages, continued: str | None = None) -> int:
        rendered = formatter(messages=messages)
        text = rendered.prompt + (continued or "")
        return len(vocab.tokenize(text.encode(), add_bos=not rendered.added_special, special=True))

    return count


def test_a_prompt_longer_than_the_context_is_a_400_context_length_exceeded_sent_once(smollm2_server):
    sent = []
    # The package's own retries left on (2): a 400 must not be sent again, as a 5xx would be.
    counting = httpx.Client(event_hooks={"request": [sent.append]}, timeout=120)
    client = openai.OpenAI(base_url=f"{smollm2_server}/v1", api_key="any key", http_client=counting)
    long = [{"role": "user", "content": "word " * (CONTEXT + 100)}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=8)
    assert caught.value.status_code == 400
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"
    assert "context" in caught.value.message
    assert len(sent) == 1
    with pytest.raises(openai.BadRequestError) as streamed:  # streamed: refused before any event is sent
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=8, stream=True)
    assert streamed.value.code == "context_length_exceeded"
    assert len(sent) == 2


def test_a_history_longer_than_the_context_is_a_400_unless_the_client_asks_for_trimming(client):
    pairs = [
        message
        for i in range(120)
        for message in (
            {"role": "user", "content": f"Tell me fact number {i} about the sea, in one long sentence please."},
            {"role": "assistant", "content": f"Fact {i}: the sea is very large and salty and deep and blue, mostly."},
        )
    ]
    messages = [*pairs, {"role": "user", "content": "And another?"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert caught.value.code == "context_length_exceeded"
    assert "trim_history" in caught.value.message
    trimmed = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, extra_body={"trim_history": True}
    )
    assert 0 < trimmed.usage.prompt_tokens <= CONTEXT - 4


def test_no_system_prompt_is_added_and_a_later_system_message_stays_where_it_is(client, template_tokens):
    answer = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert answer.usage.prompt_tokens == template_tokens(HI)
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Name another."},
    ]
    as_system = [{**m, "role": "system"} if m["role"] == "developer" else m for m in conversation]
    answer = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=1)
    assert answer.usage.prompt_tokens == template_tokens(as_system)


def test_a_last_assistant_message_is_continued(client, template_tokens):
    """The reply follows the assistant's text in the same turn (prefill): the prompt is the conversation up to the
    assistant's cue, then its text, unclosed."""
    messages = [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two,"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert answer.usage.prompt_tokens == template_tokens(messages[:1], continued="One, two,")
    closed = template_tokens(messages) + template_tokens([{"role": "user", "content": "x"}]) - 1
    assert answer.usage.prompt_tokens < closed  # not the assistant's turn closed and a new one opened
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_a_stop_string_that_reads_as_a_json_list_is_one_stop_string(smollm2_server, client):
    """'[" "]' stops at those five characters, not at every space: with it the greedy reply is the one without stop
    strings (both runs start from the same cache state, after the same other chat)."""
    story = [{"role": "user", "content": "Write a story about a dragon who bakes bread."}]

    def greedy(**fields) -> str:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)  # the same cache state each time
        answer = client.chat.completions.create(model=MODEL, messages=story, max_tokens=24, temperature=0, **fields)
        return answer.choices[0].message.content

    plain = greedy()
    assert greedy(stop='[" "]') == plain
    if " " in plain:  # the module's other reading, a JSON list, would have stopped at the first space
        assert greedy(stop=[" "]) == plain[: plain.index(" ")]


def test_models_are_retrieved_by_id_and_an_unknown_one_is_openais_404(client):
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "llamachat")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"
    assert MODEL in caught.value.message


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"999999999": 5}}, "logit_bias"),
    ],
)
def test_a_range_error_names_its_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1, **fields)
    assert caught.value.param == param
    assert param in caught.value.message


def test_answers_and_chunks_carry_a_system_fingerprint_of_model_and_build(client):
    answer = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert (
        answer.system_fingerprint.startswith(f"{MODEL}/llama-cpp-python-")
        and "unknown" not in answer.system_fingerprint
    )
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, stream=True))
    assert {c.system_fingerprint for c in chunks} == {answer.system_fingerprint}


def test_the_native_api_keeps_its_default_system_prompt_and_trimming(smollm2_server, template_tokens):
    """text/chat is unchanged: its default system prompt is added (more tokens than the template alone gives)."""
    done = follow(smollm2_server, start_chat(smollm2_server, prompt="Hi", max_tokens="1")["commandId"])
    assert done["prompt_tokens"] > template_tokens(HI)
    assert done["dropped_turns"] == 0


def test_n_choices_are_chats_of_their_own_with_usage_summed(smollm2_server, client):
    answer = client.chat.completions.create(model=MODEL, messages=HI, n=3, max_tokens=6)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") and c.message.content for c in answer.choices)
    assert answer.usage.completion_tokens <= 18
    assert answer.usage.prompt_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HI, n=2, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    texts, finished = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert sorted(finished) == [0, 1]
    assert all(texts.values())
    usage = chunks[-1].usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 2 <= usage.completion_tokens <= 12
