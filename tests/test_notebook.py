"""The Paperspace notebook: it runs top to bottom offline with model_size="tiny", and its
plain-transformers cell runs on whichever stack executes it (4.x pipeline, 5.x generate)."""
import json
import subprocess
import sys

import pytest

from .conftest import ROOT, losses, subprocess_env

NOTEBOOK = ROOT / "notebooks" / "flan-t5-mnli.ipynb"


def cells():
    return json.loads(NOTEBOOK.read_text())["cells"]


def tagged(tag):
    found = [c for c in cells() if tag in c.get("metadata", {}).get("tags", [])]
    assert len(found) == 1, "exactly one cell must be tagged {!r}".format(tag)
    return "".join(found[0]["source"])


@pytest.mark.core
def test_notebook_parameters_default_to_xxl_and_it_never_imports_poptorch():
    namespace = {}
    exec(tagged("parameters"), namespace)
    assert namespace["model_size"] == "xxl"
    code = "\n".join("".join(c["source"]) for c in cells() if c["cell_type"] == "code")
    assert "import poptorch" not in code and "from poptorch" not in code
    for step in ("T5Trainer(config", ".train()", ".evaluate()", ".save_hf_checkpoint(",
                 'pipeline("text2text-generation"', "AutoModelForSeq2SeqLM"):
        assert step in code, step


@pytest.mark.core
def test_the_inference_cell_runs_the_export_on_this_stack(tmp_path):
    """The cell users copy: transformers 4.x takes the pipeline branch, 5.x the generate branch;
    either way it predicts what plain generate on the export predicts."""
    from ipu_t5.config import load_config
    from ipu_t5.checkpointing.export import reload_and_predict, write_hf_checkpoint
    from ipu_t5.model_source import build_model
    from ipu_t5.tasks import get_task
    from ipu_t5.tokenizer import load_tokenizer

    config = load_config("tiny")
    task = get_task("mnli")
    rows = task.demo_splits(1, 200, 3)["validation_mismatched"]
    prompts = [task.source_text(r) for r in rows]
    tokenizer = load_tokenizer(config, prompts + [task.source_text(r) for r in task.demo_splits(1, 200, 1)["train"]])
    model = build_model(config, len(tokenizer))
    hf_dir = write_hf_checkpoint(tmp_path / "hf", model.state_dict(), model.config, tokenizer, config.to_dict(),
                                 max_new_tokens=4).path
    script = "import json, sys\nfrom pathlib import Path\nhf_dir = Path(sys.argv[1])\nprompts = json.loads(sys.argv[2])\n" \
             + tagged("inference") + "\nprint('ANSWERS=' + json.dumps(answers))\n"
    result = subprocess.run([sys.executable, "-c", script, str(hf_dir), json.dumps(prompts)], capture_output=True,
                            text=True, timeout=300, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.split("ANSWERS=")[1])
    assert answers == reload_and_predict(hf_dir, prompts)
    assert "{} -> {}".format(prompts[0], answers[0]) in result.stdout


def _execute(tmp_path, monkeypatch, name, **parameters):
    """Run the notebook top to bottom in a fresh kernel (as "Run All" after a kernel restart); its
    code cells, each without an error."""
    papermill = pytest.importorskip("papermill", reason="executing the notebook needs papermill and a kernel")
    executed = tmp_path / "{}.ipynb".format(name)
    # The kernel imports this checkout's ipu_t5.
    monkeypatch.setenv("PYTHONPATH", subprocess_env()["PYTHONPATH"])
    papermill.execute_notebook(str(NOTEBOOK), str(executed), kernel_name="python3", progress_bar=False,
                               cwd=str(NOTEBOOK.parent), parameters=dict(parameters, model_size="tiny"))
    code_cells = [c for c in json.loads(executed.read_text())["cells"] if c["cell_type"] == "code"]
    assert all(o["output_type"] != "error" for c in code_cells for o in c.get("outputs", []))

    def stdout(fragment):
        cell = next(c for c in code_cells if fragment in "".join(c["source"]))
        return "".join("".join(o.get("text", "")) for o in cell["outputs"] if o.get("name") == "stdout")

    return code_cells, stdout


def test_notebook_runs_offline_top_to_bottom_with_the_tiny_model_and_again(tmp_path, monkeypatch):
    out = tmp_path / "run"
    code_cells, stdout = _execute(tmp_path, monkeypatch, "first", max_steps=40, output_dir=str(out))
    assert "Poplar SDK:" in stdout("POPLAR_SDK_ENABLED")
    assert "model tiny: 1 stage(s) x 1 replica(s), global batch 32, 40 steps" in stdout("load_config(model_size")
    assert "(run again: continue)" in stdout("load_config(model_size")
    accuracy = json.loads((out / "eval_results.json").read_text())["accuracy"]
    assert "validation accuracy: {:.2%}".format(accuracy) in stdout("trainer.evaluate()")
    assert accuracy > 0.5, "40 steps lift the tiny model well above chance (1/3) on the demo data"
    figures = next(c for c in code_cells if "plot_loss" in "".join(c["source"]))
    assert sum("image/png" in o.get("data", {}) for o in figures["outputs"]) == 2
    assert (out / "loss_curve.png").is_file() and (out / "eval_scores.png").is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "hf" / "model.safetensors").is_file()
    assert "plain transformers agrees with validation on 8/8 prompts" in stdout("same = sum(")
    assert "T5ForConditionalGeneration with" in stdout("finetuned = trainer.save_hf_checkpoint(")
    first_losses = losses(out)

    # Run All again, continuing (the default): the run resumes at its last step and trains on to
    # the new max_steps, every step logged once, the first 40 as they were.
    _, stdout = _execute(tmp_path, monkeypatch, "continued", max_steps=48, output_dir=str(out))
    continued = losses(out)
    assert sorted(continued) == list(range(1, 49))
    assert {step: continued[step] for step in first_losses} == first_losses
    assert json.loads((out / "eval_results.json").read_text())["step"] == 48
    assert "plain transformers agrees with validation on 8/8 prompts" in stdout("same = sum(")


def _configure(tmp_path, on_rerun):
    """The parameters and configuration cells run as the notebook runs them, on the tiny model."""
    namespace = {"repo": tmp_path, "num_ipus": 0}
    exec(tagged("parameters"), namespace)
    namespace.update(model_size="tiny", on_rerun=on_rerun)
    exec(next("".join(c["source"]) for c in cells()
              if c["cell_type"] == "code" and "load_config(model_size" in "".join(c["source"])), namespace)
    return namespace["config"]


@pytest.mark.core
def test_the_rerun_setting_continues_or_starts_over(tmp_path):
    """What a second "Run All" does is the visible `on_rerun` setting: "continue" (the default) is
    --resume auto (run a second time in the test above), "start over" is --overwrite; anything else
    is one line."""
    from ipu_t5.errors import UserError

    default = _configure(tmp_path, "continue")
    assert default.output.resume_from_checkpoint == "auto" and not default.output.overwrite_output_dir
    over = _configure(tmp_path, "start over")
    assert over.output.overwrite_output_dir and over.output.resume_from_checkpoint is None
    with pytest.raises(UserError, match='on_rerun must be "continue" or "start over"'):
        _configure(tmp_path, "again")
