"""bench/memory.py end to end in a smoke-sized run (the tiny shape; figures are printed, never checked
against a target)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

# The 2x1 layout runs on torch.distributed.pipelining, which the SDK's torch lacks.
pytestmark = pytest.mark.slow


def test_memory_quick_json_smoke(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory.py"), "--quick", "--layouts", "1x1", "2x1", "--eval-samples",
         "16", "--json", "--workdir", str(tmp_path / "work")],
        env=subprocess_env(IPU_T5_CACHE=str(tmp_path / "cache")), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    one, two = report["layouts"]
    assert (one["layout"], two["layout"]) == ("1x1", "2x1")
    assert len(one["rank_peaks_bytes"]) == 1 and len(two["rank_peaks_bytes"]) == 2
    assert two["launcher_bytes"] > 0 and two["sum_bytes"] >= max(two["rank_peaks_bytes"])
    for row in (one, two):
        assert row["largest_bytes"] > 100 * 10 ** 6 and row["source_length"] > 0 and row["target_length"] > 0
        assert len(row["plan"]["rank_peaks_bytes"]) == len(row["rank_peaks_bytes"])
        assert row["plan"]["largest_bytes"] > 0 and row["plan"]["sum_bytes"] >= row["plan"]["largest_bytes"]
