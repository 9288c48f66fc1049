"""optimum-graphcore's `ipu_config.json`, read into ipu-t5 settings and written from an IPU plan.

IPU users arrive with an `IPUConfig` (optimum-graphcore 0.7's field names and defaults); the
fields that mean the same here become config overrides, and every field that cannot apply is
named in a warning rather than dropped. IPUConfig names no execution strategy: a file with fewer
micro-batches than a pipeline over its IPUs needs (what ipu-t5 writes for phased plans) reads as
`ipu.execution_strategy=phased`. optimum-graphcore itself is not imported: it pins
transformers 4.29 and imports poptorch at import time.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

from ...errors import UserError

# Fields that carry over one to one: IPUConfig name -> config key.
DIRECT = {
    "ipus_per_replica": "layout.stages",
    "replication_factor": "layout.replicas",
    "gradient_accumulation_steps": "layout.gradient_accumulation_steps",
    "inference_device_iterations": "ipu.inference_device_iterations",
    "embedding_serialization_factor": "ipu.embedding_serialization_factor",
    "recompute_checkpoint_every_layer": "ipu.recompute_checkpoint_every_layer",
    "optimizer_state_offchip": "ipu.optimizer_state_offchip",
    "replicated_tensor_sharding": "ipu.replicated_tensor_sharding",
    "enable_half_partials": "ipu.enable_half_partials",
    "auto_loss_scaling": "ipu.auto_loss_scaling",
    "executable_cache_dir": "ipu.executable_cache_dir",
    "seed": "training.seed",
}

# Fields ipu-t5 cannot honour, with why; named in a warning when they differ from the default.
NOT_APPLICABLE = {
    "device_iterations": (1, "training runs one device iteration per optimizer step, because the trainer "
                             "sets the learning rate and logs the loss every step"),
    "output_mode": ("sum", "ipu-t5 reads the loss summed over every micro-batch and replica (OutputMode.Sum), "
                           "so the logged loss is the whole global batch's"),
    "inference_replication_factor": (None, "generation runs on the training replicas"),
    "inference_layers_per_ipu": (None, "generation uses the training layout"),
    "inference_ipus_per_replica": (None, "generation uses the training layout"),
    "inference_matmul_proportion": (None, "generation uses matmul_proportion"),
    "inference_embedding_serialization_factor": (None, "generation uses embedding_serialization_factor"),
    "inference_projection_serialization_factor": (None, "generation uses embedding_serialization_factor"),
    "inference_serialized_embedding_splits_per_ipu": (None, "the vocabulary slices stay with their block's IPU"),
    "inference_serialized_projection_splits_per_ipu": (None, "the vocabulary slices stay with their block's IPU"),
    "serialized_embedding_splits_per_ipu": (None, "the vocabulary slices stay with their block's IPU"),
    "serialized_projection_splits_per_ipu": (None, "the vocabulary slices stay with their block's IPU"),
    "projection_serialization_factor": (None, "the LM head is sliced with the embedding "
                                              "(embedding_serialization_factor)"),
    "parallelize_kwargs": (None, "placement follows the layout plan"),
    "inference_parallelize_kwargs": (None, "placement follows the layout plan"),
    "explicit_ir_inference": (False, "ipu-t5 does not use PopART's explicit IR"),
    "enable_half_first_order_momentum": (False, "AdamW's moments stay float32 (they live in Streaming Memory)"),
    "execute_encoder_on_cpu_for_generation": (False, "generation runs the encoder on the IPUs"),
    "sharded_execution_for_inference": (None, "generation uses the training execution strategy"),
}


def _text(value: Any) -> str:
    """A value as `--set` text that config.py reads back as the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _replication(value: Any, warnings: List[str]) -> Any:
    # optimum-graphcore allows {"pod16": 4, "pod64": 16, "default": 1}; the pod is not known here.
    if isinstance(value, Mapping):
        chosen = value.get("default", 1)
        warnings.append("ipu_config field 'replication_factor' is given per pod type {}: using its default {}; "
                        "set --replicas for the pod you run on".format(dict(value), chosen))
        return chosen
    return value


