"""LoRA through peft: only adapters train, checkpoints hold only them, the merged export computes
what the adapted model computes, and the adapter export reloads with peft, on both stacks."""
import json
import subprocess

import pytest
import torch

from ipu_t5 import lora
from ipu_t5.config import load_config
from ipu_t5.errors import UserError
from ipu_t5.models import SIZES

from .conftest import ROOT, losses, random_export, run_cli, sdk_python, tiny_overrides

pytest.importorskip("peft", reason="LoRA needs peft (in setup.py; installed on both stacks)")

STEPS = 8


def lora_config(output_dir, **values):
    settings = {"peft.method": "lora", "peft.r": 4, "peft.lora_alpha": 8, "data.demo_train_samples": 400,
                "data.demo_eval_samples": 24, "training.max_steps": STEPS, "training.global_batch_size": 16}
    settings.update(values)
    return load_config("tiny", overrides=tiny_overrides(output_dir, **settings))


@pytest.fixture(scope="module")
def base_export(tmp_path_factory):
    """A tiny T5 exported as a plain Hugging Face checkpoint: the pretrained model LoRA adapts."""
    config = load_config("tiny", overrides=tiny_overrides(tmp_path_factory.mktemp("base") / "run"))
    return random_export(config, tmp_path_factory.mktemp("base") / "hf")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_export):
    """LoRA fine-tuning of the base export for a few steps, exported and checkpointed."""
    from ipu_t5.training.trainer import T5Trainer

    out = tmp_path_factory.mktemp("lora") / "run"
    config = lora_config(out, **{"model.pretrained": str(base_export)})
    trainer = T5Trainer(config)
    model = trainer.backend.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    hf_dir = trainer.export_hf()
    checkpoint = trainer.save_checkpoint(out / "checkpoints" / "final")
    sample = trainer.eval_features[0]
    inputs = {"input_ids": torch.tensor([sample["input_ids"]]),
              "decoder_input_ids": torch.tensor([[0] + sample["labels"][:-1]])}
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
    yield {"config": config, "trainer": trainer, "before": before, "hf_dir": hf_dir, "checkpoint": checkpoint,
           "adapter_dir": out / "adapter", "inputs": inputs, "adapted": adapted, "base": base_export}
    trainer.close()


def logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


@pytest.mark.core
def test_only_the_adapter_parameters_train(lora_run):
    trainer, config = lora_run["trainer"], lora_run["config"]
    size, peft = SIZES["tiny"], config.peft
    attention_modules = size.num_layers + 2 * size.num_decoder_layers  # decoder: self and cross attention
    expected = attention_modules * len(peft.target_modules) * peft.r * (size.d_model + size.inner_dim)
    model = trainer.backend.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainer.num_trainable == sum(p.numel() for p in trainable.values()) == expected
    assert all(lora.is_adapter_key(n) for n in trainable)
    assert trainer.num_params == sum(p.numel() for p in model.parameters()) > 10 * expected
    optimized = {id(p) for group in trainer.backend.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainable.values()}
    after = model.state_dict()
    for name, value in lora_run["before"].items():
        if lora.is_adapter_key(name):
            if ".lora_B." in name:  # B starts at zero, so every B that trained moved
                assert not torch.equal(value, after[name]), name
        else:
            assert torch.equal(value, after[name]), "frozen weight {} changed".format(name)


@pytest.mark.core
def test_merged_export_computes_the_adapted_models_logits(lora_run):
    from safetensors import safe_open
    from transformers import AutoModelForSeq2SeqLM

    hf_dir = lora_run["hf_dir"]
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "lora" not in " ".join(names) and "base_layer" not in " ".join(names)
    assert "lm_head.weight" in names
    assert json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"] is False
    merged = logits(AutoModelForSeq2SeqLM.from_pretrained(str(hf_dir)), lora_run["inputs"])
    base = logits(AutoModelForSeq2SeqLM.from_pretrained(str(lora_run["base"])), lora_run["inputs"])
    assert close(lora_run["adapted"], merged)
    assert not close(lora_run["adapted"], base), "the adapters changed nothing, so the test proves nothing"
    assert "Fine-tuned with LoRA (r=4" in (hf_dir / "README.md").read_text()


@pytest.mark.core
def test_adapter_export_reloads_with_peft(lora_run):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSeq2SeqLM

    adapter_dir = lora_run["adapter_dir"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(lora_run["base"])
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, ["q", "v"])
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert len(names) == 2 * 12 and all(n.startswith("base_model.model.") and ".lora_" in n for n in names)
    base = AutoModelForSeq2SeqLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    assert close(lora_run["adapted"], logits(model, lora_run["inputs"]))
    plain = model.merge_and_unload()
    assert close(lora_run["adapted"], logits(plain, lora_run["inputs"]))


