"""TokenPieces gives llama-cpp-python's detokenize, from pieces asked of llama.cpp once: every token of both test
models' vocabularies, special or not, alone and in sequences (the beginning-of-sentence quirk included), and pieces
longer than llama-cpp-python's 32-byte buffer whole, where it loses them."""

import pytest
from llama_cpp import Llama

from llama_chat import _CountingLlama
from llamachat.token_pieces import TokenPieces
from raw_reference import full_piece


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def vocabulary(request, smollm2, gemma3):  # both named here: the tests belong to the model layer (conftest.py)
    llm = Llama(str({"smollm2": smollm2, "gemma3": gemma3}[request.param]), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.mark.parametrize("special", [False, True])
def test_every_token_alone_is_the_text_llama_cpp_gives_it(vocabulary, special):
    pieces = TokenPieces(vocabulary._model.vocab)
    for token in range(vocabulary.n_vocab()):
        expected = full_piece(vocabulary, token, special)
        if token == vocabulary.token_bos() and expected.startswith(b" "):
            expected = expected[1:]
        assert pieces.detokenize([token], special) == expected, token
        # llama-cpp-python's buffer is 32 bytes: 0.3.36 gives a longer piece (SmolLM2: "\n" and 32+ spaces) as b"".
        if len(expected) <= 32:
            assert vocabulary._model.detokenize([token], special) == expected, token


@pytest.mark.parametrize("special", [False, True])
def test_a_reply_is_detokenized_as_llama_cpp_python_does_it(vocabulary, special):
    text = "Héllo, wörld! 你好 🦙 — <b>markup</b>\n\tdef f(x):\n        return x ** 2  # twice ✓ " * 20
    tokens = vocabulary.tokenize(text.encode(), add_bos=False, special=True)
    pieces = TokenPieces(vocabulary._model.vocab)
    for start, end in [(0, len(tokens)), (3, 40), (0, 1), (5, 5)]:
        part = tokens[start:end]
        assert pieces.detokenize(part, special) == vocabulary.detokenize(part, special=special)
    with_bos = [vocabulary.token_bos(), *vocabulary.tokenize(b" leading space", add_bos=False)]
    assert pieces.detokenize(with_bos, special) == vocabulary.detokenize(with_bos, special=special)
    assert pieces.detokenize(tokens, special) == vocabulary.detokenize(tokens, special=special)  # now from the cache


def test_the_modules_llama_detokenizes_long_pieces_whole(smollm2):
    module = _CountingLlama(str(smollm2), vocab_only=True, verbose=False)
    try:
        code = b"def f():\n" + b" " * 40 + b"return 1"
        tokens = module.tokenize(code, add_bos=False)
        assert any(len(full_piece(module, token)) > 32 for token in tokens)  # a piece llama-cpp-python loses
        assert module.detokenize(tokens) == code
    finally:
        module.close()