def overrides_from_ipu_config(data: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
    """`section.key=value` overrides for the fields that apply, and one warning per field that does not."""
    overrides: List[str] = []
    warnings: List[str] = []
    fields = dict(data)
    layers = fields.pop("layers_per_ipu", None)
    if layers is not None and layers != [-1]:
        if any(n < 0 for n in layers):
            warnings.append("ipu_config field 'layers_per_ipu' {} leaves counts to be inferred (-1): ipu-t5 "
                            "balances the blocks itself; give every count to fix them".format(layers))
        else:
            overrides.append("layout.layers_per_stage=" + _text(layers))
            if fields.get("ipus_per_replica") is None:
                fields["ipus_per_replica"] = len(layers)
    proportion = fields.pop("matmul_proportion", None)
    if isinstance(proportion, list):
        warnings.append("ipu_config field 'matmul_proportion' {} is per IPU: ipu-t5 uses one proportion on every "
                        "IPU, the smallest, {}".format(proportion, min(proportion)))
        proportion = min(proportion)
    if proportion is not None:
        overrides.append("ipu.matmul_proportion=" + _text(proportion))
    for name, value in fields.items():
        if name == "replication_factor":
            value = _replication(value, warnings)
        if name in DIRECT:
            if value is not None and not (name == "embedding_serialization_factor" and value == 0):
                overrides.append("{}={}".format(DIRECT[name], _text(value)))
        elif name in NOT_APPLICABLE:
            default, why = NOT_APPLICABLE[name]
            if value not in (default, None) and not (name == "inference_replication_factor"
                                                     and value == fields.get("replication_factor")):
                warnings.append("ipu_config field '{}' ({!r}) does not apply: {}".format(name, value, why))
        else:
            warnings.append("ipu_config field '{}' ({!r}) is not an optimum-graphcore 0.7 IPUConfig field "
                            "ipu-t5 knows: ignored".format(name, value))
    if _phased_only(fields):
        overrides.append("ipu.execution_strategy=phased")
    return overrides, warnings


def _phased_only(fields: Mapping[str, Any]) -> bool:
    """Whether the fields describe phased execution: fewer micro-batches than a training pipeline
    over `ipus_per_replica` IPUs needs (poptorch: 2 x IPUs - 1), as ipu-t5 writes for phased plans
    (IPUConfig has no field for the execution strategy)."""
    ipus, accumulation = fields.get("ipus_per_replica"), fields.get("gradient_accumulation_steps")
    if not isinstance(ipus, int) or not isinstance(accumulation, int):
        return False
    return ipus > 1 and accumulation < 2 * ipus - 1


def read_ipu_config(path: Union[str, Path]) -> Tuple[List[str], List[str]]:
    """Read an `ipu_config.json` file (or a directory holding one) into overrides and warnings."""
    path = Path(path)
    if path.is_dir():
        path = path / "ipu_config.json"
    if not path.is_file():
        raise UserError("ipu_config file '{}' does not exist: give an optimum-graphcore ipu_config.json "
                        "(or the directory holding one).".format(path))
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise UserError("'{}' is not valid JSON ({}): give an optimum-graphcore ipu_config.json.".format(
            path, err)) from None
    if not isinstance(data, dict):
        raise UserError("'{}' must hold a JSON object of IPUConfig fields.".format(path))
    return overrides_from_ipu_config(data)


def ipu_config_dict(config, plan) -> Dict[str, Any]:
    """The IPUConfig fields describing a RunConfig placed by an IpuPlan."""
    layout = plan.layout
    counts = [sum(1 for b in blocks if b.startswith(("encoder.", "decoder.")) and not b.endswith("layer_norm"))
              for blocks in layout.stage_blocks]
    ipu = config.ipu
    return {
        "ipus_per_replica": plan.ipus_per_replica,
        "layers_per_ipu": counts,
        "replication_factor": plan.replicas,
        "inference_replication_factor": plan.replicas,
        "gradient_accumulation_steps": layout.micro_batches,
        "device_iterations": 1,
        "inference_device_iterations": plan.inference_device_iterations,
        "matmul_proportion": ipu.matmul_proportion,
        "embedding_serialization_factor": plan.embedding_serialization_factor,
        "recompute_checkpoint_every_layer": ipu.recompute_checkpoint_every_layer,
        "optimizer_state_offchip": plan.optimizer_state_offchip,
        "replicated_tensor_sharding": plan.shards > 1,
        "enable_half_partials": ipu.enable_half_partials,
        "auto_loss_scaling": ipu.auto_loss_scaling,
        "executable_cache_dir": ipu.executable_cache_dir or "",
        "output_mode": "sum",
        "seed": config.training.seed,
    }


def write_ipu_config(path: Union[str, Path], config, plan) -> Path:
    """Write `ipu_config.json` for a plan (`path` may be a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "ipu_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ipu_config_dict(config, plan), indent=2) + "\n")
    return path
