"""The module process under llamachat_server: the environment it really gets, its output in the server log,
restart after a crash, and a quick clean shutdown. Real server, real module, real SmolLM2."""

import os
import signal
import time
from urllib.parse import urlparse

import psutil
import pytest
import requests

from live_server import ROOT, poll, reported_status_data, running_server, server_log_path, server_status
from llama_chat_adapter import _gpu_library

STORY = "Write a very long story about a lighthouse keeper. Describe every day in detail."
LONG = "1900"  # tokens: a story still being written when the test stops the server, however fast the machine


def chat(base_url, prompt="Say hi.", max_tokens="8"):
    ack = requests.post(
        f"{base_url}/v1/text/chat", data={"prompt": prompt, "max_tokens": max_tokens}, timeout=40
    ).json()
    assert ack["success"] is True, ack
    return ack["commandId"]


def finished(base_url, command_id):
    def check():
        answer = requests.post(
            f"{base_url}/v1/LlamaChat/get_command_status", data={"commandId": command_id}, timeout=40
        ).json()
        return answer if answer.get("commandStatus") == "completed" else None

    return poll(check, 60, "the chat to complete")


@pytest.fixture(scope="module")
def base_url(smollm2):
    with running_server(smollm2, CPAI_MODULE_LLAMA_THREADS="2") as url:
        yield url


def test_module_gets_the_environment_the_real_server_builds(base_url, smollm2):
    env = psutil.Process(server_status(base_url)["pid"]).environ()
    assert env["CPAI_PORT"] == str(urlparse(base_url).port)
    assert env["CPAI_MODULE_ID"] == "LlamaChat"
    assert env["CPAI_MODULE_NAME"] == "LlamaChat"
    assert env["CPAI_MODULE_QUEUENAME"] == "llamachat_queue"
    assert env["CPAI_MODULE_SERVER_LAUNCHED"] == "true"
    assert env["CPAI_LOG_VERBOSITY"] == "Quiet"
    assert env["CPAI_MODULE_PARALLELISM"] == "1"
    assert env["CPAI_MODULE_ENABLE_GPU"] == "True"
    assert env["CPAI_MODULE_PATH"] == str(ROOT)
    assert env["CPAI_MODULE_LLAMA_MODEL_REPO"] == "TheBloke/Mistral-7B-Instruct-v0.2-GGUF"  # '@' stripped
    # --model and --env win over the module's settings.
    assert env["CPAI_MODULE_LLAMA_MODEL_DIR"] == str(smollm2.resolve().parent)
    assert env["CPAI_MODULE_LLAMA_MODEL_FILENAME"] == smollm2.name
    assert env["CPAI_MODULE_LLAMA_CONTEXT_SIZE"] == "2048"
    assert env["CPAI_MODULE_LLAMA_THREADS"] == "2"


def log_entries(base_url):
    return requests.get(f"{base_url}/v1/log/list", params={"count": 10000}, timeout=10).json()["entries"]


def test_module_output_and_status_reach_the_server(base_url, smollm2):
    module_lines = [e for e in log_entries(base_url) if e["category"] == "LlamaChat"]
    # The module prints "info: Using model ...": the level is read from the prefix, which leaves the text.
    (using,) = [e for e in module_lines if "Using model" in e["entry"]]
    assert using["entry"].startswith("Using model '")
    assert smollm2.name in using["entry"]
    assert using["level"] == "information"
    # The SDK posts its status every 2 s; LlamaChat adds its model to it, and the device this llama.cpp build uses.
    status_data = reported_status_data(base_url)
    library = _gpu_library()  # "" for a llama.cpp built for the CPU only
    assert status_data["model"] == smollm2.name
    assert (status_data["inferenceDevice"], status_data["inferenceLibrary"]) == (
        ("GPU", library) if library else ("CPU", "")
    )

    running = requests.get(f"{base_url}/v1/module/list/running", timeout=10).json()["modules"]
    assert [m["moduleId"] for m in running] == ["LlamaChat"]
    assert running[0]["launchSettings"]["queue"] == "llamachat_queue"
    assert running[0]["publishingInfo"]["category"] == "Generative AI"
    assert set(running[0]["uiElements"]["explorerUI"]) == {"html", "css", "script"}


def test_module_error_lines_are_logged_as_errors(smollm2):
    # A setting the module refuses: it prints "error: ..." and starts without loading a model (so at once).
    with running_server(smollm2, CPAI_MODULE_LLAMA_CHAT_FORMAT="no-such-format") as url:
        (error,) = poll(
            lambda: [e for e in log_entries(url) if "LlamaChat has no model" in e["entry"]],
            10,
            "the module's error line",
        )
    assert error["level"] == "error"
    assert error["category"] == "LlamaChat"
    assert error["entry"].startswith(
        "LlamaChat has no model, every chat will fail until this is fixed: CPAI_MODULE_LLAMA_CHAT_FORMAT must be one of"
    )


def test_killed_module_is_reported_crashed_then_restarted_and_chats_again(base_url):
    before = server_status(base_url)
    os.kill(before["pid"], signal.SIGKILL)

    poll(lambda: server_status(base_url)["status"] == "Crashed", 10, "the status Crashed", interval=0.02)
    after = poll(lambda: (s := server_status(base_url))["status"] == "Started" and s, 60, "the restart")
    assert after["pid"] != before["pid"]
    assert after["restarts"] == before["restarts"] + 1
    assert any("crashed" in e["entry"] and e["level"] == "error" for e in log_entries(base_url))

    final = finished(base_url, chat(base_url))
    assert final["success"] is True
    assert final["reply"].strip()


def test_ctrl_c_stops_server_and_module_quickly_even_mid_chat(smollm2):
    with running_server(smollm2) as base_url:
        module = psutil.Process(server_status(base_url)["pid"])
        server = module.parent()
        log_path = server_log_path(base_url)
        command_id = chat(base_url, prompt=STORY, max_tokens=LONG)
        poll(
            lambda: requests.post(
                f"{base_url}/v1/LlamaChat/get_command_status", data={"commandId": command_id}, timeout=40
            ).json()["reply"],
            60,
            "the reply to begin",
        )

        started = time.monotonic()
        server.send_signal(signal.SIGINT)
        gone, alive = psutil.wait_procs([server, module], timeout=15)
        elapsed = time.monotonic() - started
        assert not alive, f"still running after 15 s: {alive}"
        assert elapsed < 8, f"shutdown took {elapsed:.1f} s"
        assert {p.pid: p.returncode for p in gone}[server.pid] == 0
        assert "Module LlamaChat stopped" in log_path.read_text()
