"""benchmarks/pretokenize.py --quick runs end to end and writes every number the README table reads (slow: it
builds a bundle and a corpus, and starts pretokenize processes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_the_quick_benchmark_writes_its_result(tmp_path):
    out = tmp_path / "pretokenize.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "pretokenize.py"), "--quick", "--work",
                    str(tmp_path / "work"), "--out", str(out)], check=True, env=env, capture_output=True, timeout=1800)
    r = json.loads(out.read_text())
    for kind, unit in (("image", "images_per_s"), ("audio", "audio_seconds_per_s")):
        row = r["rates"][kind]
        assert row[f"raw_{unit}"] > 0
        for side in ("webdataset", "parquet"):
            assert row[f"{side}_{unit}"] > 0 and row[f"{side}_ratio"] > 0
            assert row[f"{side}_cpu_ratio"] > 0 and row[f"{side}_cpu_ratio_without_bundle_load"] > 0
            assert row[f"{side}_goal_met"] == (row[f"{side}_ratio"] >= r["settings"]["goal_ratio"])
            assert row[f"{side}_goal_met_cpu"] == (row[f"{side}_cpu_ratio"] >= r["settings"]["goal_ratio"])
    assert r["processes"]["speedup"] > 0 and r["processes"]["merge_seconds"] >= 0
    runs = r["memory"]["runs"]
    assert sorted(map(int, runs)) == [64, 640]  # the corpus and ten times it
    assert all(x["main_peak_rss_mb"] > 0 and x["worker_peak_rss_mb"] > 0 for x in runs.values())
