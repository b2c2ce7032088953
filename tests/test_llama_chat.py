"""The wrapper on real models: loading, chatting, streaming, templates and load failures."""

import pytest

from llama_chat import DEFAULT_SYSTEM_PROMPT, LlamaChat, ModelLoadError


def load(path, **options):
    return LlamaChat.from_file(path, n_ctx=1024, n_threads=2, **options)


@pytest.fixture(scope="module")
def smol(smollm2):
    chat = load(smollm2)
    yield chat
    chat.close()


def test_loads_the_local_file_with_its_own_template(smol, smollm2):
    assert smol.model_path == str(smollm2)
    assert smol.model_name == smollm2.name
    assert smol.n_ctx == 1024  # explicit, not the model's training context
    assert smol.template_source == "the model's own chat template"
    assert smol.system_role
    assert smol.fallback_reason is None


def test_do_chat_returns_a_completion(smol):
    response = smol.do_chat("What is 2 + 2?", max_tokens=16, temperature=0)
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"]["content"].strip()
    assert response["usage"]["completion_tokens"] <= 16


def test_do_chat_streams_chunks(smol):
    chunks = list(smol.do_chat("Name three colours.", max_tokens=12, temperature=0, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(chunks) > 3
    assert text.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_system_prompt_goes_in_as_system_role(smol):
    messages = smol.messages("Hi", "Answer like a pirate.")
    assert messages[0] == {"role": "system", "content": "Answer like a pirate."}
    prompt = smol.template.render(messages)
    assert "<|im_start|>system\nAnswer like a pirate.<|im_end|>" in prompt
    assert smol.messages("Hi")[0]["content"] == DEFAULT_SYSTEM_PROMPT


def test_history_comes_between_system_prompt_and_prompt(smol):
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"}]
    messages = smol.messages("What is my name?", None, history)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1:3] == history
    assert messages[3]["content"] == "What is my name?"


def test_tokens_counted_are_the_tokens_evaluated(smol):
    messages = smol.messages("Count these tokens, please.")
    tokens = smol.tokenize_messages(messages)
    response = smol.llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0)
    assert response["usage"]["prompt_tokens"] == len(tokens)


def test_abort_callback_stops_the_model_and_it_stays_usable(smol, raw_smollm2):
    with pytest.raises(RuntimeError, match="llama_decode"):
        list(smol.do_chat("Tell me a story.", max_tokens=32, stream=True, should_abort=lambda: True))
    prompt = "What is the capital of France?"
    choice = smol.do_chat(prompt, max_tokens=16, temperature=0)["choices"][0]
    assert choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    # The model's own greedy reply, as raw llama-cpp-python judges it: nothing of the aborted chat is left behind.
    tokens = raw_smollm2.chat_tokens(smol.messages(prompt))
    why = raw_smollm2.greedy_departure(tokens, choice["message"]["content"], ended=choice["finish_reason"] == "stop")
    assert why is None, why


def test_gemma_without_template_gets_gemma_turns_and_the_system_prompt(gemma3):
    chat = load(gemma3)
    try:
        assert "gemma" in chat.template_source
        assert "has none" in chat.template_source
        assert not chat.system_role  # Gemma has no system role: it is folded into the first user turn
        prompt = chat.template.render(chat.messages("What is the sky's colour?", "Answer in French."))
        assert prompt == (
            "<bos><start_of_turn>user\nAnswer in French.\n\nWhat is the sky's colour?<end_of_turn>\n"
            "<start_of_turn>model\n"
        )
        with_system = chat.tokenize_messages(chat.messages("Hi", "Answer in French, always, briefly."))
        assert len(with_system) > len(chat.tokenize_messages(chat.messages("Hi", "x")))
        reply = chat.do_chat("Say hello.", "Answer in French.", max_tokens=24, temperature=0)["choices"][0]["message"]
        assert "<start_of_turn>" not in reply["content"]
        assert "<end_of_turn>" not in reply["content"]
    finally:
        chat.close()


def test_chat_format_override_is_checked(smollm2):
    with pytest.raises(ValueError, match="CPAI_MODULE_LLAMA_CHAT_FORMAT"):
        load(smollm2, chat_format="llama-9")
    chat = load(smollm2, chat_format="gemma")
    try:
        assert "CPAI_MODULE_LLAMA_CHAT_FORMAT" in chat.template_source
        assert not chat.system_role
    finally:
        chat.close()


def test_missing_model_says_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError) as raised:
        LlamaChat(
            repo_id="TheBloke/Mistral-7B-Instruct-v0.2-GGUF",
            fileglob="*.Q4_K_M.gguf",
            filename="mistral.gguf",
            model_dir=str(tmp_path),
        )
    message = str(raised.value)
    assert f"'{tmp_path / 'mistral.gguf'}': no such file" in message
    assert "downloading '*.Q4_K_M.gguf' from Hugging Face repo 'TheBloke/Mistral-7B-Instruct-v0.2-GGUF'" in message
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in message


def test_corrupt_model_file_is_reported(tmp_path):
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 1000)
    with pytest.raises(ModelLoadError, match="broken.gguf.*complete GGUF"):
        LlamaChat.from_file(corrupt)


def test_small_fallback_model_is_used_and_labelled(tmp_path, smollm2):
    (tmp_path / smollm2.name).symlink_to(smollm2)
    chat = LlamaChat(
        repo_id="", fileglob="", filename="mistral-7b-instruct-v0.2.Q4_K_M.gguf", model_dir=str(tmp_path), n_ctx=512
    )
    try:
        assert chat.model_name == smollm2.name
        assert "mistral-7b-instruct-v0.2.Q4_K_M.gguf': no such file" in chat.fallback_reason
    finally:
        chat.close()
