"""bench/compare.py end to end in a smoke-sized run (figures are not checked: timings never are)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

pytestmark = [pytest.mark.core, pytest.mark.slow]


def test_compare_quick_json_smoke(tmp_path):
    env = subprocess_env(IPU_T5_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--json", "--repeats", "1", "--steps", "4",
         "--eval-samples", "40", "--prepare-steps", "4", "--threads", "1", "--workdir", str(tmp_path / "work")],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for key in ("train_speedup", "eval_speedup", "memory_ratio"):
        assert report[key] > 0
    tiny = report["models"]["tiny"]
    assert set(tiny) >= {"ours", "peer", "train_speedup", "eval_speedup", "memory_ratio", "runs"}
    for side in ("ours", "peer"):
        assert {"train_tokens_per_second", "eval_samples_per_second", "peak_rss_mb", "accuracy"} <= set(tiny[side])
        assert tiny[side]["peak_rss_mb"] > 100
    # Both sides trained on exactly the same examples and validated the same weights.
    assert tiny["same_train_tokens"] and tiny["same_accuracy"]
    assert tiny["runs"]["ours"][0]["train_steps"] == tiny["runs"]["peer"][0]["train_steps"] == 4
    assert tiny["runs"]["ours"][0]["eval_samples"] == tiny["runs"]["peer"][0]["eval_samples"] == 40
    assert report["machine"]["cores"] >= 1 and report["machine"]["transformers"]
