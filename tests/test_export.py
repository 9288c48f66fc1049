"""`ipu-t5 export`: sharded safetensors, dtypes, the reload check, and training from an export."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ipu_t5 import checkpoint
from ipu_t5.cli import main
from ipu_t5.config import load_config
from ipu_t5.data.batching import collate
from ipu_t5.export import parity_batch, reload_and_predict
from ipu_t5.trainer import T5Trainer

from .conftest import ROOT, sdk_python, tiny_overrides


@pytest.fixture(scope="module")
def ckpt(trained, tmp_path_factory):
    """A training checkpoint of the session's trained tiny model."""
    return trained["trainer"].save_checkpoint(tmp_path_factory.mktemp("export") / "ckpt")


def trainer_logits(trainer, batch):
    """Logits of the trainer's own model (the single-process backend's) on a collated batch."""
    model = trainer.backend.model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=batch["decoder_input_ids"]).logits


@pytest.mark.core
def test_sharded_export_reloads_with_the_trainers_logits_and_predictions(trained, ckpt, tmp_path, capsys):
    from transformers import AutoModelForSeq2SeqLM

    trainer = trained["trainer"]
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(out), "--max-shard-size", "1MB"]) == 0
    printed = capsys.readouterr().out
    assert "reloaded with transformers" in printed and "match the trainer's (max |difference|" in printed

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert all((out / name).stat().st_size <= 1000 * 1000 + 10 * 1000 for name in shards)
    stored = {}
    for name in shards:
        stored.update(load_file(str(out / name)))
    expected = checkpoint.inspect(ckpt).model_tensors()
    assert set(stored) == set(index["weight_map"]) == {k for k in expected if "embed_tokens" not in k}
    assert not torch.equal(stored["lm_head.weight"], stored["shared.weight"])
    for name, tensor in stored.items():
        assert torch.equal(tensor, expected[name]), name
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == trainer.lengths.target
    assert (out / "README.md").is_file() and (out / "tokenizer_config.json").is_file()

    rows = trainer.eval_features.to_list()[:16]
    batch = collate(rows, trainer.hf_config.pad_token_id)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        reloaded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         decoder_input_ids=batch["decoder_input_ids"]).logits
    torch.testing.assert_close(reloaded, trainer_logits(trainer, batch), atol=1e-5, rtol=0)

    predictions = [json.loads(line) for line in open(str(trained["output_dir"] / "eval_predictions.jsonl"))][:64]
    assert reload_and_predict(out, [p["prompt"] for p in predictions]) == [p["generated"] for p in predictions]


@pytest.mark.core
def test_bfloat16_export(ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        lm_head = f.get_tensor("lm_head.weight")
    assert torch.equal(lm_head, checkpoint.inspect(ckpt).model_tensors()["lm_head.weight"].to(torch.bfloat16))


@pytest.mark.core
def test_an_export_that_reloads_as_another_model_is_not_written(ckpt, tmp_path, monkeypatch, capsys):
    """The classic broken Flan-T5 export: config.json says the head is tied. transformers loads it
    without complaint; the reload check refuses it and nothing appears at --out."""
    from ipu_t5 import export

    untied = export.export_config_dict

    def tied(config, dtype):
        data = untied(config, dtype)
        data["tie_word_embeddings"] = True
        return data

    monkeypatch.setattr(export, "export_config_dict", tied)
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(out)]) == 2
    assert "the export does not reload as the trained model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.core
def test_export_of_a_run_directory_uses_its_newest_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(trained["output_dir"]), "--out", str(out)]) == 0
    newest = checkpoint.step_path(trained["output_dir"], trained["trainer"].step)
    assert "(from {}, step {})".format(newest, trained["trainer"].step) in capsys.readouterr().out
    # The validation that followed training is recorded in the checkpoint and reaches the model card.
    assert "| accuracy | {} |".format(round(trained["results"]["accuracy"], 4)) in (out / "README.md").read_text()


@pytest.mark.core
def test_bad_shard_size_is_one_line(ckpt, tmp_path, capsys):
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--max-shard-size", "big"]) == 2
    assert "--max-shard-size 'big' is not a size" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.core
def test_training_continues_from_a_sharded_export(trained, ckpt, tmp_path):
    export_dir = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(export_dir), "--max-shard-size", "1MB"]) == 0
    config = load_config("tiny", overrides=tiny_overrides(tmp_path / "run", **{
        "model.pretrained": str(export_dir), "training.max_steps": 2, "validation.do_eval": "false"}))
    trainer = T5Trainer(config)
    original = trained["trainer"].backend.model_state_dict()
    for name, tensor in trainer.backend.model_state_dict().items():
        assert torch.equal(tensor, original[name]), name
    prompt = trained["trainer"].eval_features[0]["prompt"]
    assert trainer.tokenizer(prompt).input_ids == trained["trainer"].tokenizer(prompt).input_ids
    # A fine-tuned start, not a random one (whose first loss is above 5 on this data).
    assert trainer.train()["final_loss"] < 1.0


def test_export_loads_with_the_same_logits_on_the_sdk_stack(trained, ckpt, tmp_path):
    """An export written here (transformers 5.x) computes the same logits under the Poplar SDK's
    transformers 4.46.3, sharded and with the untied head."""
    python = sdk_python()
    if python is None:
        pytest.skip("IPU_T5_SDK_PYTHON is not set to the SDK stack's Python (./run.sh test sets it)")
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(out), "--max-shard-size", "1MB"]) == 0
    trainer = trained["trainer"]
    batch = parity_batch(trainer.hf_config)
    torch.save(trainer_logits(trainer, batch), str(tmp_path / "reference.pt"))
    script = (
        "import sys, torch, transformers\n"
        "from transformers import AutoModelForSeq2SeqLM\n"
        "from ipu_t5.export import parity_batch\n"
        "model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    logits = model(**parity_batch(model.config)).logits\n"
        "print(transformers.__version__, float((logits - torch.load(sys.argv[2])).abs().max()))\n")
    done = subprocess.run([python, "-c", script, str(out), str(tmp_path / "reference.pt")], cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    version, difference = done.stdout.split()[-2:]
    assert version.startswith("4.") and float(difference) <= 1e-5
