"""The soak benchmark (python -m bench.soak) end to end with a few chats: every chat ends, every bad input gets a
clear error, and both result files come out with the memory readings the README quotes."""

import json

from bench_runner import run_bench


def test_soak_runs_chats_with_cancels_and_bad_inputs_and_writes_its_results(smollm2, tmp_path):
    done = run_bench(
        "bench.soak",
        "--model",
        str(smollm2),
        "--chats",
        "4",
        "--warmup",
        "2",
        "--cancel-rate",
        "0.5",
        "--bad-rate",
        "1",
        "--max-tokens",
        "4",
        "--out",
        str(tmp_path),
    )
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["chats_ended"] == 4, done.stdout + done.stderr
    assert sum(result["endings"].values()) == 4, done.stdout + done.stderr
    assert result["failure_count"] == 0, result["failures"]
    assert result["bad_inputs_sent"] == 4
    assert result["module_restarts"] == 0
    assert [row["chats"] for row in result["rss_curve"]] == [2, 4]
    assert all(row["server_mb"] > 10 and row["module_mb"] > 50 for row in result["rss_curve"])
    assert set(result["rss_growth_pct"]) == {"server", "module"}
    # The exit code follows the checks (a 4-chat run's memory readings are too few to judge growth).
    assert done.returncode == (0 if result["passed"] else 1)
    assert "## Memory (RSS, MB)" in (tmp_path / "soak.md").read_text()
