"""T5Trainer: drives a backend through training, generation-based validation and export.

The call shapes are those of Graphcore's Flan-T5 notebook:
``T5Trainer(config, pretrained, dataset, eval_dataset, eval_config, tokenizer, accuracy_metric,
postprocess_predictions)`` then ``train()``, ``evaluate()``, ``save_hf_checkpoint(hf_path, ckpt_path)``.
Every argument after `config` may be left out; it is then built from the config.
"""
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from tqdm.auto import tqdm

from . import run_dir
from .backends import Backend, create_backend
from .best_metric import BestMetric
from .checkpoint import save_checkpoint
from .config import RunConfig, ValidationConfig
from .data.batching import BatchOrder, GlobalBatch
from .data.features import Lengths, TokenColumns, lengths, tokenize
from .data.sources import check_examples, load_splits
from .errors import UserError
from .export import write_hf_checkpoint
from .layout import plan_from_config
from .metrics_log import MetricsLog
from .models import build_model, load_pretrained, set_dropout
from .tasks import get_task
from .tokenizer import cache_root, load_tokenizer


class T5Trainer:
    """Fine-tunes a Flan-T5 on a text-to-text task under the configured layout and backend.

    Args:
        config: the validated run configuration.
        pretrained: a `T5ForConditionalGeneration`, a hub id or directory, or None for the
            config's model.
        dataset, eval_dataset: `datasets.Dataset`s, raw (the task's columns) or tokenized
            (`input_ids`, `labels`, `reference`); None loads them from the config.
        eval_config: validation settings; None uses `config.validation`.
        tokenizer: None loads the model's tokenizer (or trains the demo one for `tiny`).
        accuracy_metric: an `evaluate` metric; None loads the task's local metric module.
        postprocess_predictions: generated texts -> metric predictions; None uses the task's.
        backend: an already built backend; None builds the configured one.
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
        self.task = get_task(config.data.task)
        # What the config loads is checked as it loads; what the caller passes is checked here.
        if eval_dataset is not None:
            eval_dataset = self._checked(eval_dataset, "evaluation data")
        if dataset is None:
            dataset, loaded_eval = load_splits(config, self.task)
            eval_dataset = loaded_eval if eval_dataset is None else eval_dataset
        else:
            dataset = self._checked(dataset, "training data")
        self.tokenizer = tokenizer or load_tokenizer(config, corpus=self._corpus(dataset))
        self.train_features = self._tokenize(dataset, "training")
        self.eval_features = None if eval_dataset is None else self._tokenize(eval_dataset, "evaluation")
        self.lengths: Lengths = lengths(self.train_features, self.eval_features)
        self.train_tokens = TokenColumns(self.train_features)
        model = self._model(pretrained)
        self.hf_config = model.config
        self.num_params = sum(p.numel() for p in model.parameters())
        self.plan = plan_from_config(config, self.lengths.source, self.lengths.target)
        self.backend = backend or create_backend(config, self.plan)
        torch.manual_seed(config.training.seed)
        self.backend.setup(model)
        self.metric = accuracy_metric
        if self.metric is None and self.eval_features is not None:
            import evaluate

            self.metric = evaluate.load(self.task.metric_path)
        self.postprocess = postprocess_predictions or self.task.postprocess
        self.step = 0
        self.order = BatchOrder(len(self.train_features), config.training.global_batch_size, config.training.seed,
                                self.train_tokens.lengths() if config.data.group_by_length else None)
        self.last_eval: Optional[Dict[str, Any]] = None
        # The best validation so far (`best_metric`, `best_step`, `last_eval_is_best`): checkpointing
        # keeps the best by it, and training stops early on it.
        self.best = BestMetric(self.eval_config.metric_for_best_model or self.task.metric,
                               self.eval_config.greater_is_better, self.eval_config.early_stopping_patience,
                               self.eval_config.early_stopping_threshold)
        self._claimed = False
        self._log: Optional[MetricsLog] = None

    # ----- construction helpers -----

    def _checked(self, dataset, where: str):
        if "input_ids" in dataset.column_names:
            missing = [c for c in ("labels", "reference") if c not in dataset.column_names]
            if missing:
                raise UserError("{} is tokenized but has no {} column(s).".format(where, ", ".join(missing)))
            return dataset
        return check_examples(dataset, self.task, where, None)

    def _tokenize(self, dataset, role: str):
        data = self.config.data
        return tokenize(dataset, self.task, self.tokenizer, data.max_source_length, data.preprocessing_num_workers,
                        "tokenizing {} data".format(role), cache_root() / "features", data.overwrite_cache)

    def _corpus(self, dataset) -> List[str]:
        if "input_ids" in dataset.column_names:
            raise UserError("the training data is already tokenized, so pass the tokenizer that made it.")
        rows = dataset.to_list()
        return [self.task.source_text(r) for r in rows] + [self.task.target_text(r) for r in rows]

    def _model(self, pretrained):
        if pretrained is None:
            return build_model(self.config, len(self.tokenizer))
        model = load_pretrained(str(pretrained)) if isinstance(pretrained, (str, Path)) else pretrained
        if self.config.model.dropout_rate is not None:
            set_dropout(model, self.config.model.dropout_rate)
        return model

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

    def _claim(self) -> MetricsLog:
        if not self._claimed:
            if self.is_main_process:
                run_dir.claim(self.output_dir, self.config.to_dict(), self.config.output.overwrite_output_dir)
            self.backend.barrier()
            self._claimed = True
            self._log = MetricsLog(self.output_dir, self.is_main_process, self.config.output.report_to_tensorboard)
        return self._log

    def _write_json(self, name: str, data: Any) -> None:
        if self.is_main_process:
            with open(self.output_dir / name, "w") as f:
                json.dump(data, f, indent=2)

    # ----- training -----

    def train(self) -> Dict[str, Any]:
        """Run optimizer steps up to `training.max_steps`; returns a summary of the run."""
        cfg = self.config.training
        log = self._claim()
        self._say("{}\n{}\nmodel: {} ({:.1f}M parameters), task {}: {} training / {} validation examples, "
                  "prompts up to {} tokens, targets up to {}".format(
                      self.backend.description, self.plan.describe(), self.config.model.name,
                      self.num_params / 1e6,
                      self.task.name, len(self.train_tokens), len(self.eval_features) if self.eval_features is not None else 0,
                      self.lengths.source, self.lengths.target))
        batches = iter(self.order)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="training", unit="step",
                   disable=not self.is_main_process, dynamic_ncols=True)
        started, samples_done, first_step = time.perf_counter(), 0, self.step
        result, stopped_early = None, False
        while self.step < cfg.max_steps:
            batch = GlobalBatch([self.train_tokens.sample(i) for i in next(batches)])
            tick = time.perf_counter()
            result = self.backend.train_step(batch, self.step)
            elapsed = time.perf_counter() - tick
            self.step += 1
            samples_done += len(batch.samples)
            tokens = sum(len(s["input_ids"]) + len(s["labels"]) for s in batch.samples)
            record = {"step": self.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                      "samples_per_second": len(batch.samples) / elapsed, "tokens_per_second": tokens / elapsed,
                      "epoch": self.order.epoch + self.order.position / self.order.batches_per_epoch}
            log.log(record)
            bar.update(1)
            if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                bar.set_postfix(loss="{:.4f}".format(result.loss), lr="{:.2e}".format(result.lr),
                                samples_s="{:.1f}".format(samples_done / (time.perf_counter() - started)))
            eval_steps = self.eval_config.eval_steps
            if eval_steps and self.step % eval_steps == 0 and self.step < cfg.max_steps and self.eval_features is not None:
                self.evaluate()
                if self.best.should_stop:
                    stopped_early = True
                    self._say("early stopping at step {}: {} has not improved on {:.4f} (step {}) for {} "
                              "evaluations".format(self.step, self.best.metric, self.best.best,
                                                   self.best.best_step, self.best.evals_without_improvement))
                    break
        bar.close()
        seconds = time.perf_counter() - started
        summary = {"steps": self.step, "steps_this_run": self.step - first_step, "train_seconds": seconds,
                   "samples_per_second": samples_done / seconds if seconds else 0.0,
                   "final_loss": result.loss if result else None, "stopped_early": stopped_early,
                   "best_metric": self.best_metric, "best_step": self.best_step}
        return summary

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

    # ----- validation -----

    def evaluate(self) -> Dict[str, Any]:
        """Greedy generation over the validation split, scored by the metric; writes
        eval_results.json and eval_predictions.jsonl."""
        if self.eval_features is None:
            raise UserError("no evaluation data: set validation.do_eval=true or pass eval_dataset.")
        log = self._claim()
        rows = self.eval_features.to_list()
        max_new_tokens = self.eval_config.max_new_tokens or self.lengths.target
        batch_size = self.eval_config.per_device_eval_batch_size
        # Longest first: similar lengths share a batch, so little padding is generated over.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
        generated: List[List[int]] = [[] for _ in rows]
        started = time.perf_counter()
        with tqdm(total=len(rows), desc="validation", unit="sample", disable=not self.is_main_process,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                for index, ids in zip(chunk, self.backend.generate([rows[i] for i in chunk], max_new_tokens)):
                    generated[index] = ids
                bar.update(len(chunk))
        seconds = time.perf_counter() - started
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        predictions = self.postprocess(texts)
        references = [r["reference"] for r in rows]
        result: Dict[str, Any] = dict(self.metric.compute(predictions=predictions, references=references))
        result.update({"num_samples": len(rows), "step": self.step, "eval_seconds": seconds,
                       "samples_per_second": len(rows) / seconds if seconds else 0.0})
        result.update(self.task.report(predictions, references))
        self.best.update(result, self.step)
        result.update({"best_metric": self.best_metric, "best_step": self.best_step, "is_best": self.last_eval_is_best})
        self.last_eval = result
        self._write_json("eval_results.json", result)
        if self.is_main_process:
            with open(self.output_dir / "eval_predictions.jsonl", "w") as f:
                targets = self.tokenizer.batch_decode([r["labels"] for r in rows], skip_special_tokens=True)
                for row, text, prediction, target in zip(rows, texts, predictions, targets):
                    f.write(json.dumps({"prompt": row["prompt"], "generated": text, "target": target,
                                        "prediction": prediction, "reference": row["reference"]}) + "\n")
        log.log({"step": self.step, **{k: v for k, v in result.items() if isinstance(v, (int, float))}}, prefix="eval")
        return result

    # ----- checkpoints and export -----

    def save_checkpoint(self, path: Union[str, Path]) -> Path:
        """A layout-free training checkpoint (weights, optimizer, step, data order) at `path`."""
        self._claim()
        model_state = self.backend.model_state_dict()
        optimizer_state = self.backend.optimizer_state_dict()
        if self.is_main_process:
            save_checkpoint(Path(path), model_state, optimizer_state,
                            {"step": self.step, "data_order": self.order.state_dict(),
                             "best_metric": self.best.state_dict()},
                            self.config.to_dict(), self.hf_config, self.tokenizer)
        self.backend.barrier()
        return Path(path)

    def save_hf_checkpoint(self, hf_path: Union[str, Path, None] = None,
                           ckpt_path: Union[str, Path, None] = None) -> Path:
        """Export a plain Hugging Face checkpoint to `hf_path` (default `<output-dir>/hf`) and,
        when given, a training checkpoint to `ckpt_path`."""
        self._claim()
        hf_path = Path(hf_path) if hf_path else self.output_dir / "hf"
        state = self.backend.model_state_dict()
        if self.is_main_process:
            write_hf_checkpoint(hf_path, state, self.hf_config, self.tokenizer, self.config.to_dict(),
                                self.last_eval, self.eval_config.max_new_tokens or self.lengths.target)
        if ckpt_path:
            self.save_checkpoint(ckpt_path)
        self.backend.barrier()
        return hf_path

    def close(self) -> None:
        """Flush logs and release the backend."""
        if self._log is not None:
            self._log.close()
        self.backend.close()