@pytest.mark.core
def test_checkpoint_holds_only_adapters_and_exports_like_the_run(lora_run, tmp_path):
    from safetensors.torch import load_file

    from ipu_t5.cli import main

    checkpoint = lora_run["checkpoint"]
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert weights and all(lora.is_adapter_key(k) for k in weights)
    assert len(weights) == 2 * 12
    from ipu_t5 import checkpointing as checkpoints

    assert set(checkpoints.inspect(checkpoint).optimizer_state()) == set(weights)
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    original = load_file(str(lora_run["hf_dir"] / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(torch.allclose(exported[k], original[k], atol=1e-6) for k in original)
    assert (tmp_path / "hf-adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.core
def test_lora_on_a_random_tiny_model_trains_and_records_no_base(tmp_path):
    """The tiny demo has no saved base: the adapter says so, and a checkpoint export rebuilds the
    seeded base from the run's config."""
    from safetensors.torch import load_file

    from ipu_t5.cli import main
    from ipu_t5.training.trainer import T5Trainer

    config = lora_config(tmp_path / "run", **{"training.max_steps": 3, "validation.do_eval": False})
    trainer = T5Trainer(config)
    trainer.train()
    hf_dir = trainer.export_hf(ckpt_path=tmp_path / "run" / "checkpoints" / "final")
    trainer.close()
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] is None
    assert "seeded random initialisation" in (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert main(["export", str(tmp_path / "run" / "checkpoints" / "final"), "--out", str(tmp_path / "again")]) == 0
    again, original = load_file(str(tmp_path / "again" / "model.safetensors")), load_file(str(hf_dir / "model.safetensors"))
    assert all(torch.allclose(again[k], original[k], atol=1e-6) for k in original)


@pytest.mark.core
def test_peft_settings_are_typed_config_keys(tmp_path):
    config = lora_config(tmp_path, **{"peft.target_modules": "q,k,v,o", "peft.rank": 8, "peft.alpha": 16,
                                      "peft.dropout": 0.1})
    assert (config.peft.target_modules, config.peft.r, config.peft.lora_alpha, config.peft.lora_dropout) == (
        ["q", "k", "v", "o"], 8, 16.0, 0.1)
    assert load_config("tiny").peft.method == "none"
    assert load_config("tiny").peft.target_modules == ["q", "v"]


@pytest.mark.core
@pytest.mark.parametrize("values, message", [
    ({"peft.method": "qlora"}, "peft.method must be one of none, lora"),
    ({"peft.r": 0}, "peft.r must be a positive integer"),
    ({"peft.lora_alpha": 0}, "peft.lora_alpha must be positive"),
    ({"peft.lora_dropout": 1.0}, r"peft.lora_dropout must be in \[0, 1\)"),
    ({"peft.target_modules": "[]"}, "peft.target_modules is empty"),
])
def test_bad_peft_settings_are_refused(tmp_path, values, message):
    with pytest.raises(UserError, match=message):
        lora_config(tmp_path, **values)


@pytest.mark.core
def test_target_modules_the_model_lacks_are_a_user_error(tmp_path):
    from ipu_t5.training.trainer import T5Trainer

    config = lora_config(tmp_path / "run", **{"peft.target_modules": "query,value", "validation.do_eval": False})
    with pytest.raises(UserError, match=r"\['query', 'value'\] does not name layers of this model.*q, k, v, o"):
        T5Trainer(config)


def test_cli_lora_run_reports_the_adapter(tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", "--model", "tiny", "--peft", "lora"]
                     + sum((["--set", s] for s in tiny_overrides(out, **{"training.max_steps": 4, "peft.r": 4,
                                                                         "data.demo_train_samples": 200,
                                                                         "data.demo_eval_samples": 16})), []))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA r=4 alpha=32 on q, v" in result.stdout
    assert "trainable parameters" in result.stdout and "(LoRA adapters)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_parameters"] == 12 * 4 * 256 and summary["adapter"] == str(out / "adapter")
    assert summary["export_predictions_identical"] == summary["export_predictions_checked"] == 16
    assert (out / "adapter" / "adapter_config.json").is_file()


SDK_CHECK = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM
hf_dir, adapter_dir, inputs_path = sys.argv[1:4]
inputs = torch.load(inputs_path)
with torch.no_grad():
    merged = AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()(**inputs).logits
    base = AutoModelForSeq2SeqLM.from_pretrained(json.load(open(adapter_dir + "/adapter_config.json"))["base_model_name_or_path"])
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()(**inputs).logits
torch.save({"merged": merged, "adapted": adapted}, inputs_path + ".out")
"""


@pytest.mark.skipif(sdk_python() is None, reason="IPU_T5_SDK_PYTHON (the Poplar SDK's stack) is not set up")
def test_lora_exports_load_on_the_sdk_stack(lora_run, tmp_path):
    inputs = tmp_path / "inputs.pt"
    torch.save(lora_run["inputs"], str(inputs))
    result = subprocess.run([sdk_python(), "-c", SDK_CHECK, str(lora_run["hf_dir"]), str(lora_run["adapter_dir"]),
                             str(inputs)], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(str(inputs) + ".out")
    assert close(lora_run["adapted"], out["merged"]) and close(lora_run["adapted"], out["adapted"])


@pytest.mark.core
def test_a_lora_run_resumes_exactly_from_its_adapter_checkpoint(base_export, tmp_path):
    """A LoRA checkpoint holds only the adapters; resuming rebuilds the base from the run's starting
    point and continues the uninterrupted run: the same losses and the same adapters."""
    from ipu_t5 import checkpointing
    from ipu_t5.training.trainer import T5Trainer

    def run(out, steps, **extra):
        values = {"model.pretrained": str(base_export), "training.max_steps": steps, "output.save_steps": 5,
                  "validation.do_eval": "false"}
        values.update(extra)
        T5Trainer(lora_config(out, **values)).train()
        return list(losses(out).values())

    straight = run(tmp_path / "straight", 10)
    first = run(tmp_path / "stopped", 5)
    resumed = run(tmp_path / "stopped", 10, **{"output.resume_from_checkpoint": "auto"})
    assert first == straight[:5] and resumed == straight
    final = [checkpointing.inspect(checkpointing.step_path(tmp_path / name, 10)).model_tensors()
             for name in ("straight", "stopped")]
    assert set(final[0]) == set(final[1]) and all(lora.is_adapter_key(k) for k in final[0])
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name
