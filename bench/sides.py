"""The sides of the comparison, each run in a process of its own by `bench/compare.py --worker`.

Every side gets the same spec: the same exported checkpoint and tokenizer, the same jsonl data,
the same global batch, steps, optimizer settings, validation batch size and new-token cap. Each
trains one epoch of the training file from the checkpoint (so every side processes exactly the
same examples, in its own order), then validates the checkpoint's own weights by greedy
generation (so every side validates identical weights and must score identically).

Training throughput is measured the same way on every side: from the start of the first step to
the end of the last, over the real (non-padding) prompt and target tokens of all steps.
Validation is the time from asking for predictions to having the accuracy. Both are also given
per CPU-second of the process, which a machine shared with other work disturbs less.
"""
import resource
import time
from typing import Any, Dict, List

from ipu_t5.data.batching import IGNORE_INDEX
from ipu_t5.models import TIED_ALIASES


class Clock:
    """Wall and CPU time of a span of work."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self._started = None

    def start(self) -> None:
        if self._started is None:
            self._started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        wall, cpu = self._started
        self.wall, self.cpu = time.perf_counter() - wall, time.process_time() - cpu


class Steps:
    """Real tokens and loss of every training step, and the time from the first step's start to
    the last step's end."""

    def __init__(self):
        self.clock = Clock()
        self.tokens: List[int] = []
        self.losses: List[float] = []

    def figures(self) -> Dict[str, float]:
        if not self.tokens or len(self.losses) != len(self.tokens):
            raise RuntimeError("counted {} steps' tokens and {} losses".format(len(self.tokens), len(self.losses)))
        total = sum(self.tokens)
        return {"train_tokens_per_second": total / self.clock.wall, "train_tokens_per_cpu_second": total / self.clock.cpu,
                "train_steps": len(self.tokens), "train_tokens": total, "mean_loss": sum(self.losses) / len(self.losses)}


def eval_figures(clock: Clock, samples: int, accuracy: float) -> Dict[str, float]:
    return {"eval_samples_per_second": samples / clock.wall, "eval_samples_per_cpu_second": samples / clock.cpu,
            "eval_samples": samples, "accuracy": accuracy}


def peak_rss_mb() -> float:
    """This process's peak resident memory.

    Linux's VmHWM, the high-water mark of this program's own address space: ru_maxrss also
    counts the pages of the parent that forked it before exec, which would floor every side at
    the parent's size. ru_maxrss (KiB on Linux) elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory() -> Dict[str, float]:
    """Peak host memory, and on a GPU the peak memory torch allocated there."""
    import torch

    peaks = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        peaks["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return peaks


def _checkpoint_weights(spec: Dict[str, Any]):
    from safetensors.torch import load_file

    return load_file(spec["checkpoint"] + "/model.safetensors")


def run_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Train and validate with ipu_t5.T5Trainer."""
    from ipu_t5.config import load_config
    from ipu_t5.training.trainer import T5Trainer

    settings = dict(spec["ours_overrides"], **{"training." + k: v for k, v in spec["training"].items()})
    settings["training.bf16"] = "true" if spec["bf16"] else "false"
    trainer = T5Trainer(load_config(spec["model"], overrides=["{}={}".format(k, v) for k, v in settings.items()]))
    steps = Steps()
    inner = trainer.backend.train_step

    def timed_step(batch, step):
        steps.clock.start()
        result = inner(batch, step)
        steps.tokens.append(sum(len(s["input_ids"]) + len(s["labels"]) for s in batch.samples))
        steps.losses.append(result.loss)
        return result

    trainer.backend.train_step = timed_step
    trainer.train()
    steps.clock.stop()
    trainer.backend.load_model_state_dict(_checkpoint_weights(spec))
    clock = Clock()
    clock.start()
    results = trainer.evaluate()
    clock.stop()
    trainer.close()
    return dict(steps.figures(), **eval_figures(clock, results["num_samples"], results["accuracy"]), **peak_memory())


