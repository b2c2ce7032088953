"""ChatJob's status and result without a model: what a poll sees while a reply grows, how a chat ends, and the live
metrics. Token times come from a ManualClock, since the real clock cannot be made to tick at chosen moments; the
adapter tests (tests/test_adapter.py) check the same metrics on real replies."""

from __future__ import annotations

import json

import pytest

from live_server import ROOT
from llamachat import chat_job
from llamachat.chat_job import ChatJob, StopReason
from llamachat.chat_queue import ChatState
from module_harness import METRICS

OUTPUTS = {
    output["Name"]: output
    for output in json.loads((ROOT / "modulesettings.json").read_text())["Modules"]["LlamaChat"]["RouteMaps"][0][
        "Outputs"
    ]
}


class ManualClock:
    """Stands in for chat_job's `time` module: perf_counter is whatever the test set last."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> ManualClock:
    manual = ManualClock()
    monkeypatch.setattr(chat_job, "time", manual)
    return manual


def streamed_job(clock: ManualClock) -> ChatJob:
    """A chat started at 100 s, in the model from 101 s, whose pieces arrive with the token counts so far."""
    job = ChatJob("cmd-1", "SmolLM2.gguf")
    clock.now = 101.0
    job.begin_inference(prompt_tokens=30, cached_tokens=12, dropped_turns=2)
    for at, text, tokens in [(101.5, "", 0), (102.0, "Hel", 1), (102.5, "lo", 3), (103.0, " world", 5)]:
        clock.now = at
        job.add_text(text, tokens)
    return job


def test_a_poll_before_the_first_token_shows_an_empty_reply_and_no_speed(clock):
    job = ChatJob("cmd-1", "SmolLM2.gguf", model_fallback=True)
    clock.now = 100.25
    status = job.status()
    assert set(status) == {"success", "reply", *METRICS}
    assert status["success"] is True
    assert status["reply"] == ""
    assert not job.done
    assert status["model"] == "SmolLM2.gguf"
    assert status["model_fallback"] is True
    assert status["time_to_first_token_ms"] is None
    assert status["tokens_per_second"] == 0.0
    assert status["elapsed_ms"] == 250
    assert status["completion_tokens"] == 0
    assert status["threads"] is None


def test_the_reply_grows_with_its_token_counts_and_speed_counts_from_the_first_token(clock):
    job = streamed_job(clock)
    status = job.status()
    assert status["reply"] == "Hello world"
    assert (status["prompt_tokens"], status["cached_tokens"], status["dropped_turns"]) == (30, 12, 2)
    assert status["completion_tokens"] == 5
    assert status["time_to_first_token_ms"] == 2000  # from the start of the command, preparation included
    assert status["tokens_per_second"] == 4.0  # 4 tokens after the first, in the 1 s since it


def test_a_piece_without_new_tokens_adds_text_but_does_not_slow_the_speed(clock):
    job = streamed_job(clock)
    clock.now = 110.0  # a held-back piece of a multi-byte character, flushed long after its token
    job.add_text("!", 5)
    assert job.status()["reply"] == "Hello world!"
    assert job.status()["tokens_per_second"] == 4.0


def test_token_counts_never_go_back(clock):
    job = streamed_job(clock)
    job.count_tokens(3)
    job.add_text("", 4)
    assert job.status()["completion_tokens"] == 5


def test_one_token_gives_a_time_to_first_token_but_no_speed_yet(clock):
    job = ChatJob("cmd-1", "m.gguf")
    clock.now = 100.125
    job.add_text("Hi", 1)
    assert job.status()["time_to_first_token_ms"] == 125
    assert job.status()["tokens_per_second"] == 0.0


def test_a_completed_chat_s_result_has_every_field_and_its_times_stop(clock):
    job = streamed_job(clock)
    clock.now = 105.0
    result = job.finish(StopReason.COMPLETED)
    assert job.done
    assert "error" not in result
    assert set(result) == {"success", "reply", "stop_reason", "processMs", "inferenceMs", *METRICS}
    assert result["success"] is True
    assert result["reply"] == "Hello world"
    assert result["stop_reason"] == "completed"
    assert (result["processMs"], result["inferenceMs"], result["elapsed_ms"]) == (5000, 4000, 5000)
    clock.now = 200.0  # polled later: the finished chat's figures stay as they were
    assert job.result() == result
    assert job.status()["elapsed_ms"] == 5000


def test_every_field_a_client_sees_is_documented_in_modulesettings():
    # commandId, commandStatus and a queued chat's place are added by chat_answers.py; error and its code and param
    # only on failure, logprobs only when asked for.
    result_fields = {"success", "error", "error_code", "error_param", "logprobs", "reply", "stop_reason"}
    result_fields |= {"processMs", "inferenceMs", *METRICS}
    answer_fields = {"commandId", "commandStatus", "queue_position", "estimated_wait_s", "queue_full"}
    assert set(OUTPUTS) - answer_fields == result_fields
    for state in ChatState:
        assert state.value in OUTPUTS["commandStatus"]["Description"]
    for reason in StopReason:
        assert reason.value in OUTPUTS["stop_reason"]["Description"]


def test_a_cancelled_chat_keeps_the_reply_so_far(clock):
    job = streamed_job(clock)
    clock.now = 103.5
    result = job.finish("cancelled")
    assert result["success"] is True
    assert result["stop_reason"] == "cancelled"
    assert "error" not in result
    assert result["reply"] == "Hello world"
    assert result["completion_tokens"] == 5


def test_a_chat_that_fails_says_why_and_keeps_the_reply_so_far(clock):
    job = streamed_job(clock)
    result = job.finish("error", "llama_decode returned -3")
    assert result["success"] is False
    assert result["stop_reason"] == "error"
    assert result["error"] == "llama_decode returned -3"
    assert result["reply"] == "Hello world"
    assert result["error_code"] is None
    assert result["error_param"] is None
    coded = ChatJob("cmd-2", "m.gguf").finish(
        StopReason.ERROR, "too long", code="context_length_exceeded", param="messages"
    )
    assert (coded["error_code"], coded["error_param"]) == ("context_length_exceeded", "messages")


def test_logprobs_show_only_when_asked_for(clock):
    job = streamed_job(clock)
    assert "logprobs" not in job.status()
    assert "logprobs" not in job.finish(StopReason.COMPLETED)
    asked = ChatJob("cmd-2", "m.gguf")
    asked.logprobs = [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]
    assert asked.status()["logprobs"] == asked.logprobs
    assert asked.finish(StopReason.COMPLETED)["logprobs"] == asked.logprobs


def test_a_chat_that_fails_before_the_model_ran_has_no_inference_time(clock):
    job = ChatJob("cmd-1", "m.gguf")
    clock.now = 100.5
    result = job.finish("error", "prompt is too long")
    assert result["inferenceMs"] == 0
    assert result["processMs"] == 500
    assert result["prompt_tokens"] == 0
    assert result["time_to_first_token_ms"] is None


def test_the_thread_count_shows_in_status_and_result(clock):
    job = streamed_job(clock)
    job.threads = 2
    assert job.status()["threads"] == 2
    job.threads = 1  # the adaptive mode took a thread back mid-reply
    assert job.finish("completed")["threads"] == 1
