"""The fit-time benchmark (python -m bench.fit_time) end to end with one run of each: every measurement is made and
both result files come out. The figures themselves come from the real run in bench/results/."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_fit_time_bench_measures_every_history_and_writes_json_and_markdown(smollm2, tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench.fit_time", "--model", str(smollm2), "--out", str(out), "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in out.iterdir()} == {"fit_time.json", "fit_time.md"}
    results = json.loads((out / "fit_time.json").read_text())
    for name in ("800_pairs", "200_natural_exchanges", "at_the_caps"):
        fitted = results["in_process"][name]
        assert fitted["dropped_turns"] > 0 and fitted["prompt_tokens"] + 4 <= results["context_size"]
        served = results["server"][name]["runs"][0]
        assert served["accepted"] and served["outcome"] == "prepared", served
        assert served["dropped_turns"] > 0 and served["prepare_ms"] >= 0
        cancelled = results["server"][f"{name}_cancelled"]["runs"][0]
        assert cancelled["cancel_confirmed"] and cancelled["success"] and cancelled["stop_reason"] == "cancelled"
    assert [t["measured_ms"] is not None for t in results["targets"]] == [True] * 5
    assert "| the 800-pair request answered (max) |" in (out / "fit_time.md").read_text()