def peer_arguments(spec: Dict[str, Any], output_dir: str, group_by_length: bool):
    """Seq2SeqTrainingArguments for the spec, in the spelling of the installed transformers.

    The peer's best ordinary settings: length grouping (`group_by_length` in 4.x,
    `train_sampling_strategy="group_by_length"` in 5.x; both also group validation batches), its
    default optimizer (fused AdamW where 5.x picks it), no checkpoints, no reporting.
    """
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    fields = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    t = spec["training"]
    kwargs = dict(
        output_dir=output_dir, per_device_train_batch_size=t["global_batch_size"],
        per_device_eval_batch_size=spec["eval_batch_size"], max_steps=t["max_steps"],
        learning_rate=t["learning_rate"], weight_decay=t["weight_decay"], max_grad_norm=t["max_grad_norm"],
        lr_scheduler_type=t["lr_scheduler_type"], warmup_steps=t["warmup_steps"], seed=t["seed"],
        adam_beta1=t["adam_beta1"], adam_beta2=t["adam_beta2"], adam_epsilon=t["adam_epsilon"],
        logging_steps=t["logging_steps"], save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=spec["peer_dataloader_workers"], predict_with_generate=True,
        use_cpu=spec["device"] == "cpu", bf16=spec["bf16"],
    )
    if group_by_length:
        if "train_sampling_strategy" in fields:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    return Seq2SeqTrainingArguments(**kwargs)


def run_peer(spec: Dict[str, Any], group_by_length: bool = True) -> Dict[str, Any]:
    """Train with transformers.Seq2SeqTrainer, validate with its predict(predict_with_generate=True)."""
    import tempfile

    import datasets
    import evaluate
    from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                              TrainerCallback)

    from ipu_t5.tasks import get_task

    task = get_task("mnli")
    tokenizer = AutoTokenizer.from_pretrained(spec["checkpoint"])
    model = AutoModelForSeq2SeqLM.from_pretrained(spec["checkpoint"])

    def encode(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        features = tokenizer([task.source_text(r) for r in rows], max_length=512, truncation=True)
        features["labels"] = tokenizer(text_target=[task.target_text(r) for r in rows])["input_ids"]
        features["length"] = [len(ids) for ids in features["input_ids"]]
        return features

    splits = datasets.load_dataset("json", data_files={"train": spec["train_file"], "validation": spec["eval_file"]})
    train = splits["train"].map(encode, batched=True, remove_columns=splits["train"].column_names)
    validation = splits["validation"].map(encode, batched=True, remove_columns=splits["validation"].column_names)
    steps = Steps()

    def count_tokens(module, args, kwargs):
        if module.training:
            steps.tokens.append(int(kwargs["attention_mask"].sum()) + int((kwargs["labels"] != IGNORE_INDEX).sum()))

    def record_loss(module, args, kwargs, output):
        if module.training:
            steps.losses.append(float(output.loss.detach()))

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                steps.clock.stop()

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    model.register_forward_hook(record_loss, with_kwargs=True)
    trainer = Seq2SeqTrainer(model=model, args=peer_arguments(spec, tempfile.mkdtemp(prefix="peer-"), group_by_length),
                             train_dataset=train, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                             processing_class=tokenizer, callbacks=[StepTimes()])
    trainer.train()
    # Validate the checkpoint's weights, as ours does. An export stores the shared embedding once,
    # so its two tied aliases are the only names it may lack.
    loaded = model.load_state_dict(_checkpoint_weights(spec), strict=False)
    if loaded.unexpected_keys or not set(loaded.missing_keys) <= set(TIED_ALIASES):
        raise SystemExit("the peer did not load the shared checkpoint whole: missing {}, unexpected {}".format(
            loaded.missing_keys, loaded.unexpected_keys))
    metric = evaluate.load(task.metric_path)

    def texts(array):  # -100 pads rows of unequal length across batches
        return tokenizer.batch_decode([[t for t in row if t >= 0] for row in array.tolist()], skip_special_tokens=True)

    clock = Clock()
    clock.start()
    predicted = trainer.predict(validation, max_new_tokens=spec["max_new_tokens"])
    # Length grouping also orders the validation batches, and results come back in that order:
    # the references are the label ids that came back with them, as in a compute_metrics.
    predictions = task.postprocess(texts(predicted.predictions))
    references = task.postprocess(texts(predicted.label_ids))
    accuracy = metric.compute(predictions=predictions, references=references)["accuracy"]
    clock.stop()
    return dict(steps.figures(), **eval_figures(clock, len(references), accuracy), **peak_memory())


SIDES = {"ours": run_ours, "peer": run_peer,
         "peer-defaults": lambda spec: run_peer(spec, group_by_length=False)}
