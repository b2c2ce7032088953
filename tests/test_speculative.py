"""Speculative decoding by prompt lookup (llamachat/prompt_lookup.py, llama_chat._CountingLlama) on the real model:
the replies are normal decoding's, greedy and sampled, with stops, max_tokens, a stream closed early, and the next
chat on the same context; grounded prompts really get drafts accepted.

A drafted token's logits come from a batch of several tokens, a normal token's from a batch of one. The module drafts
only as many tokens as this machine verifies with the very logits of a one-token step (probed at load,
_CountingLlama.invariant_draft), so a greedy reply with drafts is, token for token, the one without: checked exactly,
whatever the machine. Against raw llama-cpp-python it is checked as everywhere else, up to near-ties
(raw_reference.greedy_departure). Where a machine verifies no draft exactly the module does not draft, and the tests
that need drafts say so and skip.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from llama_chat import LlamaChat
from llamachat.prompt_lookup import NGRAM_MIN, PAUSE_FIRST, PromptLookup, find_draft

CODE = """def total(items):
    result = 0
    for item in items:
        result = result + item.price * item.quantity
    return reslt
"""
# Replies that copy their prompt (drafts accepted) and one that does not.
GROUNDED = [
    f"Fix the typo in this Python function and give back the whole function:\n\n{CODE}",
    "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
    "Continue this list with the same items in the same order: Monday, Tuesday, Wednesday, Thursday, Friday, Monday,"
    " Tuesday, Wednesday,",
]
OPEN = "Write a short poem about the sea."


class FixedCostLookup(PromptLookup):
    """Test double: a drafted token's cost pinned at nothing rather than timed. The timings of a loaded machine decide
    when drafting pauses, so they would decide which replies here get drafts; with the cost pinned drafting pauses
    only on a run of rejected drafts. test_drafting_stops_sooner_where_a_pass_of_drafted_tokens_costs_more checks
    the timing itself."""

    def __init__(self, max_draft: int) -> None:
        super().__init__(max_draft)
        self.cost = 0.0

    def timed(self, drafted: int, seconds: float) -> None:
        pass


def load(path, max_draft):
    chat = LlamaChat.from_file(path, n_ctx=1024, n_threads=2, max_draft=max_draft)
    if chat.max_draft:  # as long as the probe allows
        chat.llm.drafter = chat.llm.draft_model = FixedCostLookup(chat.max_draft)
    return chat


def needs_drafts(chat):
    if not chat.max_draft:
        pytest.skip("this machine's llama.cpp verifies no draft with a one-token step's logits: the module drafts none")


# One token a draft, and drafts growing from FIRST_LENGTH to 16 (the lengths between add time, not cases).
@pytest.fixture(scope="module", params=[1, 16], ids=lambda n: f"draft{n}")
def drafting(request, smollm2):
    chat = load(smollm2, request.param)
    yield chat
    chat.close()


@pytest.fixture(scope="module")
def plain(smollm2):
    chat = load(smollm2, 0)
    yield chat
    chat.close()


def greedy(chat, prompt, **options):
    choice = chat.do_chat(prompt, temperature=0, **options)["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


_UNSPECULATED: dict[tuple[str, int, str | None], tuple[str, str]] = {}


def unspeculated(plain, prompt, max_tokens, stop=None):
    """The greedy reply with speculation off, computed once for every draft length."""
    if (prompt, max_tokens, stop) not in _UNSPECULATED:
        stops = {"stop": [stop]} if stop else {}
        _UNSPECULATED[prompt, max_tokens, stop] = greedy(plain, prompt, max_tokens=max_tokens, **stops)
        assert plain.drafted_tokens == 0
    return _UNSPECULATED[prompt, max_tokens, stop]


_LOOKUPS: dict[tuple[str, int], int] = {}


def lookups(raw, chat, prompt, n):
    """How many of raw llama-cpp-python's first n greedy reply tokens (this run, this machine) a one-token draft
    from the conversation so far predicts. Whether a reply copies its prompt is the model's choice, which a machine's
    numerics can flip; where raw's reply copies it, the module's drafts must get accepted."""
    if (prompt, n) not in _LOOKUPS:
        prompt_tokens = raw.chat_tokens(chat.messages(prompt))
        reply = raw.greedy_tokens(prompt_tokens, n)
        ids = np.array(prompt_tokens + reply, dtype=np.intc)
        start = len(prompt_tokens)
        _LOOKUPS[prompt, n] = sum(find_draft(ids[: start + i], 1).tolist() == [reply[i]] for i in range(len(reply)))
    return _LOOKUPS[prompt, n]


COPIES = 4  # raw's reply predicted this often: drafts cannot all miss (drafting pauses after about 7 misses)


def departure(raw, chat, prompt, reply, finish_reason):
    return raw.greedy_departure(raw.chat_tokens(chat.messages(prompt)), reply, ended=finish_reason == "stop")


@pytest.mark.parametrize("prompt", [*GROUNDED, OPEN])
def test_greedy_replies_are_normal_decodings(drafting, plain, raw_smollm2, prompt):
    reply, finish = greedy(drafting, prompt, max_tokens=80)
    assert departure(raw_smollm2, drafting, prompt, reply, finish) is None, reply
    assert 0 <= drafting.accepted_tokens <= drafting.drafted_tokens
    assert drafting.generated_tokens <= 80
    if drafting.max_draft and lookups(raw_smollm2, drafting, prompt, 80) >= COPIES:
        assert drafting.accepted_tokens > 0, (prompt, reply)
    # The same model with speculation off gives the very same reply.
    assert (reply, finish) == unspeculated(plain, prompt, 80)


def test_max_tokens_counts_every_token_drafted_or_not(drafting, plain, raw_smollm2):
    reply, finish = greedy(drafting, GROUNDED[1], max_tokens=7)
    assert finish == "length"
    assert drafting.generated_tokens == 7
    assert reply == unspeculated(plain, GROUNDED[1], 7)[0]
    if drafting.max_draft and lookups(raw_smollm2, drafting, GROUNDED[1], 7) >= 2:
        assert drafting.accepted_tokens > 0  # the cap fell on drafted tokens


def test_a_stop_string_ends_the_reply_inside_a_draft(drafting, plain, raw_smollm2):
    prompt = GROUNDED[1]
    unstopped, _ = unspeculated(plain, prompt, 40)
    words = unstopped.split()
    assert len(words) >= 4, unstopped
    stop = words[len(words) // 2]  # past the reply's first drafts
    reply, finish = greedy(drafting, prompt, max_tokens=40, stop=[stop])
    reason = "completed" if finish == "stop" else "length"
    tokens = raw_smollm2.chat_tokens(drafting.messages(prompt))
    assert raw_smollm2.stop_departure(tokens, reply, reason, stop, unstopped) is None
    assert (reply, finish) == unspeculated(plain, prompt, 40, stop)
    if drafting.max_draft and lookups(raw_smollm2, drafting, prompt, 40) >= COPIES:
        assert drafting.accepted_tokens > 0


def test_a_stream_closed_mid_reply_keeps_its_text_and_the_next_chat_continues_it(drafting, raw_smollm2):
    # A cancel closes the stream between two tokens, here the first after a draft was evaluated (accepted or not);
    # the KV cache then holds drafted positions past the reply, and the next turn, which reuses the cached prefix,
    # must not read them as its own.
    needs_drafts(drafting)
    prompt = GROUNDED[0]
    stream = drafting.do_chat(prompt, temperature=0, max_tokens=80, stream=True, should_abort=lambda: False)
    pieces = []
    for chunk in stream:
        pieces.append(chunk["choices"][0]["delta"].get("content") or "")
        if drafting.drafted_tokens:
            break
    stream.close()
    partial = "".join(pieces)
    assert drafting.drafted_tokens > 0 and partial
    assert raw_smollm2.greedy_departure(raw_smollm2.chat_tokens(drafting.messages(prompt)), partial) is None

    history = [{"role": "user", "content": prompt}, {"role": "assistant", "content": partial}]
    follow = "Now repeat the last line of the function."
    choice = drafting.do_chat(follow, history=history, temperature=0, max_tokens=40)["choices"][0]
    tokens = raw_smollm2.chat_tokens(drafting.messages(follow, None, history))
    ended = choice["finish_reason"] == "stop"
    assert raw_smollm2.greedy_departure(tokens, choice["message"]["content"], ended=ended) is None


def test_drafts_stay_as_long_as_the_machine_verifies_them_exactly(gemma3):
    # Gemma 3's Q4_K weights get a layout that llama.cpp's CPU backend multiplies several rows at a time, and from some
    # batch size on a drafted position's logits then differ from a one-token step's (from 4 tokens on AVX2): the
    # probe caps the drafts below that, wherever it lies on this machine, and the replies stay the same.
    speculating, plain = load(gemma3, 16), load(gemma3, 0)
    try:
        assert 0 <= speculating.max_draft <= 16
        for prompt in GROUNDED:
            assert greedy(speculating, prompt, max_tokens=48) == greedy(plain, prompt, max_tokens=48), prompt
    finally:
        speculating.close()
        plain.close()


# Sampling: the reply's first tokens over many seeds, with and without drafts, on disjoint seeds (two independent
# samples of the same distribution if the rule is right). Where the draft is offered the model is uncertain at this
# temperature, so drafts are both accepted and rejected.
SAMPLES = 100
SAMPLED_TOKENS = 4


def first_tokens(chat, seeds):
    outcomes, drafted, accepted = Counter(), 0, 0
    for seed in seeds:
        choice = chat.do_chat(GROUNDED[1], temperature=1.5, seed=seed, max_tokens=SAMPLED_TOKENS)["choices"][0]
        outcomes[choice["message"]["content"]] += 1
        drafted, accepted = drafted + chat.drafted_tokens, accepted + chat.accepted_tokens
    return outcomes, drafted, accepted


def test_sampled_replies_keep_the_models_distribution(smollm2):
    chat = load(smollm2, 4)
    try:
        needs_drafts(chat)
        speculated, drafted, accepted = first_tokens(chat, range(SAMPLES))
        chat.llm.drafter = chat.llm.draft_model = None
        unspeculated, _, _ = first_tokens(chat, range(SAMPLES, 2 * SAMPLES))
    finally:
        chat.close()
    assert 0 < accepted < drafted  # both branches of the rule were taken
    # Each reply's frequency: the two samples' difference has standard deviation sqrt(2 p (1 - p) / n) under the
    # same distribution; 5 of them (plus one sample's granularity) is a false alarm once in millions of tests, and
    # the seeds are fixed, so on one machine the test either always passes or always fails.
    for reply in speculated.keys() | unspeculated.keys():
        p = (speculated[reply] + unspeculated[reply]) / (2 * SAMPLES)
        bound = 5 * math.sqrt(2 * p * (1 - p) / SAMPLES) + 1 / SAMPLES
        assert abs(speculated[reply] - unspeculated[reply]) / SAMPLES <= bound, (reply, speculated, unspeculated)
    # A drafter that forced its draft, or a sampler that skipped a position, would show as a gross excess of the
    # copied reply: the most frequent reply stays within the bound as well.
    top = speculated.most_common(1)[0][0]
    assert unspeculated[top] > 0


def test_find_draft_takes_the_latest_longest_match():
    ids = np.array([5, 6, 7, 8, 1, 6, 7, 9, 2, 5, 6, 7], dtype=np.intc)
    assert find_draft(ids, 3).tolist() == [8, 1, 6]  # "5 6 7" beats the later "6 7"
    assert find_draft(ids, 1).tolist() == [8]
    ids = np.array([6, 7, 8, 1, 6, 7, 9, 2, 6, 7], dtype=np.intc)
    assert find_draft(ids, 3).tolist() == [9, 2, 6]  # "6 7" recurs twice: the latest wins
    assert find_draft(np.array([1, 2, 3, 4], dtype=np.intc), 4).size == 0  # nothing recurs
    assert find_draft(np.array([1] * NGRAM_MIN, dtype=np.intc), 4).size == 0  # too short to hold a repeat


def test_drafting_adapts_its_length_and_pauses_while_it_does_not_pay():
    drafter = PromptLookup(16)
    ids = np.array(list(range(50)) * 2 + [0, 1, 2], dtype=np.intc)  # the last tokens recur: there is a draft
    lengths = []
    for _ in range(4):  # every draft accepted whole: the length doubles up to the most
        draft = drafter(ids)
        lengths.append(len(draft))
        for _ in draft:
            drafter.checked(True)
    assert lengths == [4, 8, 16, 16]
    rejected = 0
    while len(drafter(ids)):  # now every draft is rejected at its first token
        drafter.checked(False)
        rejected += 1
    assert 1 <= rejected <= 4  # a few rejections turn it off...
    paused = 1
    while not len(drafter(ids)):
        paused += 1
    assert paused == PAUSE_FIRST  # ...for PAUSE_FIRST tokens, and then it probes with one token
    assert drafter.pending == 1


def test_drafting_stops_sooner_where_a_pass_of_drafted_tokens_costs_more():
    ids = np.array(list(range(50)) * 2 + [0, 1, 2], dtype=np.intc)
    cheap, dear = PromptLookup(16), PromptLookup(16)
    for _ in range(30):  # one-token passes of 10 ms; a pass with 4 drafted tokens 11 ms here, 50 ms there
        for drafter, verify_s in ((cheap, 0.011), (dear, 0.05)):
            drafter.timed(0, 0.01)
            drafter.timed(4, verify_s)
    assert cheap.cost < 0.1 < 0.9 < dear.cost
    for drafter in (cheap, dear):  # half of every draft accepted
        for _ in range(3):
            draft = drafter(ids)
            for i in range(len(draft)):
                drafter.checked(i < len(draft) // 2 or len(draft) == 1)
    assert len(cheap(ids)) > 0  # half accepted pays where a drafted token costs a tenth of a pass...
    assert len(dear(ids)) == 0  # ...and not where it costs nearly a whole one
