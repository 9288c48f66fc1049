"""Hugging Face export: a directory that plain `transformers` 4.x and 5.x load as the same model.

Writes config.json (untied head spelled so 4.x reads it right), safetensors weights (one
`model.safetensors`, or `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`, as
`save_pretrained` writes a sharded model), tokenizer files, generation_config.json and a model card
into a staging directory beside the target, renamed into place only once checked.

The weights are written by the processes that hold them: each writer's share is cut into files of
at most `max_shard_size`, each file written, read back and compared bit for bit with what was meant
to be written by the process that wrote it, so no process ever holds more than its share plus one
file. The main process writes the rest. Then, where the whole model fits its memory, plain
transformers reloads the export and its logits on a fixed batch are compared with Hugging Face's T5
computing on the written tensors under the run's own config: an export that would load "fine" and
compute something else (a tied head, a rescaled decoder, a missing weight) is never put in place.
Where the model does not fit, that reload is skipped and the export says so and why.
"""
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from ..compat import dtype_kwarg, export_config_dict
from ..errors import UserError
from ..models import TIED_ALIASES, with_weights
from ..tokenizer import save_with_prompt_length
from . import atomic
from .model_card import model_card
from .safetensors_stream import write_streamed
from .views import HF_INDEX, HF_WEIGHTS, SafetensorsView, weight_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Largest difference allowed between the reloaded export's float32 logits and the reference's.
TOLERANCE = 1e-5
# The reload check holds one float32 model at a time; it runs where that much, with this margin for
# transformers' own overhead, is available.
CHECK_MARGIN = 1.5
# Prompts generated at once when an export is reloaded and predicts: the memory greedy generation
# takes on top of the model grows with the batch. Measured on the 0.99 GB base-shaped model, 64
# prompts (psutil peak RSS over the process before the load): batch 64 +1.52 GB, 16 +1.18 GB,
# 8 +1.12 GB, 4 +1.09 GB, with the same predictions.
PREDICT_BATCH = 8


def shapes_of(state: Mapping[str, torch.Tensor]) -> Dict[str, tuple]:
    """Shapes by name (tied aliases left out), without reading tensors a lazy view has not loaded."""
    if hasattr(state, "shapes"):
        return {k: tuple(v) for k, v in state.shapes().items() if k not in TIED_ALIASES}
    return {k: tuple(v.shape) for k, v in state.items() if k not in TIED_ALIASES}


