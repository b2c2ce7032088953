"""The adapter on the real SmolLM2 model, driven through the SDK's RequestData and the handlers its loop calls."""

import gc
import json
import subprocess
import sys
import time

import pytest

from live_server import ROOT, module_threads
from module_harness import cancel, load_adapter, run_chat, start_chat, status, wait_until

# A story runs to hundreds of tokens on any machine, whichever words it takes (max_tokens 0: until the model stops or
# the context is full): a chat still running when a test looks or cancels.
STORY = "Write a long story about a dragon who learns to bake bread."


@pytest.fixture(scope="module")
def adapter(smollm2):
    monkeypatch = pytest.MonkeyPatch()
    adapter = load_adapter(monkeypatch, smollm2)
    monkeypatch.undo()  # the settings are read once, by initialise(); other tests get a clean environment
    yield adapter
    adapter.cleanup()


def test_a_good_chat_is_accepted_at_once_with_its_own_command_id(adapter):
    from module_harness import request

    data = request("prompt", prompt="Hello", max_tokens=8)
    ack = adapter.process(data)  # a plain answer: the SDK sends it as it is, and starts no long process of its own
    assert ack["success"] is True
    assert ack["commandId"] == data.request_id
    assert ack["commandStatus"] == "running"
    assert ack["message"] == "Command is running in the background"
    assert "queue_position" not in ack
    assert adapter.long_running_command_task is None
    wait_until(lambda: status(adapter, data.request_id)["commandStatus"] == "completed")


def assert_greedy(adapter, raw, prompt: str, final: dict) -> None:
    """The chat's reply is greedy decoding of its prompt, as raw llama-cpp-python judges it (tests/raw_reference.py)."""
    tokens = raw.chat_tokens(adapter.runner.llama_chat.messages(prompt))
    why = raw.greedy_departure(tokens, final["reply"], ended=final["stop_reason"] == "completed")
    assert why is None, f"the reply to {prompt!r} is not the model's greedy reply: {why}"


