"""llama.cpp's log reaches the server's log at its real level, and a cancel's routine messages are no errors."""

import pytest
import requests

from live_server import poll, running_server, server_log_path
from llamachat.llama_log import LLAMA_LOG, LlamaLog

# ggml_log_level values of the bundled llama.cpp
DEBUG, INFO, WARN, ERROR, CONT = 1, 2, 3, 4, 5


def lines(text):
    return [line for line in text.splitlines() if "llama.cpp:" in line]


def test_lines_carry_their_level_and_quiet_levels_stay_out(capsys):
    log = LlamaLog()
    log._receive(DEBUG, b"set_abort_callback: call\n", None)
    log._receive(INFO, b"llama_context: n_ctx = 512\n", None)
    log._receive(WARN, b"n_ctx_seq (512) < n_ctx_train\n", None)
    log._receive(ERROR, b"llama_decode: failed to decode, ", None)  # a line written in pieces
    log._receive(CONT, b"ret = -1\n", None)
    assert lines(capsys.readouterr().out) == [
        "warning: llama.cpp: n_ctx_seq (512) < n_ctx_train",
        "error: llama.cpp: llama_decode: failed to decode, ret = -1",
    ]
    log.loud = True
    log._receive(INFO, b"llama_context: n_ctx = 512\n", None)
    assert lines(capsys.readouterr().out) == ["info: llama.cpp: llama_context: n_ctx = 512"]


@pytest.fixture(scope="module")
def smol(smollm2):
    from llama_chat import LlamaChat

    chat = LlamaChat.from_file(smollm2, n_ctx=1024, n_threads=1)
    yield chat
    chat.close()


@pytest.mark.parametrize("loud", [False, True])
def test_a_cancelled_computation_logs_no_warning_or_error(smol, capsys, loud):
    LLAMA_LOG.install(loud=loud)
    try:
        with pytest.raises(RuntimeError, match="llama_decode"):
            list(smol.do_chat("Tell me a story. " * 20, max_tokens=8, stream=True, should_abort=lambda: True))
        logged = lines(capsys.readouterr().out)
    finally:
        LLAMA_LOG.install(loud=False)
    assert not [line for line in logged if line.startswith(("warning:", "error:"))], logged
    # llama.cpp did report stopping the computation: as debug, shown only in a loud log.
    removing = [line for line in logged if "removing memory module entries" in line]
    assert removing == (
        ["debug: llama.cpp: decode: removing memory module entries for seq_id = 0, pos = [0, +inf)"] if loud else []
    )


def test_server_log_has_no_llama_cpp_errors_after_chats_and_a_cancel(smollm2):
    long_prompt = "Summarise this text. " + " ".join(
        f"Paragraph {i}: the committee met on a rainy Tuesday to discuss the library's budget." for i in range(60)
    )
    with running_server(smollm2) as base_url:

        def status(command_id):
            return requests.post(
                f"{base_url}/v1/LlamaChat/get_command_status", data={"commandId": command_id}, timeout=10
            ).json()

        for fields in ({"prompt": "Hi", "max_tokens": "4"}, {"prompt": long_prompt, "max_tokens": "400"}):
            command_id = requests.post(f"{base_url}/v1/text/chat", data=fields, timeout=10).json()["commandId"]
            if fields["max_tokens"] == "400":  # cancelled once it started, during the prompt on a CPU this slow
                poll(lambda: status(command_id).get("prompt_tokens"), 60, "the chat to start")  # noqa: B023
                requests.post(f"{base_url}/v1/LlamaChat/cancel_command", data={"commandId": command_id}, timeout=10)
            final = poll(lambda: (s := status(command_id))["commandStatus"] == "completed" and s, 120, "the end")  # noqa: B023
            assert final["success"], final
        log = server_log_path(base_url).read_text()
    assert final["stop_reason"] == "cancelled"
    assert not [line for line in log.splitlines() if line.split()[1:2] in (["error"], ["warning"])], log