def plan_files(shares: List[Dict[str, tuple]], dtype: torch.dtype, max_shard_size: str) -> List[Dict[str, List[str]]]:
    """Each writer's weight files ({file name: tensor names}), in writer order: every writer's share
    split by huggingface_hub as `save_pretrained` splits a model, the files then numbered across
    writers (`model-00001-of-0000N.safetensors`); a single file is `model.safetensors`."""
    from huggingface_hub import split_torch_state_dict_into_shards

    groups: List[List[List[str]]] = []
    for shapes in shares:
        sizes = {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in shapes.items()}
        try:
            split = split_torch_state_dict_into_shards(sizes, max_shard_size=max_shard_size) if sizes else None
        except ValueError as err:
            raise UserError("--max-shard-size {!r} is not a size ({}): write it like 5GB or 500MB.".format(
                max_shard_size, err)) from None
        groups.append([names for _, names in sorted(split.filename_to_tensors.items())] if split else [])
    total = sum(len(g) for g in groups)
    plans, number = [], 0
    for group in groups:
        plan = {}
        for names in group:
            number += 1
            plan[HF_WEIGHTS if total == 1 else "model-{:05d}-of-{:05d}.safetensors".format(number, total)] = names
        plans.append(plan)
    return plans


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are equal bit for bit (NaNs included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def write_weight_files(directory: Path, files: Dict[str, List[str]], state: Mapping[str, torch.Tensor],
                       dtype: torch.dtype) -> None:
    """Write this process's weight files tensor by tensor (none held beyond the one being written),
    then read each tensor back and compare it bit for bit with its source."""
    from safetensors import safe_open

    shapes = shapes_of(state)
    for filename, names in files.items():
        path = directory / filename
        write_streamed(path, names, shapes, dtype, lambda name: state[name], metadata={"format": "pt"})
        differ, nonfinite, overflow = [], [], []
        for name in names:
            # The file is mapped while open and every page read stays resident until it closes: one
            # open per tensor keeps the read-back to one tensor, not the whole shard, in memory.
            with safe_open(str(path), framework="pt") as f:
                source = state[name].detach()
                written = source.to("cpu", dtype).contiguous()
                if name not in f.keys() or not same_bits(f.get_tensor(name), written):
                    differ.append(name)
                if not bool(torch.isfinite(source).all()):
                    nonfinite.append(name)
                elif not bool(torch.isfinite(written).all()):
                    overflow.append(name)
        if nonfinite:
            raise UserError("the weights are not finite ({} of the tensors in {} hold NaN or infinity, first {}): the "
                            "model diverged in training and is not exported; nothing was put in place. Export an "
                            "earlier checkpoint of the run instead.".format(len(nonfinite), filename, nonfinite[0]))
        if overflow:
            raise UserError("the weights do not fit {} ({} tensors overflow to infinity, first {}): nothing was put in "
                            "place; export in float32 or bfloat16 (--dtype).".format(
                                str(dtype).replace("torch.", ""), len(overflow), overflow[0]))
        if differ:
            raise UserError("the export's {} did not read back as written ({} of its tensors differ, first {}): "
                            "nothing was put in place; check the disk at {}.".format(
                                filename, len(differ), differ[0], directory))


def fits_in_memory(hf_config) -> Tuple[bool, str]:
    """Whether this process can hold the whole model in float32 for a plain-transformers reload, and a
    phrase saying how much it needs and has."""
    import psutil

    from ..models import parameter_shapes

    needed = 4 * sum(int(torch.Size(s).numel()) for s in parameter_shapes(hf_config).values())
    available = psutil.virtual_memory().available
    phrase = "the model needs {} in float32 and {} of memory are available".format(
        atomic.human_bytes(needed), atomic.human_bytes(available))
    return needed * CHECK_MARGIN <= available, phrase


def parity_batch(hf_config) -> Dict[str, torch.Tensor]:
    """A fixed batch: 4 prompts of different lengths (so padding is exercised) with token ids drawn
    from the ordinary vocabulary with a fixed seed, and 8 decoder positions."""
    generator = torch.Generator().manual_seed(0)
    low, high = 3, hf_config.vocab_size
    input_ids = torch.randint(low, high, (4, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate((24, 17, 9, 3)):
        input_ids[row, length - 1] = hf_config.eos_token_id
        input_ids[row, length:] = hf_config.pad_token_id
        attention_mask[row, length:] = 0
    decoder_input_ids = torch.randint(low, high, (4, 8), generator=generator)
    decoder_input_ids[:, 0] = hf_config.decoder_start_token_id
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}


def logits_on(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits of a T5 on a `parity_batch`."""
    with torch.no_grad():
        return model(**batch, use_cache=False).logits.float()


@dataclass
class ExportResult:
    """Where an export went and how its check went: the largest logits difference of the reload,
    or None with `skipped` saying why the reload did not run."""

    path: Path
    files: List[str]
    dtype: torch.dtype
    max_difference: Optional[float]
    skipped: Optional[str] = None

    def describe(self) -> str:
        """The line printed after an export."""
        import transformers

        head = "exported {} ({} weight file(s), {}); every tensor read back bit for bit by the process that " \
               "wrote it".format(self.path, len(self.files), str(self.dtype).replace("torch.", ""))
        if self.max_difference is None:
            return head + "; the reload with plain transformers was skipped: {}".format(self.skipped)
        return head + "; reloaded with transformers {}: its logits on a fixed batch match the trainer's (max " \
                      "|difference| {:.1e}, tolerance {:.0e})".format(transformers.__version__, self.max_difference,
                                                                     TOLERANCE)


def _gather(group, obj) -> List[Any]:
    return group.gather_object(obj) if group is not None else [obj]


def _on_main(group, work: Callable[[], Any]) -> Any:
    return group.on_main(work) if group is not None else work()


def write_hf_checkpoint(
    out_dir: Path,
    state: Mapping[str, torch.Tensor],
    hf_config,
    tokenizer,
    run_config: Dict[str, Any],
    results: Optional[Dict[str, Any]] = None,
    max_new_tokens: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    example_prompt: Optional[str] = None,
    prompt_length: Optional[int] = None,
    group=None,
    release: Optional[Callable[[], None]] = None,
) -> ExportResult:
    """Write the export of the weights `state` (by Hugging Face name; a lazy mapping is read one file
    at a time) atomically, once checked as the module says.

    With `group` (a backend: `gather_object`, `on_main`, `is_main_process`) every process calls this
    with its own share as `state` (each name in exactly one process's share, {} for processes that
    write none) and writes it; the main process writes the rest and gets the result, as do the others.

    `prompt_length`: the token count the run truncated prompts to; the saved tokenizer's
    `model_max_length`, and named in the model card. An existing export at `out_dir` is replaced only
    by a complete, checked one.

    `release`, when given, is called on every process once its weights are written and read back,
    before the main process's reload check: the caller frees the model there (and drops its own
    references to `state`), so the check's models do not sit on top of it.
    """
    out_dir = Path(out_dir)
    shares = _gather(group, shapes_of(state))
    plans = plan_files(shares, dtype, max_shard_size)
    mine = plans[group.process_index if group is not None else 0]
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = sum(int(torch.Size(shape).numel()) * itemsize for share in shares for shape in share.values())
    staging = Path(_on_main(group, lambda: str(atomic.staging_dir(out_dir))))
    error = None
    try:
        write_weight_files(staging, mine, state, dtype)
    except UserError as err:
        error = err
    except Exception as err:  # a full disk on any writer leaves every process's export unwritten
        if not atomic.is_no_space(err):
            raise
        error = _no_space(out_dir, needed)
    failed = next((e for e in _gather(group, error) if e is not None), None)
    # One process holding every weight computes the reference on them, without reading the files,
    # unless they are to be freed first.
    reference_state = state if len(plans) == 1 and release is None else None
    del state
    if release is not None:
        release()

    def finish() -> ExportResult:
        try:
            if failed is not None:
                raise failed
            weight_map = {name: filename for plan in plans for filename, names in plan.items() for name in names}
            _write_metadata(staging, weight_map, needed, hf_config, tokenizer, run_config, results, max_new_tokens,
                            dtype, example_prompt, prompt_length)
            difference, skipped = _check_reload(staging, hf_config, dtype, reference_state)
            atomic.fsync_tree(staging)
            atomic.replace_dir(staging, out_dir)
        except Exception as err:
            if not isinstance(err, UserError) and atomic.is_no_space(err):
                raise _no_space(out_dir, needed) from None
            raise
        finally:
            shutil.rmtree(str(staging), ignore_errors=True)
        return ExportResult(out_dir, sorted(set(weight_map.values())), dtype, difference, skipped)

    return _on_main(group, finish)


def _write_metadata(staging: Path, weight_map: Dict[str, str], total_size: int, hf_config, tokenizer,
                    run_config: Dict[str, Any], results: Optional[Dict[str, Any]], max_new_tokens: Optional[int],
                    dtype: torch.dtype, example_prompt: Optional[str], prompt_length: Optional[int]) -> None:
    """Everything but the weights: config.json, the shards' index, tokenizer, generation config, card."""
    from transformers import GenerationConfig

    with open(str(staging / "config.json"), "w") as f:
        json.dump(export_config_dict(hf_config, dtype), f, indent=2, sort_keys=True)
    if set(weight_map.values()) != {HF_WEIGHTS}:
        with open(str(staging / HF_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2, sort_keys=True)
    save_with_prompt_length(tokenizer, str(staging), prompt_length)
    generation = GenerationConfig(
        decoder_start_token_id=hf_config.decoder_start_token_id, eos_token_id=hf_config.eos_token_id,
        pad_token_id=hf_config.pad_token_id,
        # Validation capped new tokens at the longest target; the export does the same, so plain
        # transformers predicts exactly what validation measured.
        **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))
    generation.save_pretrained(str(staging))
    base = run_config["model"].get("pretrained") or ""
    (staging / "README.md").write_text(model_card(run_config, results, base, example_prompt, prompt_length))


def _no_space(out_dir: Path, needed: int) -> UserError:
    return UserError("no space left on the device while exporting to {}: the weights need about {} ({} bytes) "
                     "and {} are free there. Free space or choose another --out; any earlier export there is "
                     "intact.".format(out_dir, atomic.human_bytes(needed), needed,
                                      atomic.human_bytes(atomic.free_bytes(out_dir.parent))))


def _check_reload(directory: Path, hf_config, dtype: torch.dtype,
                  state: Optional[Mapping[str, torch.Tensor]] = None) -> Tuple[Optional[float], Optional[str]]:
    """Where the model fits this process: Hugging Face's T5 under the run's config computing on the
    weights (`state`, or else the written tensors, equal bit for bit), rounded to `dtype` and computed in
    float32 as a float32 reload computes, then plain transformers reloading `directory` in float32;
    their logits on a fixed batch must match. One model is held at a time (on `state` the reference
    copies nothing). Returns (max difference, None), or (None, why the reload was skipped)."""
    import gc

    from transformers import AutoModelForSeq2SeqLM

    fits, phrase = fits_in_memory(hf_config)
    if not fits:
        return None, phrase
    batch = parity_batch(hf_config)
    weights = state if state is not None else SafetensorsView(weight_files(directory))
    reference = logits_on(with_weights(hf_config, weights, None if dtype == torch.float32 else dtype), batch)
    # The reference model is garbage (its modules refer to each other) before the reload is built.
    gc.collect()
    model = AutoModelForSeq2SeqLM.from_pretrained(str(directory), **dtype_kwarg(torch.float32)).eval()
    difference = float((logits_on(model, batch) - reference).abs().max())
    if not math.isfinite(difference):
        raise UserError("the exported model computes logits that are not finite on a fixed batch (its weights are "
                        "finite but overflow in computation), so nothing was written: the model diverged in "
                        "training; export an earlier checkpoint of the run instead.")
    if not difference <= TOLERANCE:
        raise UserError("the export does not reload as the trained model: transformers' logits on a fixed batch "
                        "differ from the trainer's by up to {:.3g} (tolerance {:.0e}), so nothing was written. "
                        "Please report this with your transformers version.".format(difference, TOLERANCE))
    return difference, None


def reload_and_predict(hf_dir: Path, prompts: List[str], batch_size: int = PREDICT_BATCH, bf16: bool = False,
                       adapter: Optional[Path] = None) -> List[str]:
    """Load an export with plain transformers (5.x: AutoModelForSeq2SeqLM + generate), with
    `adapter` over it through `peft.PeftModel.from_pretrained` where given (a soft prompt), and
    predict greedily, as a user without ipu-t5 would, `batch_size` prompts at a time; under bfloat16
    autocast where `bf16` (validation generated so: like is compared with like)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(hf_dir)).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    texts = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(prompts), batch_size):
            # Truncated at the tokenizer's model_max_length: the run's prompt length.
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True)
            texts += tokenizer.batch_decode(model.generate(**batch, do_sample=False, num_beams=1),
                                            skip_special_tokens=True)
    return texts
