"""Smoke test of benchmarks/memory.py on the tiny model: the outputs' shape, not the timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from processes import run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
CONFIGS = ("full-fp32-adamw", "lora-fp16", "lora-bf16-ckpt-8bit-cached")


@pytest.mark.slow
def test_memory_benchmark_writes_table_chart_and_rows(tmp_path):
    command = [sys.executable, str(SCRIPT), "--models", "tiny", "--configs", ",".join(CONFIGS)]
    result = run([*command, "--out", str(tmp_path), "--name", "smoke", "--images", "2"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert {"cpu", "cpus", "memory_gib", "torch", "device"} <= set(results["machine"])
    rows = {row["configuration"]: row for row in results["rows"]}
    assert list(rows) == list(CONFIGS)
    for name in ("full-fp32-adamw", "lora-bf16-ckpt-8bit-cached"):
        row = rows[name]
        assert row["status"] == "measured", row["status"]
        assert row["trainable_parameters"] == row["estimate"]["trainable_parameters"] > 0
        assert row["adapter_bytes"] > 0 and row["step_time_s"] > 0
        assert row["peak_memory_bytes"] >= row["setup_memory_bytes"] > 0
        assert isinstance(row["estimate_error"], float)
        assert row["estimate_cuda"]["context_bytes"] > 0
    assert rows["lora-fp16"]["status"].startswith("skipped: needs a CUDA GPU")
    full, lora = (rows[name]["trainable_parameters"] for name in ("full-fp32-adamw", "lora-bf16-ckpt-8bit-cached"))
    assert full > 10 * lora

    table = (tmp_path / "smoke.md").read_text()
    assert "## tiny" in table and table.count("\n| lora-") == 2 and "peak memory" in table
    with Image.open(tmp_path / "smoke.png") as chart:
        assert chart.width >= 800 and chart.height >= 200

    # --reestimate redoes one row's estimate with today's estimator and keeps every measurement as it was.
    again = [*command[:-1], "lora-bf16-ckpt-8bit-cached", "--out", str(tmp_path), "--name", "smoke", "--reestimate"]
    result = run(again, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    redone = {row["configuration"]: row for row in json.loads((tmp_path / "smoke.json").read_text())["rows"]}
    assert list(redone) == list(CONFIGS) and redone["lora-bf16-ckpt-8bit-cached"]["reestimated"]
    assert "reestimated" not in redone["full-fp32-adamw"]
    before, after = rows["lora-bf16-ckpt-8bit-cached"], redone["lora-bf16-ckpt-8bit-cached"]
    assert after["peak_memory_bytes"] == before["peak_memory_bytes"]
    measured = after["measured_bytes"]
    assert after["estimate_error"] == (after["estimate"]["peak_bytes"] - measured) / measured


def test_rows_of_other_models_are_kept(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from memory import earlier_results
    finally:
        sys.path.remove(str(SCRIPT.parent))
    path = tmp_path / "cpu.json"
    rows = [{"model": "random:unidiffuser-v1", "configuration": "a"}, {"model": "tiny", "configuration": "b"}]
    commands = {"random:unidiffuser-v1": "python benchmarks/memory.py --models random:unidiffuser-v1", "tiny": "x"}
    path.write_text(json.dumps({"rows": rows, "commands": commands}))
    assert earlier_results(path, ["tiny"]) == (rows[:1], {"random:unidiffuser-v1": commands["random:unidiffuser-v1"]})
    assert earlier_results(tmp_path / "none.json", ["tiny"]) == ([], {})
