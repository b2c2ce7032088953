"""The fit-time benchmark (python -m bench.fit_time) end to end with one run of each: every measurement is made and
both result files come out. The figures themselves come from the real run in bench/results/."""

import json

from bench_runner import bench_results


def test_fit_time_bench_measures_every_history_and_writes_json_and_markdown(smollm2, tmp_path):
    files = {"fit_time.json", "fit_time.md"}
    out = bench_results("bench.fit_time", tmp_path / "results", files, "--model", str(smollm2), "--repeats", "1")
    results = json.loads((out / "fit_time.json").read_text())
    for name in ("800_pairs", "200_natural_exchanges", "at_the_caps"):
        fitted = results["in_process"][name]
        assert fitted["dropped_turns"] > 0
        assert fitted["prompt_tokens"] + 4 <= results["context_size"]
        served = results["server"][name]["runs"][0]
        assert served["accepted"], served
        assert served["outcome"] == "prepared", served
        assert served["dropped_turns"] > 0
        assert served["prepare_ms"] >= 0
        cancelled = results["server"][f"{name}_cancelled"]["runs"][0]
        assert cancelled["cancel_confirmed"]
        assert cancelled["success"]
        assert cancelled["stop_reason"] == "cancelled"
    assert [t["measured_ms"] is not None for t in results["targets"]] == [True] * 5
    assert "| the 800-pair request answered (max) |" in (out / "fit_time.md").read_text()
