"""T5Trainer: drives a backend through training, generation-based validation and export.

The call shapes are those of Graphcore's Flan-T5 notebook:
``T5Trainer(config, pretrained, dataset, eval_dataset, eval_config, tokenizer, accuracy_metric,
postprocess_predictions)`` then ``train()``, ``evaluate()``, ``save_hf_checkpoint(hf_path, ckpt_path)`` (which
returns the fine-tuned model, as theirs does; ``export_hf`` writes the same and returns its path).
Every argument after `config` may be left out; it is then built from the config.
"""
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from tqdm.auto import tqdm

from .. import checkpointing, lora
from ..backends import Backend, backend_class, resolve_backend_name
from ..checkpointing import lock
from ..config import RunConfig, ValidationConfig
from ..data.batching import BatchOrder, GlobalBatch
from ..data.features import Lengths
from ..data.prepare import prepare_data
from ..errors import UserError
from ..layout import plan_from_config
from ..model_source import run_source
from ..models import canonical_size, model_size, parameter_shapes, size_note
from ..tasks import build_task
from .best_metric import BestMetric
from .checkpoints import RunCheckpoints
from .hf_export import HfExport
from .metrics_log import MetricsLog
from .nonfinite import NonfiniteSteps
from .signals import GracefulStop
from .validation import generate_all, score, write_predictions


class _Stopped(Exception):
    """A stop signal arrived during a validation inside the training loop."""