def test_chat_completes_with_reply_and_metrics(adapter, raw_smollm2):
    prompt = "What is the capital of France?"
    final = run_chat(adapter, prompt=prompt, max_tokens=24, temperature=0)
    assert final["success"]
    assert final["commandStatus"] == "completed"
    assert final["message"] == "Command has completed"
    assert final["stop_reason"] in ("completed", "length")
    assert final["reply"]
    assert_greedy(adapter, raw_smollm2, prompt, final)
    assert final["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert final["model_fallback"] is False
    assert 0 < final["completion_tokens"] <= 24
    assert final["prompt_tokens"] > 10
    assert final["time_to_first_token_ms"] > 0
    assert final["tokens_per_second"] > 0
    assert final["processMs"] >= final["inferenceMs"] > 0
    assert final["elapsed_ms"] == final["processMs"]


def test_max_tokens_ends_with_length_and_counts_every_token(adapter):
    final = run_chat(adapter, prompt="Write a long poem about the sea.", max_tokens=16, temperature=0)
    assert final["stop_reason"] == "length"
    assert final["completion_tokens"] == 16


def test_completion_tokens_are_the_model_s_tokens_not_streamed_pieces(adapter):
    # An emoji takes several tokens, which llama-cpp-python streams as one piece once the character is complete.
    history = [{"role": "user", "content": "Send me some party emoji."}, {"role": "assistant", "content": "🎉🥳🎂🎈🎁"}]
    prompt = "Say it again, exactly."
    final = run_chat(adapter, prompt=prompt, messages=json.dumps(history), temperature=0, max_tokens=24)
    assert sum(ord(c) > 0xFFFF for c in final["reply"]) >= 3, final["reply"]
    usage = adapter.runner.llama_thread.submit(
        lambda: adapter.runner.llama_chat.do_chat(prompt, None, history, temperature=0, max_tokens=24)
    ).result()["usage"]
    assert final["completion_tokens"] == usage["completion_tokens"] > len(final["reply"])


def test_status_shows_the_reply_growing(adapter):
    ack = start_chat(adapter, prompt=STORY, max_tokens=0, temperature=0)  # runs until stopped, however fast
    seen = []
    deadline = time.monotonic() + 120
    while len(seen) < 3 and (s := status(adapter, ack["commandId"]))["commandStatus"] == "running":
        assert s["success"]
        assert s["message"] == "The long running command is still in progress"
        if s["reply"] and (not seen or s["reply"] != seen[-1]):
            assert not seen or s["reply"].startswith(seen[-1])  # it only grows
            assert s["completion_tokens"] > 0
            assert s["elapsed_ms"] >= s["time_to_first_token_ms"] > 0
            assert s["prompt_tokens"] > 0
            assert s["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
            seen.append(s["reply"])
        assert time.monotonic() < deadline, "the chat did not end"
        time.sleep(0.05)  # a client's poll interval; polling flat out would starve the generating thread
    assert len(seen) >= 3, "the reply should be seen growing over several polls"
    cancel(adapter, ack["commandId"])
    final = wait_until(lambda: (s := status(adapter, ack["commandId"]))["commandStatus"] == "completed" and s)
    assert final["reply"].startswith(seen[-1])
    assert final["stop_reason"] == "cancelled"


def test_cancel_keeps_the_partial_reply_and_a_late_cancel_does_not_touch_the_next_chat(adapter):
    ack = start_chat(adapter, prompt=STORY, max_tokens=0, temperature=0)
    wait_until(lambda: status(adapter, ack["commandId"]).get("completion_tokens", 0) >= 5, what="a few tokens")
    answer = cancel(adapter, ack["commandId"])
    assert answer["success"]
    assert answer["commandStatus"] == "cancelled"
    final = wait_until(lambda: (s := status(adapter, ack["commandId"]))["commandStatus"] == "completed" and s)
    assert final["stop_reason"] == "cancelled"
    assert final["success"]
    assert final["reply"].strip()
    assert final["completion_tokens"] >= 5

    # A cancel for the finished command arrives late: the command can still be read, and the next chat runs to its end.
    assert cancel(adapter, ack["commandId"])["success"]
    assert status(adapter, ack["commandId"]) == final
    nxt = run_chat(adapter, prompt="What is 1 + 1?", max_tokens=12, temperature=0)
    assert nxt["stop_reason"] in ("completed", "length")
    assert nxt["reply"].strip()


def test_cancel_during_a_long_prompt_stops_it_and_the_model_stays_usable(adapter, raw_smollm2):
    # How fast (≤ 200 ms) is bench/'s to measure (results.md: "cancel during prompt processing"); this test checks that
    # the prompt's evaluation is abandoned, not finished first.
    long_prompt = "Summarise this text. " + " ".join(
        f"Paragraph {i}: the committee met on a rainy Tuesday to discuss the budget for the new library."
        for i in range(90)
    )
    ack = start_chat(adapter, prompt=long_prompt, max_tokens=0, temperature=0)
    chat = adapter.queue.get(ack["commandId"])
    job = wait_until(lambda: (j := chat.job) and j.inference_started and j)
    assert job.prompt_tokens >= 1500
    # On a CPU this slow the prompt is still being evaluated now; a GPU may be past it, and then the cancel stops
    # the generation instead, within the same time.
    mid_prompt = job.first_token_at is None
    cancel(adapter, ack["commandId"])
    wait_until(lambda: chat.result is not None, timeout=5)
    final = status(adapter, ack["commandId"])
    assert final["stop_reason"] == "cancelled"
    if mid_prompt:
        assert final["completion_tokens"] == 0
        assert job.first_token_at is None

    prompt = "What is the capital of France?"
    nxt = run_chat(adapter, prompt=prompt, max_tokens=16, temperature=0)
    assert nxt["stop_reason"] in ("completed", "length")
    assert nxt["reply"]
    assert_greedy(adapter, raw_smollm2, prompt, nxt)  # the abandoned prompt left nothing behind in the cache


def test_a_second_chat_while_one_runs_waits_in_the_queue_and_can_leave_it(adapter):
    first = start_chat(adapter, prompt=STORY, max_tokens=0, temperature=0)
    assert first["success"]
    assert first["commandStatus"] == "running"
    second = start_chat(adapter, prompt="Hello?", max_tokens=8)
    assert second["success"]
    assert second["commandStatus"] == "queued"
    assert second["commandId"] != first["commandId"]
    assert second["queue_position"] == 1
    assert "estimated_wait_s" in second
    # Nobody learns the running chat's commandId, with which they could read or cancel it.
    assert first["commandId"] not in json.dumps(second)
    waiting = status(adapter, second["commandId"])
    assert waiting["commandStatus"] == "queued"
    assert waiting["queue_position"] == 1
    assert waiting["reply"] == ""
    assert first["commandId"] not in json.dumps(waiting)
    assert cancel(adapter, second["commandId"])["commandStatus"] == "cancelled"
    final = status(adapter, second["commandId"])  # at once: a queued chat has nothing to stop
    assert final["commandStatus"] == "completed"
    assert final["stop_reason"] == "cancelled"
    assert final["reply"] == ""
    assert status(adapter, first["commandId"])["commandStatus"] == "running"  # the running chat carries on
    cancel(adapter, first["commandId"])
    wait_until(lambda: status(adapter, first["commandId"])["commandStatus"] == "completed")
    assert adapter.queue.get(second["commandId"]).job is None  # it never ran


def test_second_turn_reuses_the_cache_of_the_first(adapter):
    first = run_chat(adapter, prompt="My favourite colour is green. Remember it.", max_tokens=24, temperature=0)
    history = [
        {"role": "user", "content": "My favourite colour is green. Remember it."},
        {"role": "assistant", "content": first["reply"]},
    ]
    second = run_chat(
        adapter, prompt="What is my favourite colour?", messages=json.dumps(history), max_tokens=16, temperature=0
    )
    assert second["success"]
    assert second["prompt_tokens"] > first["prompt_tokens"]
    # Only the new turn is evaluated: the earlier turn and most of the reply come from the KV cache.
    assert second["cached_tokens"] >= first["prompt_tokens"]
    assert second["prompt_tokens"] - second["cached_tokens"] < 30


def test_same_seed_same_reply(adapter):
    chat = dict(prompt="Invent a name for a cat.", max_tokens=16, temperature=1.0, seed=1234)
    assert run_chat(adapter, **chat)["reply"] == run_chat(adapter, **chat)["reply"]


def test_stop_strings_end_the_reply(adapter, raw_smollm2):
    prompt = "Count from 1 to 20, separated by commas."
    messages = adapter.runner.llama_chat.messages(prompt)
    # A stop string from the words raw llama-cpp-python's greedy reply goes on to, in this run.
    unstopped = raw_smollm2.reply(messages, max_tokens=60, temperature=0)
    stop = unstopped.split()[3]
    final = run_chat(adapter, prompt=prompt, max_tokens=60, temperature=0, stop=stop)
    tokens = raw_smollm2.chat_tokens(messages)
    assert raw_smollm2.stop_departure(tokens, final["reply"], final["stop_reason"], stop, unstopped) is None


@pytest.mark.parametrize(
    "values, field, hint",
    [
        ({}, "prompt", "missing or blank"),
        ({"prompt": "   "}, "prompt", "missing or blank"),
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens", "whole number from 0 to 32768"),
        ({"prompt": "hi", "max_tokens": "-5"}, "max_tokens", "from 0 to 32768"),
        ({"prompt": "hi", "max_tokens": "2.5"}, "max_tokens", "whole number"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature", "number from 0.0 to 2.0"),
        ({"prompt": "hi", "temperature": "3"}, "temperature", "from 0.0 to 2.0"),
        ({"prompt": "hi", "temperature": "nan"}, "temperature", "from 0.0 to 2.0"),
        ({"prompt": "hi", "top_p": "1.5"}, "top_p", "from 0.0 to 1.0"),
        ({"prompt": "hi", "top_k": "-1"}, "top_k", "from 0 to 1000"),
        ({"prompt": "hi", "seed": "x"}, "seed", "whole number"),
        ({"prompt": "hi", "messages": "[{"}, "messages", "not valid JSON"),
        ({"prompt": "hi", "messages": '{"role": "user"}'}, "messages", "JSON array"),
        ({"prompt": "hi", "messages": '[{"role": "system", "content": "x"}]'}, "messages[0].role", "system_prompt"),
        (
            {"prompt": "hi", "messages": '[{"role": "assistant", "content": "x"}]'},
            "messages",
            "start with a 'user' turn",
        ),
        ({"prompt": "hi", "stop": '["a", "b", "c", "d", "e"]'}, "stop", "1 to 4"),
        ({"prompt": "hi", "stop": '["a", ""]'}, "stop", "non-empty strings"),
        ({"prompt": "hi", "stop": "x" * 201}, "stop", "at most 200 characters long, not 201"),
        ({"prompt": "hi", "messages": "[" * 100_000}, "messages", "nested too deeply"),
        (
            {"prompt": "hi", "messages": json.dumps([{"role": "user", "content": "a"}] * 10_001)},
            "messages",
            "at most 10000 turns (MAX_HISTORY_MESSAGES), not 10001",
        ),
        (
            {"prompt": "hi", "messages": json.dumps([{"role": "user", "content": "a" * 5_000_000}])},
            "messages",
            "at most 2097152 bytes of JSON (MAX_HISTORY_BYTES), not 5000033",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(adapter, values, field, hint):
    answer = start_chat(adapter, **values)
    assert answer["success"] is False
    assert "commandId" not in answer
    assert answer["error"].startswith(field)
    assert hint in answer["error"]


@pytest.mark.parametrize(
    "stop, stops",
    [
        ("[/INST]", ["[/INST]"]),  # not JSON: one stop string
        ("[1, 2]", ["[1, 2]"]),  # JSON, but not an array of strings
        ('["\\n\\n", "User:"]', ["\n\n", "User:"]),
        ("User:", ["User:"]),
    ],
)
def test_stop_is_a_json_array_of_strings_or_else_one_string(adapter, stop, stops):
    from module_harness import request

    assert adapter.inputs.parse(request("prompt", prompt="hi", stop=stop)).sampling["stop"] == stops


def test_defaults_and_ranges_come_from_modulesettings(adapter):
    settings = json.loads((ROOT / "modulesettings.json").read_text())
    inputs = {i["Name"]: i for i in settings["Modules"]["LlamaChat"]["RouteMaps"][0]["Inputs"]}
    from module_harness import request

    parsed = adapter.inputs.parse(request("prompt", prompt="hi"))
    assert parsed.max_tokens == int(inputs["max_tokens"]["DefaultValue"])
    assert parsed.sampling["temperature"] == float(inputs["temperature"]["DefaultValue"])
    assert "seed" not in parsed.sampling  # -1: a random seed each time


def test_prompt_too_long_for_the_context_gives_the_token_counts(smollm2):
    monkeypatch = pytest.MonkeyPatch()
    small = load_adapter(monkeypatch, smollm2, CPAI_MODULE_LLAMA_CONTEXT_SIZE="512")
    try:
        # Fitting grows with the conversation, so it happens in the command, which ends with the error.
        answer = run_chat(small, prompt="word " * 600, max_tokens=50)
        assert not answer["success"]
        assert answer["stop_reason"] == "error"
        assert answer["reply"] == ""
        assert "does not fit" in answer["error"]
        assert "context holds 512" in answer["error"]
        assert "needs 50 more (max_tokens)" in answer["error"]
        assert "lower max_tokens" in answer["error"]
        tokens = int(answer["error"].split("it takes ")[1].split(" tokens")[0])
        assert tokens > 600

        # History that overflows loses its oldest whole turns, never the system prompt or the new prompt.
        history = []
        for i in range(8):
            history += [
                {"role": "user", "content": f"Tell me fact number {i} about the Moon, in detail please."},
                {"role": "assistant", "content": "The Moon is Earth's only natural satellite. " * 4},
            ]
        final = run_chat(
            small,
            prompt="Thanks! What is the Moon made of?",
            messages=json.dumps(history),
            max_tokens=40,
            temperature=0,
            system_prompt="You are a concise astronomer.",
        )
        assert final["success"]
        assert final["dropped_turns"] > 0
        assert final["prompt_tokens"] + 40 <= 512
    finally:
        small.cleanup()
        monkeypatch.undo()


def test_no_model_every_chat_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("CPAI_MODULE_LLAMA_MODEL_DIR", str(tmp_path))
    from llama_chat_adapter import LlamaChat_adapter

    broken = LlamaChat_adapter()
    broken.initialise()
    for _ in range(2):
        answer = start_chat(broken, prompt="Hello")
        assert answer["success"] is False
        assert answer["error"].startswith("No model is loaded: Unable to load a model")
    assert broken.selftest()["success"] is False
    assert broken.module_status()["loadError"]


def test_bad_settings_are_reported(smollm2, monkeypatch):
    broken = load_adapter(monkeypatch, smollm2, CPAI_MODULE_LLAMA_CONTEXT_SIZE="lots")
    answer = start_chat(broken, prompt="Hello")
    assert "CPAI_MODULE_LLAMA_CONTEXT_SIZE must be a whole number of at least 256, not 'lots'" in answer["error"]


def test_statistics_count_finished_chats_not_acknowledgements(adapter):
    before = adapter._successful_inferences
    run_chat(adapter, prompt="Hi", max_tokens=4)
    adapter.update_statistics({"success": True, "commandStatus": "running"})  # the SDK's call for the ack
    assert adapter._successful_inferences == before + 1


def test_chats_leave_no_samplers_behind_though_the_loaded_objects_are_frozen(smollm2, monkeypatch):
    # llama-cpp-python makes a sampler per completion inside a reference cycle; the collection after each chat frees
    # it. initialise() froze what was loaded, so that collection is quick, and must still find the chats' samplers.
    from llama_cpp._internals import LlamaSampler

    adapter = load_adapter(monkeypatch, smollm2)  # its own: any adapter's cleanup() unfreezes the whole process
    try:
        assert gc.get_freeze_count() > 0
        for _ in range(3):
            run_chat(adapter, prompt="Hi", max_tokens=4)
        adapter.runner.llama_thread.submit(lambda: None).result()  # the collection queued behind the last chat has run
        # The latest completion's sampler is still referenced by the model until the next one replaces it.
        assert sum(isinstance(o, LlamaSampler) for o in gc.get_objects()) <= 1
    finally:
        adapter.cleanup()
    assert gc.get_freeze_count() == 0


def test_module_status_names_the_model_and_the_device(adapter):
    status_data = adapter._get_module_status(None)  # as the SDK calls it for a queued 'status' command
    assert status_data["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert status_data["contextSize"] == 4096
    assert status_data["chatTemplate"] == "the model's own chat template"
    assert status_data["inferenceDevice"] == "CPU"
    assert status_data["inferenceLibrary"] == ""


def run_selftest(**env):
    import os

    return subprocess.run(
        [sys.executable, "llama_chat_adapter.py", "--selftest"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize("parallel", ["1", "2"])  # 2: the chat runs in the batched decoder
def test_selftest_passes_with_the_small_model(smollm2, parallel):
    done = run_selftest(
        CPAI_MODULE_LLAMA_MODEL_DIR=str(smollm2.parent),
        CPAI_MODULE_LLAMA_MODEL_FILENAME=smollm2.name,
        CPAI_MODULE_LLAMA_PARALLEL=parallel,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Self-test for LlamaChat passed" in done.stdout
    assert "tokens/s" in done.stdout


def test_selftest_fails_with_a_missing_model(tmp_path):
    done = run_selftest(CPAI_MODULE_LLAMA_MODEL_DIR=str(tmp_path))
    assert done.returncode == 1
    assert "Self-test failed: Unable to load a model" in done.stdout


def test_browser_line_breaks_are_normalised(adapter):
    from module_harness import request

    parsed = adapter.inputs.parse(
        request(
            "prompt",
            prompt="one\r\ntwo",
            system_prompt="a\r\nb",
            messages=json.dumps([{"role": "user", "content": "x\r\ny"}]),
        )
    )
    assert (parsed.prompt, parsed.system_prompt, parsed.history[0]["content"]) == ("one\ntwo", "a\nb", "x\ny")


def test_chats_on_the_fallback_model_say_so(tmp_path, smollm2, monkeypatch):
    (tmp_path / smollm2.name).symlink_to(smollm2)
    monkeypatch.setenv("CPAI_MODULE_LLAMA_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("CPAI_MODULE_LLAMA_MODEL_FILENAME", "mistral-7b-instruct-v0.2.Q4_K_M.gguf")
    monkeypatch.setenv("CPAI_MODULE_LLAMA_THREADS", "1")
    from llama_chat_adapter import LlamaChat_adapter

    fallback = LlamaChat_adapter()
    fallback.initialise()
    try:
        final = run_chat(fallback, prompt="Hi", max_tokens=4)
        assert final["model"] == smollm2.name
        assert final["model_fallback"] is True
        assert "mistral-7b-instruct-v0.2.Q4_K_M.gguf': no such file" in fallback.module_status()["fallbackReason"]
    finally:
        fallback.cleanup()


def test_a_pinned_thread_count_is_used_and_shown(adapter):
    # The fixture pins CPAI_MODULE_LLAMA_THREADS (module_harness: 1, or the count the run exports).
    final = run_chat(adapter, prompt="What is 2 + 2?", max_tokens=4, temperature=0)
    assert final["threads"] == module_threads()
    status_data = adapter.module_status()
    assert status_data["threads"] == module_threads()
    assert status_data["threadMode"] == "fixed"


def test_adaptive_threads_leave_a_busy_core_to_the_process_using_it(smollm2):
    from llamachat.thread_policy import usable_cpus

    if usable_cpus() < 2:
        pytest.skip("one CPU: there is no core to leave")
    monkeypatch = pytest.MonkeyPatch()
    adaptive = load_adapter(monkeypatch, smollm2, CPAI_MODULE_LLAMA_THREADS="0")
    monkeypatch.undo()
    # Another service's busy process, in a session of its own as it would be.
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        assert adaptive.module_status()["threadMode"] == "adaptive"
        assert adaptive.runner.threads.max_threads >= 1
        wait_until(
            lambda: adaptive.runner.threads._load.cores() >= 0.8, what="the load monitor to see the busy process"
        )
        final = run_chat(adaptive, prompt="Write a long story about a dragon.", max_tokens=24, temperature=0)
        assert final["success"]
        assert final["completion_tokens"] > 0
        assert 1 <= final["threads"] <= usable_cpus() - 1
        assert adaptive.module_status()["threads"] == final["threads"]
    finally:
        busy.kill()
        busy.wait()
        adaptive.cleanup()


def test_speculative_decoding_says_how_long_its_drafts_may_be(gemma3, capsys):
    monkeypatch = pytest.MonkeyPatch()
    drafting = load_adapter(monkeypatch, gemma3, CPAI_MODULE_LLAMA_DRAFT_TOKENS="16")
    monkeypatch.undo()
    try:
        # As long as this machine verifies drafts exactly (probed at load): Gemma 3's Q4_K weights limit it on some.
        longest = drafting.module_status()["draftTokens"]
        assert longest == drafting.runner.llama_chat.max_draft
        assert 0 <= longest <= 16
        assert f"Speculative decoding: drafts of up to {longest} tokens" in capsys.readouterr().out
        final = run_chat(drafting, prompt="Repeat: one two three four five six", max_tokens=16, temperature=0)
        assert final["success"]
        assert 0 <= final["accepted_tokens"] <= final["drafted_tokens"]
    finally:
        drafting.cleanup()
