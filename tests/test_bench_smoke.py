"""The benchmark (python -m bench) end to end with tiny settings: every engine runs on the same prompts and the
three result files come out, with the numbers the README and the targets are built from."""

import json

from bench_runner import bench_results, run_bench

TINY = [
    "--repeats",
    "1",
    "--generation-tokens",
    "8",
    "--conversation-repeats",
    "1",
    "--conversation-turns",
    "2",
    "--conversation-tokens",
    "4",
    "--cancel-repeats",
    "1",
    "--long-prompt-tokens",
    "300",
    "--memory-chats",
    "2",
    "--memory-chat-tokens",
    "2",
    "--poll-ms",
    "20",
]


def test_bench_measures_every_engine_and_writes_json_markdown_and_chart(smollm2, tmp_path):
    files = {"results.json", "results.md", "chart.png"}
    out = bench_results("bench", tmp_path / "results", files, "--model", str(smollm2), *TINY)
    assert (out / "chart.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((out / "results.json").read_text())

    # Greedy decoding of the same prompt: the same reply through every layer, or the comparison would be unfair.
    replies = {key: results[key]["generation"]["reply"] for key in ("raw", "wrapper", "module", "openai_stream")}
    assert replies["raw"].strip(), replies
    assert len(set(replies.values())) == 1, replies
    for key in ("raw", "wrapper", "module"):
        generation = results[key]["generation"]["summary"]
        assert generation["tokens"]["median"] == 8
        assert generation["ttft_ms"]["median"] > 0
        assert generation["tokens_per_second"]["median"] > 0
        assert len(results[key]["conversation"]["turns"]) == 2
    # The OpenAI stream of the same server, in generation only, with the module's own figures for the same chats.
    stream = results["openai_stream"]["generation"]["summary"]
    assert stream["tokens"]["median"] == 8
    assert stream["chunks"]["median"] >= 1
    assert stream["ttft_ms"]["median"] > stream["module_ttft_ms"]["median"] > 0
    assert "conversation" not in results["openai_stream"]
    module = results["module"]
    turn2 = module["conversation"]["turns"][1]
    assert turn2["warm"]["cached_tokens"]["median"] > turn2["cold"]["cached_tokens"]["median"]
    assert module["cancel_generation"]["all_cancelled"]
    assert module["cancel_prompt"]["all_cancelled"]
    assert module["long_prompt_tokens"] >= 300
    assert module["memory"]["rss_after_load_mb"] > 50
    assert len(module["memory"]["curve"]) == 3
    assert len(results["raw"]["memory"]["curve"]) == len(results["raw"]["memory_gc_each_chat"]["curve"]) == 3
    assert results["llama_server"] == {"skipped": "no --llama-server PATH given"}
    assert [t["limit"] is not None for t in results["targets"]] == [True] * 8
    report = (out / "results.md").read_text()
    assert "| module tokens/s >= 0.97 x raw |" in report
    assert "| OpenAI stream via server (client) |" in report
    stream_targets = [t for t in results["targets"] if t["target"].startswith("OpenAI stream")]
    assert len(stream_targets) == 2
    assert all(t["measured"] is not None for t in stream_targets)


def test_bench_refuses_a_missing_model_with_what_to_do(tmp_path):
    done = run_bench("bench", "--model", str(tmp_path / "none.gguf"), timeout=60)
    assert done.returncode == 2
    assert "no model at" in done.stderr
    assert "install.sh --small" in done.stderr


def test_threads_bench_measures_every_thread_choice_and_writes_its_files(smollm2, tmp_path):
    files = {"threads.json", "threads.md", "threads.png"}
    out = bench_results(
        "bench.threads",
        tmp_path / "results",
        files,
        "--model",
        str(smollm2),
        "--repeats",
        "1",
        "--tokens",
        "8",
        "--poll-ms",
        "20",
        "--page-poll-ms",
        "30",
        "--loads",
        "idle",
        "--time-box",
        "2",
        "--pause",
        "0",
    )
    assert (out / "threads.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((out / "threads.json").read_text())
    cores = results["settings"]["all_cores"]
    expected_threads = {
        "raw_all": cores,
        "raw_one": 1,
        "module_all": cores,
        "module_one": 1,
        "module_all_passive": cores,
    }
    for key, threads in expected_threads.items():
        summary = results["idle"][key]["summary"]
        assert summary["threads"]["median"] == threads, key  # a pinned count is what the module computed with
        # All cores collapse when other work takes a core (the tests share the machine): a reply may be cut off.
        assert summary["tokens"]["median"] <= 8
    for key in ("module_adaptive", "module_adaptive_page"):  # one adaptive module, polled at two paces
        assert 1 <= results["idle"][key]["summary"]["threads"]["median"] <= cores
        seen = results["idle"][key]["runs"][0]["threads_seen"]
        assert all(1 <= int(threads) <= cores for threads in seen), seen
    assert [g["goal"].split(":")[0] for g in results["goals"]] == [
        "one core busy",
        "idle",
        "idle, polled every 20 ms",
        "idle, polled every 30 ms",
        "beside a 2nd llama.cpp process",
    ]
    report = (out / "threads.md").read_text()
    assert "| module, adaptive (the default) |" in report
    assert "| module, adaptive, polled at the Explorer page's pace |" in report


def test_openai_stream_bench_times_the_cadence_with_and_without_the_channel_and_writes_its_files(smollm2, tmp_path):
    files = {"openai_stream.json", "openai_stream.md"}
    args = ("--model", str(smollm2), "--threads", "1", "--repeats", "2", "--tokens", "8", "--streams", "2")
    out = bench_results("bench.openai_stream", tmp_path / "results", files, *args)
    results = json.loads((out / "openai_stream.json").read_text())
    assert results["commit"]
    single = results["single"]
    assert [len(single[name]) for name in ("raw", "polled", "channel", "channel_plain", "module_quiet")] == [2] * 5
    assert all(run["tokens"] == 8 and run["module_tokens_per_second"] > 0 for run in single["module_quiet"])
    for run in single["polled"] + single["channel"]:
        # The client's count is the module's, and the module's own TTFT is read for the same chat.
        assert run["tokens"] == 8
        assert 1 <= run["chunks"] <= 8 and run["tokens_per_chunk"] == round(8 / run["chunks"], 2)
        assert run["module_ttft_ms"] > 0
        assert abs(run["ttft_gap_ms"] - (run["ttft_ms"] - run["module_ttft_ms"])) < 0.11  # both rounded to 0.1 ms
        assert run["chunks"] == 1 or 0 <= run["gap_median_ms"] <= run["gap_p95_ms"]
    for run in single["channel_plain"]:  # read with json alone: the tokens from the usage chunk
        assert run["tokens"] == 8 and 1 <= run["chunks"] <= 8 and run["tokens_per_chunk"] == round(8 / run["chunks"], 2)
    for run in results["parallel"]["polled"] + results["parallel"]["channel"]:
        assert [stream["tokens"] for stream in run["streams"]] == [8, 8]
        assert run["aggregate_tokens_per_second"] > 0
    assert {goal["detail"] for goal in results["goals"]} == {
        "ours after: reply channel",
        "ours after: reply channel, read with json alone",
        "ours before: polled (--poll-replies)",
        "2 streams at once, reply channel",
    }
    assert all(isinstance(goal["met"], bool) for goal in results["goals"])
    report = (out / "openai_stream.md").read_text()
    rows = ("| ours before: polled (--poll-replies) |", "| ours after: reply channel |", "| raw llama-cpp-python |")
    assert "| ours after: reply channel, read with json alone |" in report
    assert all(row in report for row in rows)
    assert "## 2 streams at once (CPAI_MODULE_LLAMA_PARALLEL=2)" in report
    assert f"commit {results['commit']}" in report


def test_concurrency_bench_compares_the_queue_with_the_batched_engine_and_writes_its_files(smollm2, tmp_path):
    files = {"concurrency.json", "concurrency.md", "concurrency.png"}
    args = ("--model", str(smollm2), "--repeats", "1", "--tokens", "6", "--clients", "1", "2", "--pause", "0")
    out = bench_results("bench.concurrency", tmp_path / "results", files, *args, "--module", "--poll-ms", "20")
    assert (out / "concurrency.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((out / "concurrency.json").read_text())
    # No --llama-server: its row is left out.
    assert set(results["summary"]) == {"sequential", "batched", "module_queue", "module_parallel"}
    for engine, by_clients in results["summary"].items():
        for clients in ("1", "2"):
            assert by_clients[clients]["aggregate_tokens_per_second"]["median"] > 0, (engine, clients)
            assert by_clients[clients]["ttft_ms_p50"] > 0
            assert by_clients[clients]["tokens"]["n"] == int(clients)
    assert results["same_replies"]["of"] == 3
    assert "module_parallel" in results["same_replies"]
    goals = {g["goal"]: g for g in results["goals"]}
    assert goals["2 clients: batched aggregate >= 1.5 x sequential"]["measured"] > 0
    assert goals["2 clients: module_parallel aggregate >= 1.5 x module_queue"]["measured"] > 0
    assert goals["2 clients: batched aggregate >= 0.9 x llama_server"]["met"] is None
    report = (out / "concurrency.md").read_text()
    assert "| batched engine (batch_decoder.py) | 2 |" in report
    assert "pass `--llama-server PATH`" in report


def test_conversations_bench_measures_returning_users_and_writes_its_files(smollm2, tmp_path):
    files = {"conversations.json", "conversations.md", "conversations.png"}
    # Three turns: a restore must save at least a block (32 tokens) more than the live context's shared system prompt.
    args = ("--model", str(smollm2), "--threads", "1", "--users", "2", "--turns", "3", "--tokens", "8")
    args += ("--single-repeats", "1", "--disk-conversations", "12", "--disk-mb", "4", "--kv-tokens", "200")
    done = run_bench("bench.conversations", "--out", str(tmp_path / "results"), *args, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "results"
    assert {p.name for p in out.iterdir()} == files
    results = json.loads((out / "conversations.json").read_text())
    last = [r for r in results["alternation"]["2"]["rows"] if r["turn"] == 3]
    assert [r["cached"]["prefix_source"] for r in last] == ["ram", "ram"]
    assert all(r["cold"]["ttft_ms"] > 0 and r["today"]["ttft_ms"] > 0 for r in last)
    assert {r["cached"]["prefix_source"] for r in results["restart"]} == {"disk"}
    assert results["in_process"]["kv_bytes_per_token"] > 0
    assert results["in_process"]["restore_disk_mb_per_s"] > 0
    disk = results["disk_bound"]
    assert disk["largest_folder_bytes"] <= disk["limit_bytes"]
    assert disk["evicted"] > 0
    goals = {g["goal"]: g for g in results["goals"]}
    assert goals["2 users, turn 3: returning user's TTFT <= 0.1 x cold"]["measured"] > 0
    assert "| 2 | 3 |" in (out / "conversations.md").read_text()
