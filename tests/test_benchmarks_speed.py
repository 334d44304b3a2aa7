"""benchmarks/speed.py (smoke run on the tiny model: both loops timed, rows of other models kept) and
benchmarks/time_to_subject.py's reading of a score curve."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from processes import run

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark_module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow
def test_speed_benchmark_times_both_loops_and_keeps_other_models_rows(tmp_path):
    earlier = {
        "machine": {},
        "commands": {"random:unidiffuser-v1": "python benchmarks/speed.py --models random:unidiffuser-v1"},
        "rows": [
            {
                "model": "random:unidiffuser-v1",
                "configuration": "lora-bf16-ckpt-8bit-cached",
                **{"lora-db_cpu_s": 40.8, "bare_cpu_s": 40.0, "cpu_ratios": [1.02], "cpu_ratio": 1.02},
                **{"wall_ratio": 1.01, "lora_db_compile_s": None, "load_averages": [2.5, 2.6], "kept": True},
            }
        ],
    }
    (tmp_path / "smoke.json").write_text(json.dumps(earlier))
    script = BENCHMARKS / "speed.py"
    command = [sys.executable, str(script), "--models", "tiny", "--configs", "lora-fp32-cached", "--repeats", "2"]
    result = run([*command, "--out", str(tmp_path), "--name", "smoke"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "smoke.json").read_text())
    kept, row = results["rows"]
    assert kept["kept"] and set(results["commands"]) == {"random:unidiffuser-v1", "tiny"}
    assert row["model"] == "tiny" and len(row["repeats"]) == 2
    # Each repeat ran both sides in one process, the first side alternating; every timed step has both clocks.
    assert [pair["lora-db"]["first"] for pair in row["repeats"]] == [True, False]
    for pair in row["repeats"]:
        for side in ("lora-db", "bare"):
            timed = pair[side]["step_cpu_s"][pair[side]["warmup"] :]
            assert len(timed) == 4 and all(t > 0 for t in timed)
    ratios = [p["lora-db"]["median_cpu_s"] / p["bare"]["median_cpu_s"] for p in row["repeats"]]
    assert row["cpu_ratios"] == pytest.approx(ratios) and 0.2 < row["cpu_ratio"] < 5
    table = (tmp_path / "smoke.md").read_text()
    assert "| tiny | lora-fp32-cached |" in table and "random:unidiffuser-v1: `python" in table


def test_time_to_subject_finds_the_first_evaluation_past_the_bar():
    tts = _benchmark_module("time_to_subject")
    curve = [{"step": s, "train_s": s / 10, "judge": j, "pixel": 0.5} for s, j in ((50, 0.2), (100, 0.56), (150, 0.6))]
    flat = [{"step": s, "train_s": s / 5, "judge": 0.3, "pixel": 0.4} for s in (50, 100, 150)]
    runs = {
        subject: {"fast": {"curve": curve, "step_s": 0.1}, "flat": {"curve": flat, "step_s": 0.2}}
        for subject in ("heart", "arrow")
    }
    summary = tts.summarise(runs, ["fast", "flat"])
    assert summary["best_final"] == pytest.approx(0.6)
    fast, flat_row = summary["rows"]["fast"], summary["rows"]["flat"]
    assert (fast["own_steps"], fast["own_s"]) == (100, 10.0)  # 0.56 >= 90 % of 0.6 from step 100 on
    assert (fast["common_steps"], fast["common_reached"]) == (100, 2)
    assert flat_row["own_steps"] == 50 and flat_row["common_reached"] == 0 and flat_row["common_steps"] is None
    assert tts.first_reaching(curve, 0.7) is None


def test_time_to_subject_reads_a_curve_that_ends_below_zero():
    """A judge cosine can end negative (a subject the adapter never drew): 90 % of -0.2 is above -0.2, so the bar is
    10 % below the final instead, which the curve's own last point always reaches."""
    tts = _benchmark_module("time_to_subject")
    sinking = [
        {"step": s, "train_s": s / 10, "judge": j, "pixel": 0.5} for s, j in ((50, -0.3), (100, -0.21), (150, -0.2))
    ]
    summary = tts.summarise({"heart": {"sinking": {"curve": sinking, "step_s": 0.1}}}, ["sinking"])
    row = summary["rows"]["sinking"]
    assert (row["own_steps"], row["common_steps"]) == (100, 100)  # -0.21 is the first past -0.22
    assert tts.within_tenth(-0.2) == pytest.approx(-0.22) and tts.within_tenth(0.6) == pytest.approx(0.54)
