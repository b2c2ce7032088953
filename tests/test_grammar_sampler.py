"""The grammar checked on the sampler chain's pick (llamachat/grammar_sampler.py) against llama-cpp-python's own
chain, which runs the grammar over the whole vocabulary for every token: the same greedy replies, and replies that
keep to the grammar where the model's own first choices do not."""

from __future__ import annotations

import json

import jsonschema
import pytest
from llama_cpp import Llama, LlamaGrammar

from json_schemas import SCHEMAS
from llama_chat import LlamaChat, plain_llama
from llamachat.json_grammar import json_grammar

N_CTX = 1024
# Prose prompts: the model's first choices are words, not JSON, so the grammar must turn the chain's pick down.
PROMPTS = {
    "person": "Write a short poem about the sea.",
    "enum": "Tell me about your favourite colour in a sentence.",
    "bounded_int_array": "Count from one to five in words.",
    "nested_address": "Where do you live? Answer in a paragraph.",
    "refs": "Describe a triangle.",
}


@pytest.fixture(scope="module")
def ours(smollm2):
    chat = LlamaChat.from_file(smollm2, n_ctx=N_CTX, n_threads=1)
    yield chat.llm
    chat.close()


@pytest.fixture(scope="module")
def theirs(smollm2):
    # Plain llama-cpp-python, one thread like ours: the same numerics, so any difference is the sampling's.
    llm = plain_llama(smollm2, N_CTX, 1)
    yield llm
    llm.close()


def reply(llm: Llama, name: str, **sampling) -> str:
    llm.reset()  # every reply reads its prompt in the same batches
    grammar = LlamaGrammar.from_string(json_grammar(SCHEMAS[name]), verbose=False)
    answer = llm.create_chat_completion(
        messages=[{"role": "user", "content": PROMPTS[name]}], grammar=grammar, max_tokens=160, **sampling
    )
    return answer["choices"][0]["message"]["content"]


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_greedy_replies_are_llama_cpp_pythons_and_keep_to_the_schema(ours, theirs, name):
    text = reply(ours, name, temperature=0.0)
    assert text == reply(theirs, name, temperature=0.0)
    jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sampled_replies_keep_to_the_schema(ours, seed):
    for name in PROMPTS:
        text = reply(ours, name, temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