class T5Trainer(RunCheckpoints, HfExport):
    """Fine-tunes a Flan-T5 on a text-to-text task under the configured layout and backend.

    Args:
        config: the validated run configuration.
        pretrained: a `T5ForConditionalGeneration`, a hub id or directory, or None for the
            config's model.
        dataset, eval_dataset: `datasets.Dataset`s, raw (the task's columns) or tokenized
            (`input_ids`, `labels`, `reference`); None loads them from the config.
        eval_config: validation settings; None uses `config.validation`.
        tokenizer: None loads the model's tokenizer (or trains the demo one for `tiny`).
        accuracy_metric: an `evaluate` metric (Graphcore's name; any metric works); None loads the
            task's local metric module (accuracy, ROUGE, exact match, ...).
        postprocess_predictions: generated texts -> metric predictions; None uses the task's.
        backend: an already built backend; None builds the configured one.

    With `output.resume_from_checkpoint` set ("auto" or a checkpoint path) the trainer continues
    that checkpoint's run: model and tokenizer come from the checkpoint (no hub access needed), and
    weights, optimizer, random generators, data order and step are restored.
    """

    def __init__(
        self,
        config: RunConfig,
        pretrained: Union[None, str, torch.nn.Module] = None,
        dataset=None,
        eval_dataset=None,
        eval_config: Optional[ValidationConfig] = None,
        tokenizer=None,
        accuracy_metric=None,
        postprocess_predictions: Optional[Callable[[List[str]], List[Any]]] = None,
        backend: Optional[Backend] = None,
    ):
        self.config = config
        self.eval_config = eval_config or config.validation
        self.task = build_task(config)
        resume = config.output.resume_from_checkpoint
        # Found before anything is built, without reading the tensors (the main process verifies them
        # later): a run that cannot resume fails fast, and a resumed run builds its model from the
        # checkpoint's own config and tokenizer, so a preempted run restarts without the hub.
        candidate = checkpointing.resolve(resume, self.output_dir, lambda _: None, verify_data=False) if resume else None
        # The architecture every backend builds and plans: the weights' own config.json where there are
        # weights (the file is the truth), else the registry's `model.name`.
        self.size = model_size(config, pretrained)
        if candidate is not None:
            checkpointing.check_architecture(candidate, self.size)
        if tokenizer is None and candidate is not None:
            tokenizer = candidate.tokenizer()
        backend_type = type(backend) if backend is not None else backend_class(
            resolve_backend_name(config, plan_from_config(config)))
        data = prepare_data(config, self.task, dataset, eval_dataset, tokenizer, backend_type.static_prompt_length)
        self.tokenizer = data.tokenizer
        self.train_features, self.eval_features, self.eval_split = data.train_features, data.eval_features, data.eval_split
        # Prompts are tokenized truncated to `prompt_length` tokens; the export's tokenizer carries it
        # as model_max_length, so plain transformers with truncation=True sees the same ids.
        self.prompt_length = data.prompt_length
        self.lengths: Lengths = data.lengths
        self.train_tokens = data.train_tokens
        self.plan = backend_type.layout_plan(config, self.lengths, self.size)
        if backend is None:
            backend_type.check_memory(config, self.plan, self.lengths)
        self.backend = backend or backend_type(config, self.plan)
        if self.backend.lengths is None:
            self.backend.lengths = self.lengths
        note = size_note(config, self.size)
        if note and self.is_main_process:
            tqdm.write("ipu-t5: " + note, file=sys.stderr)  # stdout may be a command's JSON
        # Verified (every file's checksum) before any weight is read from it.
        found = checkpointing.find_for_resume(self.backend, resume, self.output_dir, self._say) if resume else None
        weights = None
        if pretrained is None and found is not None and not lora.enabled(config):
            # The architecture and weights of the checkpoint, read by each process for what it holds. A
            # LoRA checkpoint holds only the adapters, so the base is the run's own starting point.
            pretrained, weights = found.hf_config(), found.model_tensors()
            checkpointing.check_tensors(found, parameter_shapes(pretrained))
        # A description of the model; each backend builds only what it holds.
        self.source = run_source(config, len(self.tokenizer), self.backend, pretrained, weights, self.tokenizer)
        self.base_model = str(pretrained) if isinstance(pretrained, (str, Path)) else (
            config.model.pretrained or canonical_size(config.model.name).hub_id)
        frame = self.source.meta_model()
        # The built model's own config: untied, as every model built from the source is.
        self.hf_config = frame.config
        if lora.enabled(config):
            self.adapter_shapes = {k: tuple(v.shape) for k, v in lora.adapter_state(frame.state_dict()).items()}
        self.num_params = sum(p.numel() for p in frame.parameters())
        self.num_trainable = sum(p.numel() for p in frame.parameters() if p.requires_grad)
        del frame
        torch.manual_seed(config.training.seed)
        self.backend.setup(self.source)
        # The backend may refine the plan (the IPU chooses its micro-batch and blocks per IPU).
        self.plan = self.backend.plan
        self.metric = accuracy_metric
        if self.metric is None and self.eval_features is not None:
            import evaluate

            self.metric = evaluate.load(self.task.metric_path)
        self.postprocess = postprocess_predictions or self.task.postprocess
        self.step = 0
        self.order = BatchOrder(len(self.train_features), config.training.global_batch_size, config.training.seed,
                                self.train_tokens.lengths() if config.data.group_by_length else None)
        self.last_eval: Optional[Dict[str, Any]] = None
        # The best validation so far (`best_metric`, `best_step`, `last_eval_is_best`): checkpoints
        # keep the best by it, and training stops early on it.
        self.best = BestMetric(self.eval_config.metric_for_best_model, self.eval_config.greater_is_better,
                               self.eval_config.early_stopping_patience, self.eval_config.early_stopping_threshold)
        self.resumed_from: Optional[Path] = None
        # Steps skipped for a loss or gradient norm that was not finite, and the current streak.
        self.nonfinite = NonfiniteSteps(config.training.max_nonfinite_steps)
        # Where the latest `export_hf` / `save_hf_checkpoint` wrote the Hugging Face export.
        self.hf_path: Optional[Path] = None
        self._last_eval_step: Optional[int] = None
        self._saved_step: Optional[int] = None
        self._stop: Optional[GracefulStop] = None
        self._claimed = False
        # The main process took the run directory's lock at its first write (released by `close`).
        self._lock_owed = False
        self._trained_out = False
        # The backend freed its model after the run's last export (export_hf(release_model=True)).
        self._released = False
        self._log: Optional[MetricsLog] = None
        # The checkpoint being written beside training (output.async_save).
        self._saves = checkpointing.BackgroundSave()
        if found is not None:
            self._resume(found, weights_loaded=weights is not None)

    # ----- output -----

    @property
    def output_dir(self) -> Path:
        return self.config.output_dir

    @property
    def is_main_process(self) -> bool:
        return self.backend.is_main_process

    def _say(self, message: str) -> None:
        if self.is_main_process:
            tqdm.write(message)

    def _write_json(self, name: str, data: Any) -> None:
        if self.is_main_process:
            with open(self.output_dir / name, "w") as f:
                json.dump(data, f, indent=2)

    def _trainable_note(self) -> str:
        if not lora.enabled(self.config):
            return ""
        peft = self.config.peft
        if not lora.is_lora(self.config):
            return ", {:,} trainable ({:.2%}): a soft prompt of {} virtual tokens".format(
                self.num_trainable, self.num_trainable / self.num_params, peft.num_virtual_tokens)
        return ", {:,} trainable ({:.2%}): LoRA r={} alpha={:g} on {}".format(
            self.num_trainable, self.num_trainable / self.num_params, peft.r, peft.lora_alpha,
            ", ".join(peft.target_modules))

    # ----- training -----

    def train(self, resume_from_checkpoint: Optional[str] = None) -> Dict[str, Any]:
        """Run optimizer steps up to `training.max_steps`; returns a summary of the run.

        `resume_from_checkpoint` ("auto" or a checkpoint path, as in HF's Trainer) first restores
        that checkpoint. Checkpoints are written every `output.save_steps` steps, at a new best
        validation result and at the end. SIGTERM or SIGINT finishes the current step, writes a
        checkpoint and returns early with `summary["interrupted"]` naming the signal. With
        `validation.early_stopping_patience` training ends once validation stops improving
        (`summary["stopped_early"]`).
        """
        self._refuse_if_released()
        if self._trained_out:
            raise UserError("this trainer released its optimizer state (end_training): build a new T5Trainer with "
                            "--resume to train on.")
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
        self._refuse_restart_over_checkpoints()
        cfg = self.config.training
        log = self._claim()
        self._say("{}\n{}\nmodel: {} ({:.1f}M parameters{}), task {}: {} training / {} validation examples, "
                  "prompts up to {} tokens, targets up to {}".format(
                      self.backend.description, self.plan.describe(),
                      self.size.name if self.size.name != "custom" else "custom shape from its weights",
                      self.num_params / 1e6, self._trainable_note(),
                      self.task.name, len(self.train_tokens), len(self.eval_features) if self.eval_features is not None else 0,
                      self.lengths.source, self.lengths.target))
        batches = iter(self.order)
        started, samples_done, first_step = time.perf_counter(), 0, self.step
        result, stopped, stopped_early = None, None, False
        with GracefulStop() as self._stop, tqdm(
                total=cfg.max_steps, initial=self.step, desc="training", unit="step",
                disable=not self.is_main_process, dynamic_ncols=True) as bar:
            try:
                # A run stopped during a validation repeats it before going on.
                if self._eval_due() and self._last_eval_step != self.step:
                    self._evaluate_in_loop()
                while self.step < cfg.max_steps:
                    stopped = self._stop_requested()
                    if stopped:
                        break
                    batch = GlobalBatch([self.train_tokens.sample(i) for i in next(batches)])
                    tick = time.perf_counter()
                    result = self.backend.train_step(batch, self.step)
                    elapsed = time.perf_counter() - tick
                    self.step += 1
                    if self.step == first_step + 1:
                        self._prepare_background_saves()
                    self.nonfinite.record(result, self.step)
                    samples_done += len(batch.samples)
                    tokens = sum(len(s["input_ids"]) + len(s["labels"]) for s in batch.samples)
                    record = {"step": self.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                              "samples_per_second": len(batch.samples) / elapsed, "tokens_per_second": tokens / elapsed,
                              "epoch": self.order.epoch + self.order.position / self.order.batches_per_epoch,
                              "nonfinite": result.skipped, "nonfinite_steps": self.nonfinite.total}
                    log.log(record)
                    bar.update(1)
                    if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps or result.skipped:
                        skipped = {"nonfinite": self.nonfinite.total} if self.nonfinite.total else {}
                        bar.set_postfix(loss="{:.4f}".format(result.loss), lr="{:.2e}".format(result.lr),
                                        samples_s="{:.1f}".format(samples_done / (time.perf_counter() - started)),
                                        **skipped)
                    if self.nonfinite.exhausted:
                        # Ends the run without its final save: the newest checkpoint stays the newest.
                        raise UserError(self.nonfinite.stop_message(self.step, self._newest_checkpoint()))
                    improved = self._evaluate_in_loop() if self._eval_due() else False
                    save_steps = self.config.output.save_steps
                    # None while a streak of skipped steps lasts: the checkpoint before it stays the
                    # newest, and rotation keeps it.
                    if save_steps and (self.step % save_steps == 0 or improved) and not self.nonfinite.in_row:
                        self._save_periodic()
                    if self.best.should_stop:
                        stopped_early = True
                        self._say("ipu-t5: early stopping at step {}: {} has not improved on {:.4f} (step {}) in {} "
                                  "validations".format(self.step, self.best.metric, self.best.best,
                                                       self.best.best_step, self.best.evals_without_improvement))
                        break
                if stopped is None:
                    stopped = self._stop_requested()
            except _Stopped as during_validation:
                stopped = str(during_validation)
            # Inside the handler, so that a second signal during this write exits at once.
            if (stopped or self.config.output.save_steps) and self._saved_step != self.step:
                self._save_periodic(final=True)
            # A run ends with its last checkpoint in place, and frees the host copies of its state.
            self._saves.wait()
            self._saves.close()
        self._stop = None
        seconds = time.perf_counter() - started
        summary = {"steps": self.step, "steps_this_run": self.step - first_step, "train_seconds": seconds,
                   "samples_per_second": samples_done / seconds if seconds else 0.0,
                   "final_loss": result.loss if result else None, "stopped_early": stopped_early,
                   "best_metric": self.best_metric, "best_step": self.best_step}
        if self._saved_step == self.step:
            summary["checkpoint"] = str(checkpointing.step_path(self.output_dir, self.step))
        if stopped:
            summary["interrupted"] = stopped
            self._say("ipu-t5: stopped by {} after step {} of {}; checkpoint {}".format(
                stopped, self.step, cfg.max_steps, summary["checkpoint"]))
        return summary

    def end_training(self) -> None:
        """Training is over (its last checkpoint, when checkpoints are on, holds the optimizer state):
        free the optimizer's state, so the export and validation that follow have that memory. The
        trainer then refuses to train."""
        self.backend.release_optimizer_state()
        self._trained_out = True

    @property
    def best_metric(self) -> Optional[float]:
        """The best value of `validation.metric_for_best_model` so far (None before any validation)."""
        return self.best.best

    @property
    def best_step(self) -> Optional[int]:
        """The step of the best validation so far."""
        return self.best.best_step

    @property
    def last_eval_is_best(self) -> bool:
        """Whether the latest validation improved on every earlier one."""
        return self.best.last_is_best

    def _stop_requested(self) -> Optional[str]:
        """The signal that asked the run to stop, as the main process saw it (so every process stops
        after the same step)."""
        return self.backend.broadcast_object(self._stop.requested if self._stop is not None else None)

    def _eval_due(self) -> bool:
        eval_steps = self.eval_config.eval_steps
        return bool(eval_steps and self.eval_features is not None and 0 < self.step < self.config.training.max_steps
                    and self.step % eval_steps == 0)

    def _evaluate_in_loop(self) -> bool:
        """Validate inside the loop; whether the result is the best so far."""
        self.evaluate()
        return self.last_eval_is_best

    # ----- validation -----

    def evaluate(self) -> Dict[str, Any]:
        """Greedy generation over the validation split, scored by the metric; writes
        eval_results.json and eval_predictions.jsonl."""
        self._refuse_if_released()
        if self.eval_features is None:
            raise UserError("no evaluation data: set validation.do_eval=true or pass eval_dataset.")
        log = self._claim()
        rows = self.eval_features.to_list()
        generated, seconds = generate_all(self.backend, rows, self.eval_config.per_device_eval_batch_size,
                                          self.eval_config.max_new_tokens or self.lengths.target, self.is_main_process,
                                          self._raise_if_stopped)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        predictions = self.postprocess(texts)
        result = score(self.task, self.metric, predictions, [r["reference"] for r in rows], self.eval_split,
                       self.step, seconds)
        result["precision"] = "bfloat16" if self.backend.eval_amp_dtype == torch.bfloat16 else "float32"
        self._track_best(result)
        self.last_eval = result
        self._write_json("eval_results.json", result)
        if self.is_main_process:
            targets = self.tokenizer.batch_decode([r["labels"] for r in rows], skip_special_tokens=True)
            write_predictions(self.output_dir / "eval_predictions.jsonl", rows, texts, predictions, targets)
        log.log({"step": self.step, **{k: v for k, v in result.items() if isinstance(v, (int, float))}}, prefix="eval")
        self.backend.on_main(self._record_best)
        return result

    def predict(self, test_dataset, out: Optional[Union[str, Path]] = None):
        """Generate for `test_dataset` (a `datasets.Dataset` or list of rows with the task's input
        columns, targets optional), as `Seq2SeqTrainer.predict` does: a `PredictionOutput` of the
        task's predictions, the references and metrics where every row is labelled, and the generated
        texts. With `out`, the predictions file is written as it goes and continued if it exists
        (`training/predict.py`)."""
        from .predict import check_rows, predict_rows

        self._refuse_if_released()
        rows = check_rows(test_dataset, self.task, "prediction data")
        return predict_rows(self.backend, self.tokenizer, self.task, rows, self.eval_config.per_device_eval_batch_size,
                            self.eval_config.max_new_tokens or self.lengths.target, self.prompt_length, self.postprocess,
                            self.is_main_process, None if out is None else Path(out), self.metric)

    def _raise_if_stopped(self) -> None:
        """Between validation batches inside the training loop: a stop signal ends the validation."""
        signal_name = self._stop_requested() if self._stop is not None else None
        if signal_name:
            raise _Stopped(signal_name)

    def _track_best(self, result: Dict[str, Any]) -> None:
        """Rank this validation against the earlier ones (`best_metric`, `best_step`, `is_best`)."""
        self.best.update(result, self.step)
        result.update({"best_metric": self.best_metric, "best_step": self.best_step, "is_best": self.last_eval_is_best})
        self._last_eval_step = self.step

    def close(self) -> None:
        """Flush logs, wait for checkpoint writes, release the backend and the run directory (another
        trainer may then write it)."""
        self._saves.close()
        if self._log is not None:
            self._log.close()
        if self._lock_owed and self.is_main_process:
            lock.release(self.output_dir)
        self._lock_owed = False
        self.backend.close()
