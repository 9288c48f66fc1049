"""The checkpoint half of `T5Trainer`: what a checkpoint of this run holds beyond tensors, when it
is written and rotated, and how a run continues from one (weights, optimizer, generators, data
order, step and validation history), under whatever layout wrote it."""
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .. import checkpointing, lora
from ..backends.optim import lr_at
from ..checkpointing import lock, rng, run_dir
from ..errors import UserError
from ..models import parameter_shapes
from .metrics_log import MetricsLog


class RunCheckpoints:
    """Mixed into `T5Trainer`: the run directory it claims and locks, and its checkpoints; uses its
    config, backend, step, data order, best metric and model description."""

    def _claim(self, continuing: bool = False) -> MetricsLog:
        """Make the output directory this run's and open its metrics log; `continuing`: this
        process continues the run from its step even without a checkpoint (a restart)."""
        if not self._claimed:
            self._lock_owed = self.backend.on_main(self._lock_and_claim)
            self._claimed = True
            self._log = MetricsLog(self.output_dir, self.is_main_process, self.config.output.report_to_tensorboard,
                                   resumed_at=self.step if self.resumed_from or continuing else None)
        return self._log

    def _lock_and_claim(self) -> bool:
        """One writer per run directory (another live one is refused), then the directory is this
        run's; whether a lock release is owed."""
        # Another run's (or someone's own) directory is refused before a lock file is left in it.
        run_dir.holds_other_run(self.output_dir, self.config.to_dict(), self.config.output.overwrite_output_dir)
        owed = lock.acquire(self.output_dir, "T5Trainer")
        try:
            run_dir.claim(self.output_dir, self.config.to_dict(), self.config.output.overwrite_output_dir)
        except BaseException:
            if owed:
                lock.release(self.output_dir)
            raise
        return owed

    def _refuse_restart_over_checkpoints(self) -> None:
        """A run started afresh in a directory that holds its checkpoints would replace them as it
        goes: continue them instead, or start over only when asked to."""
        steps = checkpointing.list_steps(self.output_dir)
        if self.step or self.resumed_from or not steps:
            return
        # Another run's checkpoints are another matter, refused (or replaced) as such.
        if run_dir.holds_other_run(self.output_dir, self.config.to_dict(), self.config.output.overwrite_output_dir):
            return
        if not self.config.output.overwrite_output_dir:
            raise UserError("output directory '{}' holds checkpoints of this run up to step {}: continue it with "
                            "--resume auto, or start it over with --overwrite.".format(self.output_dir, steps[-1]))
        self.backend.on_main(lambda: run_dir.clear(self.output_dir))

    def _resume(self, spec: Union[str, "checkpointing.Checkpoint"], weights_loaded: bool = False) -> None:
        """Restore weights, optimizer, random generators, data order, step and validation history
        from the checkpoint `spec` names ("auto": this run's newest intact one), or from a checkpoint
        already found; `weights_loaded`: the backend built its model from that checkpoint's weights,
        so only the rest is read."""
        found = spec if isinstance(spec, checkpointing.Checkpoint) else \
            checkpointing.find_for_resume(self.backend, spec, self.output_dir, self._say)
        if found is None:
            return
        checkpointing.check_architecture(found, self.size)
        expected = parameter_shapes(self.hf_config)
        if lora.enabled(self.config):
            expected = self.adapter_shapes
        checkpointing.check_tensors(found, expected)
        checkpointing.check_data_order(found, self.order.state_dict())
        found.load_into(self.backend, model=not weights_loaded)
        state = found.state
        self.step = int(state["step"])
        self.order.load_state_dict(state["data_order"])
        self.best.load_state_dict(state.get("best"))
        self.nonfinite.load_state_dict(state.get("nonfinite"))
        self.last_eval = state.get("last_eval")
        self._last_eval_step = state.get("last_eval_step")
        self._saved_step = self.step
        saved = found.process_state(self.backend.process_index)
        if saved is not None:
            rng.restore(saved["rng"])
            self.backend.load_extra_state(saved["backend"])
        if state["num_processes"] != self.backend.num_processes:
            self._say("ipu-t5: the checkpoint was written by {} process(es) and this run has {}: weights, optimizer "
                      "and data order continue exactly, random streams (dropout) only where a rank existed "
                      "before.".format(state["num_processes"], self.backend.num_processes))
        self.resumed_from = found.path
        self._say("ipu-t5: resuming from {} at step {}".format(found.path, self.step))

    def record_restart(self, restart: int) -> None:
        """This process is part of the `restart`-th start of a multi-process run whose processes
        torchrun restarted after one failed (--max-restarts): say so, and from which step the run
        continues, on the progress output and in metrics.jsonl; the steps the failed attempt logged
        after that step are dropped from metrics.jsonl as on any resume."""
        self._claim(continuing=True).event({"event": "restart", "restart": restart, "step": self.step,
                                            "resumed_from_step": self.step})
        self._say("ipu-t5: restart {} after a failed process: continuing from step {} ({})".format(
            restart, self.step, self.resumed_from or "no checkpoint yet"))

    def _record_best(self) -> None:
        """A checkpoint of this step, written before its validation finished, records the ranking
        too, and the best checkpoint is kept by rotation."""
        path = checkpointing.step_path(self.output_dir, self.step)
        if (path / checkpointing.STATE_FILE).is_file():
            checkpointing.update_trainer_state(path, best=self.best.state_dict(), last_eval=self.last_eval,
                                            last_eval_step=self.step)
            checkpointing.rotate(self.output_dir, self.config.output.save_total_limit, self._protected_steps())

    def _protected_steps(self) -> List[int]:
        return [self.best.best_step] if self.best.best_step is not None else []

    def _trainer_state(self) -> Dict[str, Any]:
        """What a checkpoint needs, beyond tensors, to continue this run exactly."""
        cfg = self.config.training
        plan = self.plan
        return {"step": self.step, "max_steps": cfg.max_steps, "data_order": self.order.state_dict(),
                "lr_scheduler": {"type": cfg.lr_scheduler_type, "last_lr": lr_at(max(self.step - 1, 0), cfg)},
                "best": self.best.state_dict(), "last_eval": self.last_eval, "last_eval_step": self._last_eval_step,
                "nonfinite": self.nonfinite.state_dict(),
                "max_new_tokens": self.eval_config.max_new_tokens or self.lengths.target,
                "prompt_length": self.prompt_length,
                "layout": {"backend": self.backend.name, "stages": plan.stages, "replicas": plan.replicas,
                           "micro_batch_size": plan.micro_batch_size, "micro_batches": plan.micro_batches}}

    def save_checkpoint(self, path: Union[str, Path]) -> Path:
        """A layout-free training checkpoint at `path`: weights, optimizer, random generators of
        every process, data order and step. Written atomically; `--resume PATH` continues it."""
        return self._write_checkpoint(Path(path))

    def _write_checkpoint(self, path: Path, background: bool = False, then=None) -> Path:
        """`save_checkpoint`; with `background`, written beside the next steps (`_saves`), `then`
        run on the main process once it is in place."""
        self._refuse_if_released()
        self._claim()
        self._refuse_nonfinite_weights()
        # One write at a time, in order: the next one starts by clearing unfinished staging directories.
        self._saves.wait()
        return checkpointing.save_checkpoint(path, self.backend, self._trainer_state(), self.config.to_dict(),
                                          self.hf_config, self.tokenizer, self._kept_weights(),
                                          background=self._saves if background else None, then=then)

    def _prepare_background_saves(self) -> None:
        """With `output.async_save`, the host buffers of the checkpoints to come, allocated once the
        first step has made the optimizer's state (`BackgroundSave.prepare`)."""
        output = self.config.output
        if output.async_save and output.save_steps and self.step < self.config.training.max_steps:
            self._saves.prepare(self.backend, lambda: checkpointing.one_process_tensors(self.backend, self._kept_weights()))

    def _kept_weights(self):
        """Which weights a checkpoint keeps: under LoRA only the adapters, the base weights being the
        run's starting point, rebuilt from its config on load; None: all."""
        return lora.adapter_state if lora.enabled(self.config) else None

    def _newest_checkpoint(self) -> Optional[Path]:
        """This run's newest complete periodic checkpoint, or None."""
        steps = checkpointing.list_steps(self.output_dir)
        return checkpointing.step_path(self.output_dir, steps[-1]) if steps else None

    def _refuse_nonfinite_weights(self) -> None:
        """Weights that are no longer finite are never written over a good checkpoint: the run stops
        with the newest intact one named (the same decision on every process)."""
        if not self.backend.weights_finite():
            raise UserError(self.nonfinite.broken_weights_message(self.step, self._newest_checkpoint()))

    def _save_periodic(self, final: bool = False) -> Path:
        """`<output-dir>/checkpoints/step-N`, then keep the newest `output.save_total_limit` and the
        best. With `output.async_save` (unless `final`) written beside the next steps."""
        protect = self._protected_steps()
        path = self._write_checkpoint(
            checkpointing.step_path(self.output_dir, self.step), self.config.output.async_save and not final,
            lambda: checkpointing.rotate(self.output_dir, self.config.output.save_total_limit, protect))
        self._saved_step = self.step
        return path
