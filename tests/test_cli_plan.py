"""`ipu-t5 plan` (per-IPU placement and memory, no IPU and no weights) and `ipu-t5 backend`."""
import json

import pytest

from .conftest import run_cli

pytestmark = pytest.mark.core


def test_plan_json_for_xxl_on_four_replicas():
    result = run_cli(["plan", "--model", "xxl", "--replicas", "4", "--source-length", "128", "--json"])
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["total_ipus"], plan["ipus_per_replica"], plan["replicas"], plan["execution"]) == (64, 16, 4, "phased")
    # 32 samples per replica, batch-serialised under serial phases: each phase's weights stream in
    # once per step, far less than under gradient accumulation, which the plan shows beside it.
    assert plan["phasing"] == "serial" and plan["ipus_per_phase"] == 16
    assert plan["gradient_accumulation_steps"] == 1 and plan["micro_batch_size"] == 32
    assert plan["batch_serialization_factor"] * plan["batch_serial_slice_size"] == 32
    assert plan["other_schedule_streamed_bytes_per_ipu"] > plan["streamed_bytes_per_ipu"]
    assert all(phase["ipus"] == list(range(16)) for phase in plan["phases"])
    names = [phase["name"] for phase in plan["phases"]]
    for stack, sublayers in (("encoder", ("attention", "ff")), ("decoder", ("self_attention", "cross_attention", "ff"))):
        assert all(names.count("{}.{}.{}".format(stack, i, sub)) == 1 for i in range(24) for sub in sublayers)
    assert names[0] == "embedding" and names[-1] == "lm_head"
    assert all(0 < ipu["onchip_bytes"] <= plan["sram_bytes"] for ipu in plan["ipus"])
    assert plan["estimated_step_seconds"] > 0 and plan["samples_per_second"] > 0


def test_plan_table_for_xl_has_one_row_per_ipu():
    result = run_cli(["plan", "--model", "xl", "--stages", "8"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("IPU "))
    rows = lines[header + 1:header + 9]
    assert [int(r.split()[0]) for r in rows] == list(range(8))
    assert all(r.rstrip().endswith("yes") for r in rows)
    assert "8 IPUs per replica x 1 replica(s) = 8 IPUs" in result.stdout


def test_xxl_plans_on_one_pod16_and_says_what_a_step_should_cost():
    result = run_cli(["plan", "--model", "xxl"])
    assert result.returncode == 0, result.stderr
    assert "16 IPUs per replica x 1 replica(s) = 16 IPUs, phased execution" in result.stdout
    assert "Estimated step:" in result.stdout and "Calibrated on Graphcore's two published runs" in result.stdout
    # The default 8-token targets are MNLI's, not Graphcore's padded 512: the plan says so.
    assert "Not Graphcore's workload (8-token targets" in result.stdout
    same = run_cli(["plan", "--model", "xxl", "--target-length", "512"])
    assert "Same work as Graphcore's measured run" in same.stdout and "batch-serialised" in same.stdout


def test_plan_that_cannot_fit_exits_non_zero_with_the_table():
    result = run_cli(["plan", "--model", "xxl", "--stages", "1"])
    assert result.returncode == 2
    assert " NO" in result.stdout and "on chip MB" in result.stdout
    assert result.stderr.strip().count("\n") == 0 and "does not fit 1 IPU(s)" in result.stderr


def test_plan_refuses_ipu_counts_poptorch_would_refuse():
    result = run_cli(["plan", "--model", "large", "--stages", "6"])
    assert result.returncode == 2 and "powers of two" in result.stderr


def test_backend_command_says_what_run_sh_launches():
    result = run_cli(["backend", "--model", "tiny"])
    assert result.returncode == 0 and result.stdout.split() == ["single", "1"]
    result = run_cli(["backend", "--model", "xxl", "--replicas", "4", "--backend", "ipu"])
    assert result.stdout.split() == ["ipu", "1"]  # one process drives all 64 IPUs: never torchrun
