"""Shared fixtures. Markers:

- `core`: also runs on the Poplar SDK's stack (torch 2.0.1, transformers 4.46.3) in `./run.sh test`.
- `slow`: multi-process or long; still run by `./run.sh test` and CI, deselect with `-m "not slow"`.
- `ipu`: needs Graphcore IPUs (poptorch reporting hardware); skipped, with that reason, elsewhere.
"""
import json
import os
import sys
from pathlib import Path
from typing import Dict

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "core: runs on both stacks, including the Poplar SDK's (transformers 4.46.3)")
    config.addinivalue_line("markers", "slow: multi-process or long-running; run in CI")
    config.addinivalue_line("markers", "ipu: needs Graphcore IPUs; skipped where poptorch reports none")


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Trained demo tokenizers go to a per-session cache, never the user's."""
    os.environ["IPU_T5_CACHE"] = str(tmp_path_factory.mktemp("ipu_t5_cache"))


def cpu_has_float16_matmul() -> bool:
    """Whether this torch multiplies float16 matrices on the CPU (torch 2.0.1 does not)."""
    import torch

    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
    except RuntimeError:
        return False
    return True


def losses(output_dir) -> Dict[int, float]:
    """Training loss by step, from a run's metrics.jsonl (validation records have no learning
    rate); a step logged twice fails the test."""
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "lr" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records if "lr" in r}


def tiny_overrides(output_dir, **values):
    """`--set` strings for a small, fast tiny run writing to `output_dir`."""
    settings = {
        "output.output_dir": str(output_dir),
        "output.report_to_tensorboard": "false",
        "data.demo_train_samples": 1200,
        "data.demo_eval_samples": 120,
        "training.max_steps": 20,
        "training.global_batch_size": 16,
        "training.logging_steps": 5,
    }
    settings.update(values)
    return ["{}={}".format(k, v) for k, v in settings.items()]


@pytest.fixture
def make_config(tmp_path):
    """Build a validated tiny RunConfig: `make_config(**{"training.max_steps": 5})`."""
    from ipu_t5.config import load_config

    def build(output_dir=None, **values):
        return load_config("tiny", overrides=tiny_overrides(output_dir or tmp_path / "run", **values))

    return build


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny model trained once for the session (long enough to predict well), evaluated and
    exported; tests read its trainer, results and export."""
    from ipu_t5.config import load_config
    from ipu_t5.training.trainer import T5Trainer

    out = tmp_path_factory.mktemp("trained") / "run"
    config = load_config("tiny", overrides=tiny_overrides(out, **{
        "data.demo_train_samples": 3000, "data.demo_eval_samples": 150, "training.max_steps": 200,
        "training.global_batch_size": 32}))
    trainer = T5Trainer(config)
    trainer.train()
    results = trainer.evaluate()
    finetuned = trainer.save_hf_checkpoint()
    return {"trainer": trainer, "results": results, "hf_dir": trainer.hf_path, "finetuned": finetuned,
            "output_dir": out}


def random_export(config, out, **dims):
    """A plain Hugging Face checkpoint at `out` of random weights drawn by name under
    `training.seed`, with the demo tokenizer trained on the MNLI demo's texts: `config`'s size, or its
    dimensions replaced by `dims` (d_model=96, num_layers=3, ...). Returns the export's path."""
    from transformers import T5Config

    from ipu_t5.checkpointing.export import write_hf_checkpoint
    from ipu_t5.model_source import run_source
    from ipu_t5.tasks import get_task
    from ipu_t5.tokenizer import load_tokenizer

    task = get_task("mnli")
    rows = task.demo_splits(config.training.seed, 400, 1)["train"]
    tokenizer = load_tokenizer(config, [task.source_text(r) for r in rows] + [task.target_text(r) for r in rows])
    source = run_source(config, len(tokenizer))
    if dims:
        source.hf_config = T5Config(**dict(source.hf_config.to_dict(), **dims))
    source.peft = None
    model = source.build()
    return write_hf_checkpoint(Path(out), model.state_dict(), model.config, tokenizer, config.to_dict()).path


def subprocess_env(**extra: str) -> Dict[str, str]:
    """This process's environment for a child that imports this checkout's ipu_t5 (and tests)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(args, cwd=None, env=None, timeout=600):
    """Run `python -m ipu_t5 ARGS` in a subprocess; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "ipu_t5"] + list(args), cwd=str(cwd or ROOT),
                          env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=timeout)


def sdk_python():
    """The Python of the Poplar SDK's stack (torch 2.0.1, transformers 4.46.3), if set up."""
    path = os.environ.get("IPU_T5_SDK_PYTHON")
    return path if path and Path(path).is_file() else None
