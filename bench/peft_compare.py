"""Full fine-tuning, LoRA, LoRA on a quantised base and soft prompts side by side.

    python bench/peft_compare.py [--steps 40] [--methods full lora prompt] [--json]

For each method: trainable parameters and the memory plan's peak for flan-t5-base's shape in one
process (`ipu-t5 plan --backend single`: float32 weights, gradients and AdamW moments of what trains,
activations at 128 prompt / 8 target tokens, micro-batch 8, on a GPU, bfloat16 autocast), then a
short `ipu-t5 train` of the tiny demo (random base weights, generated MNLI-shaped data) for its
training speed and validation accuracy. Numbers are printed, never asserted.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS: Dict[str, List[str]] = {
    "full": [],
    "lora": ["peft.method=lora", "training.learning_rate=3e-3"],
    "lora-nf4": ["peft.method=lora", "training.learning_rate=3e-3", "model.quantization=nf4"],
    "prompt": ["peft.method=prompt_tuning", "peft.prompt_tuning_init=text",
               "peft.prompt_tuning_init_text=mnli hypothesis premise entailment neutral contradiction",
               "training.learning_rate=0.3"],
}
LABELS = {"full": "full fine-tuning", "lora": "LoRA r=16 on q,v", "lora-nf4": "LoRA r=16 on q,v, nf4 base",
          "prompt": "soft prompt, 20 virtual tokens"}


def planned(method: str) -> Dict[str, float]:
    """The memory plan of flan-t5-base's shape in one process for `method`."""
    from ipu_t5.backends.torch_distributed.memory import plan_memory
    from ipu_t5.config import load_config

    config = load_config("base", overrides=["layout.backend=single", "training.global_batch_size=8"] + METHODS[method])
    rank = plan_memory(config, 128, 8, "gpu").ranks[0]
    return {"trainable": rank.trainable, "params": rank.params, "peak_gb": rank.peak / 1e9,
            "training_gb": rank.training / 1e9}


def trained(method: str, steps: int, workdir: Path) -> Dict[str, float]:
    """A short tiny-demo run of `method`: training samples per second and validation accuracy."""
    out = workdir / method
    command = [sys.executable, "-m", "ipu_t5", "train", "--model", "tiny", "--output-dir", str(out), "--overwrite",
               "--max-steps", str(steps)]
    for value in ["training.global_batch_size=16", "data.demo_train_samples=1200", "data.demo_eval_samples=120",
                  "output.report_to_tensorboard=false", "output.save_steps={}".format(steps)] + METHODS[method]:
        command += ["--set", value]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, cwd=str(ROOT), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "exit {}".format(
            done.returncode)}
    summary = json.loads((out / "summary.json").read_text())
    return {"samples_per_second": summary["samples_per_second"], "final_loss": summary["final_loss"],
            "accuracy": summary.get("accuracy")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    started = time.time()
    load_before = " ".join("{:.2f}".format(x) for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            row = {"method": LABELS[method], "plan": planned(method)}
            row.update(trained(method, args.steps, Path(tmp)))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("{} steps of global batch 16 on the tiny demo each, {:.0f} s in all; load average {} at the start, {} at "
          "the end (the machine is shared)".format(args.steps, time.time() - started, load_before,
                                                   " ".join("{:.2f}".format(x) for x in os.getloadavg())))
    print("| method | trainable (base shape) | plan peak GB (base, 1 GPU) | tiny samples/s | tiny final loss | "
          "tiny accuracy |\n|---|---|---|---|---|---|")
    for r in rows:
        plan = r["plan"]
        if "error" in r:
            tail = "- | - | {} |".format(r["error"])
        else:
            tail = "{:.1f} | {:.4f} | {:.1%} |".format(r["samples_per_second"], r["final_loss"], r["accuracy"])
        print("| {} | {:,} ({:.2%}) | {:.2f} | {}".format(r["method"], plan["trainable"],
                                                          plan["trainable"] / plan["params"], plan["peak_gb"], tail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
