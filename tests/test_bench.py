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
    # Both precisions side by side, and the tiny preset's own default (float32) against the peer's.
    assert set(tiny) >= {"float32", "bfloat16", "default", "matrix_gflops"}
    assert tiny["default"]["ours_precision"] == "float32"
    assert tiny["default"]["train_speedup"] == tiny["float32"]["train_speedup"]
    assert set(tiny["matrix_gflops"]) == {"float32", "bfloat16"}
    for precision in ("float32", "bfloat16"):
        measured = tiny[precision]
        assert set(measured) >= {"ours", "peer", "train_speedup", "eval_speedup", "memory_ratio", "runs"}
        for side in ("ours", "peer"):
            assert {"train_tokens_per_second", "eval_samples_per_second", "peak_rss_mb", "accuracy"} <= set(measured[side])
            assert measured[side]["peak_rss_mb"] > 100
        # Both sides trained on exactly the same examples.
        assert measured["same_train_tokens"]
        assert measured["runs"]["ours"][0]["train_steps"] == measured["runs"]["peer"][0]["train_steps"] == 4
        assert measured["runs"]["ours"][0]["eval_samples"] == measured["runs"]["peer"][0]["eval_samples"] == 40
    # In float32 both validate the same weights with the same arithmetic: the same accuracy.
    assert tiny["float32"]["same_accuracy"]
    assert report["machine"]["cores"] >= 1 and report["machine"]["transformers"]
