"""optimum-graphcore's ipu_config.json: read into settings (naming what does not apply) and written back."""
import json

import pytest

from ipu_t5.config import load_config
from ipu_t5.errors import UserError
from ipu_t5.backends.ipu.ipu_config import ipu_config_dict, read_ipu_config, write_ipu_config
from ipu_t5.backends.ipu.plan import plan_ipu
from ipu_t5.layout import plan_from_config

from tests.conftest import run_cli

pytestmark = pytest.mark.core
REFERENCE_FIELDS = {
    # optimum-graphcore 0.7.1's IPUConfig fields (shared/reference/optimum-graphcore-ipu-config.json).
    "auto_loss_scaling", "device_iterations", "embedding_serialization_factor", "enable_half_partials",
    "executable_cache_dir", "explicit_ir_inference", "gradient_accumulation_steps", "inference_device_iterations",
    "inference_embedding_serialization_factor", "inference_ipus_per_replica", "inference_layers_per_ipu",
    "inference_matmul_proportion", "inference_parallelize_kwargs", "inference_projection_serialization_factor",
    "inference_replication_factor", "inference_serialized_embedding_splits_per_ipu",
    "inference_serialized_projection_splits_per_ipu", "ipus_per_replica", "layers_per_ipu", "matmul_proportion",
    "optimizer_state_offchip", "output_mode", "parallelize_kwargs", "projection_serialization_factor",
    "recompute_checkpoint_every_layer", "replicated_tensor_sharding", "replication_factor", "seed",
    "serialized_embedding_splits_per_ipu", "serialized_projection_splits_per_ipu",
}


def write(tmp_path, data):
    path = tmp_path / "ipu_config.json"
    path.write_text(json.dumps(data))
    return path


def test_fields_that_apply_become_settings_and_the_rest_are_named(tmp_path):
    overrides, warnings = read_ipu_config(write(tmp_path, {
        "layers_per_ipu": [6, 6, 6, 6, 6, 6, 6, 6], "replication_factor": 2, "gradient_accumulation_steps": 16,
        "matmul_proportion": [0.1, 0.25], "optimizer_state_offchip": True, "replicated_tensor_sharding": True,
        "recompute_checkpoint_every_layer": True, "embedding_serialization_factor": 4, "device_iterations": 4,
        "output_mode": "final", "enable_half_first_order_momentum": True, "profile_dir": "x",
        "executable_cache_dir": "./exe_cache", "inference_replication_factor": 2}))
    config = load_config("xl", overrides=overrides)
    assert (config.layout.stages, config.layout.replicas, config.layout.gradient_accumulation_steps) == (8, 2, 16)
    assert config.layout.layers_per_stage == [6] * 8
    assert config.ipu.matmul_proportion == 0.1 and config.ipu.embedding_serialization_factor == 4
    assert config.ipu.executable_cache_dir == "./exe_cache"
    named = " | ".join(warnings)
    for field in ("'matmul_proportion'", "'device_iterations'", "'output_mode'", "'enable_half_first_order_momentum'",
                  "'profile_dir'"):
        assert field in named
    assert "inference_replication_factor" not in named  # the same as replication_factor: applies
    assert len(warnings) == 5


def test_defaults_and_auto_layers_change_nothing(tmp_path):
    overrides, warnings = read_ipu_config(write(tmp_path, {"layers_per_ipu": [-1], "device_iterations": 1,
                                                           "output_mode": "sum", "seed": None}))
    assert overrides == [] and warnings == []


def test_per_pod_replication_uses_its_default_with_a_warning(tmp_path):
    overrides, warnings = read_ipu_config(write(tmp_path, {"replication_factor": {"pod16": 4, "default": 1}}))
    assert overrides == ["layout.replicas=1"] and "replication_factor" in warnings[0]


def test_written_config_uses_optimum_field_names_and_reads_back(tmp_path):
    config = load_config("xl", **{"layout.replicas": 2})
    plan = plan_ipu(config, plan_from_config(config, 128, 4), 128, 4)
    data = ipu_config_dict(config, plan)
    assert set(data) <= REFERENCE_FIELDS
    assert sum(data["layers_per_ipu"]) == 48 and data["ipus_per_replica"] == 8 and data["replication_factor"] == 2
    path = write_ipu_config(tmp_path, config, plan)
    overrides, warnings = read_ipu_config(path)
    assert warnings == []
    again = load_config("xl", overrides=overrides)
    assert again.layout.layers_per_stage == data["layers_per_ipu"]
    assert again.layout.gradient_accumulation_steps == plan.layout.micro_batches
    replanned = plan_ipu(again, plan_from_config(again, 128, 4), 128, 4)
    assert replanned.layout.stage_blocks == plan.layout.stage_blocks
    assert replanned.embedding_serialization_factor == plan.embedding_serialization_factor


def test_a_phased_plan_with_fewer_micro_batches_than_ipus_reads_back_as_phased(tmp_path):
    """XXL at 128-token prompts: fewer micro-batches than its 16 IPUs (a pipeline needs one each).
    IPUConfig has no execution-strategy field, so the file reads back as phased from its numbers,
    and the plan read back is the same plan."""
    config = load_config("xxl", **{"ipu.execution_strategy": "auto"})
    plan = plan_ipu(config, plan_from_config(config, 128, 8), 128, 8)
    assert plan.execution == "phased" and plan.ipus_per_replica == 16 and plan.layout.micro_batches < 16
    overrides, warnings = read_ipu_config(write_ipu_config(tmp_path, config, plan))
    assert warnings == [] and "ipu.execution_strategy=phased" in overrides
    assert "layout.gradient_accumulation_steps={}".format(plan.layout.micro_batches) in overrides
    again = load_config("xxl", overrides=overrides)
    replanned = plan_ipu(again, plan_from_config(again, 128, 8), 128, 8)
    assert replanned.execution == "phased" and replanned.phasing == plan.phasing
    assert (replanned.layout.micro_batch_size, replanned.layout.micro_batches) == \
        (plan.layout.micro_batch_size, plan.layout.micro_batches)
    assert replanned.cost.step_seconds == pytest.approx(plan.cost.step_seconds)
    # A file a pipeline could run keeps the configured strategy.
    overrides, _ = read_ipu_config(write(tmp_path, {"ipus_per_replica": 4, "gradient_accumulation_steps": 7}))
    assert not any(o.startswith("ipu.execution_strategy") for o in overrides)


def test_a_missing_or_broken_file_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_ipu_config(tmp_path / "nope.json")
    (tmp_path / "ipu_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_ipu_config(tmp_path)


def test_cli_applies_an_ipu_config_and_warns_by_name(tmp_path):
    path = write(tmp_path, {"replication_factor": 2, "device_iterations": 8})
    result = run_cli(["plan", "--model", "xl", "--ipu-config", str(path), "--json"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["replicas"] == 2
    assert "warning: ipu_config field 'device_iterations' (8) does not apply" in result.stderr
