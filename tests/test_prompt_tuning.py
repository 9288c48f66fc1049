"""Soft prompts (peft.method=prompt_tuning) in one process: only the prompt trains, the loss falls,
checkpoints hold only the prompt and resume exactly, and the adapter export loads in plain peft over
the run's hf/ base and predicts what validation predicted, on both stacks."""
import json
import subprocess

import pytest
import torch

from ipu_t5 import lora
from ipu_t5.config import load_config
from ipu_t5.errors import UserError
from ipu_t5.models import SIZES
from ipu_t5.prompt_tuning import PROMPT_KEY, init_ids

from .conftest import ROOT, losses, sdk_python, tiny_overrides

pytest.importorskip("peft", reason="prompt tuning's export needs peft (in setup.py; installed on both stacks)")

VIRTUAL = 5
INIT_TEXT = "premise and hypothesis"


def prompt_config(output_dir, **values):
    settings = {"peft.method": "prompt_tuning", "peft.num_virtual_tokens": VIRTUAL, "peft.prompt_tuning_init": "text",
                "peft.prompt_tuning_init_text": INIT_TEXT, "data.demo_train_samples": 400,
                "data.demo_eval_samples": 24, "training.max_steps": 10, "training.global_batch_size": 16,
                "training.learning_rate": 0.3, "training.logging_steps": 1}
    settings.update(values)
    return load_config("tiny", overrides=tiny_overrides(output_dir, **settings))


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory):
    """A soft prompt trained for a few steps on the tiny demo, validated, exported and checkpointed."""
    from ipu_t5.training.trainer import T5Trainer

    out = tmp_path_factory.mktemp("prompt") / "run"
    trainer = T5Trainer(prompt_config(out))
    before = {k: v.clone() for k, v in trainer.backend.model_state_dict().items()}
    trainer.train()
    trainer.evaluate()
    hf_dir = trainer.export_hf()
    checkpoint = trainer.save_checkpoint(out / "checkpoints" / "final")
    after = trainer.backend.model_state_dict()
    predictions = [json.loads(line) for line in open(out / "eval_predictions.jsonl")]
    yield {"trainer": trainer, "before": before, "after": after, "hf_dir": hf_dir, "checkpoint": checkpoint,
           "adapter_dir": out / "adapter", "predictions": predictions, "out": out}
    trainer.close()


@pytest.mark.core
def test_only_the_prompt_trains_from_its_text_and_the_loss_falls(prompt_run):
    trainer, before, after = prompt_run["trainer"], prompt_run["before"], prompt_run["after"]
    d_model = SIZES["tiny"].d_model
    assert trainer.num_trainable == 2 * VIRTUAL * d_model
    assert [n for n, p in trainer.backend.model.named_parameters() if p.requires_grad] == [PROMPT_KEY]
    # peft's text initialisation: the text's ids repeated to 2 x virtual tokens, their word embeddings.
    ids = init_ids(trainer.tokenizer(INIT_TEXT)["input_ids"], 2 * VIRTUAL)
    assert torch.equal(before[PROMPT_KEY], before["shared.weight"][torch.tensor(ids)])
    assert not torch.equal(before[PROMPT_KEY], after[PROMPT_KEY])
    assert all(torch.equal(before[k], after[k]) for k in before if k != PROMPT_KEY)
    logged = list(losses(prompt_run["out"]).values())
    assert sum(logged[-3:]) / 3 < sum(logged[:3]) / 3 - 0.5, logged


@pytest.mark.core
def test_the_adapter_loads_in_plain_peft_and_predicts_as_validation_did(prompt_run):
    from safetensors.torch import load_file

    from ipu_t5.checkpointing.export import reload_and_predict

    adapter_dir, hf_dir = prompt_run["adapter_dir"], prompt_run["hf_dir"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"], config["token_dim"],
            config["num_transformer_submodules"], config["prompt_tuning_init"]) == (
        "PROMPT_TUNING", "SEQ_2_SEQ_LM", VIRTUAL, SIZES["tiny"].d_model, 2, "TEXT")
    assert config["base_model_name_or_path"] == str(hf_dir.resolve())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert list(tensors) == [PROMPT_KEY] and torch.equal(tensors[PROMPT_KEY], prompt_run["after"][PROMPT_KEY])
    # The run's hf/ is the base: no prompt in it, the base's weights unchanged.
    base = load_file(str(hf_dir / "model.safetensors"))
    assert PROMPT_KEY not in base and torch.equal(base["shared.weight"], prompt_run["before"]["shared.weight"])
    predictions = prompt_run["predictions"]
    reloaded = reload_and_predict(hf_dir, [p["prompt"] for p in predictions], adapter=adapter_dir)
    assert reloaded == [p["generated"] for p in predictions]
    # Without the prompt the base predicts otherwise: the comparison can fail.
    assert reload_and_predict(hf_dir, [p["prompt"] for p in predictions]) != reloaded


@pytest.mark.core
def test_checkpoint_holds_only_the_prompt_and_exports_like_the_run(prompt_run, tmp_path):
    from safetensors.torch import load_file

    from ipu_t5 import checkpointing
    from ipu_t5.cli import main

    checkpoint = prompt_run["checkpoint"]
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert list(weights) == [PROMPT_KEY]
    assert set(checkpointing.inspect(checkpoint).optimizer_state()) == {PROMPT_KEY}
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    assert torch.equal(load_file(str(tmp_path / "hf-adapter" / "adapter_model.safetensors"))[PROMPT_KEY],
                       weights[PROMPT_KEY])
    exported, original = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(
        str(prompt_run["hf_dir"] / "model.safetensors"))
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    config = json.loads((tmp_path / "hf-adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "hf").resolve())


@pytest.mark.core
def test_a_prompt_tuning_run_resumes_exactly(tmp_path):
    from ipu_t5 import checkpointing
    from ipu_t5.training.trainer import T5Trainer

    def run(out, steps, **extra):
        values = {"training.max_steps": steps, "output.save_steps": 3, "validation.do_eval": "false",
                  "peft.prompt_tuning_init": "random", "data.demo_train_samples": 160}
        values.update(extra)
        T5Trainer(prompt_config(out, **values)).train()
        return list(losses(out).values())

    straight = run(tmp_path / "straight", 6)
    first = run(tmp_path / "stopped", 3)
    resumed = run(tmp_path / "stopped", 6, **{"output.resume_from_checkpoint": "auto"})
    assert first == straight[:3] and resumed == straight
    final = [checkpointing.inspect(checkpointing.step_path(tmp_path / name, 6)).model_tensors()
             for name in ("straight", "stopped")]
    assert list(final[0]) == list(final[1]) == [PROMPT_KEY]
    assert torch.equal(final[0][PROMPT_KEY], final[1][PROMPT_KEY])


@pytest.mark.core
def test_random_initialisation_is_drawn_by_name_as_peft_draws_an_embedding(tmp_path):
    from ipu_t5.initialise import initial_tensor
    from ipu_t5.model_source import run_source

    config = prompt_config(tmp_path, **{"peft.prompt_tuning_init": "random"})
    source = run_source(config, 512)
    model = source.build()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [PROMPT_KEY]
    prompt = dict(model.named_parameters())[PROMPT_KEY]
    assert tuple(prompt.shape) == (2 * VIRTUAL, SIZES["tiny"].d_model)
    assert torch.equal(prompt, initial_tensor(PROMPT_KEY, tuple(prompt.shape), source.hf_config, config.training.seed))
    assert 0.8 < float(prompt.detach().std()) < 1.2  # nn.Embedding's normal(0, 1)
    assert lora.is_adapter_key(PROMPT_KEY)


@pytest.mark.core
@pytest.mark.parametrize("values, message", [
    ({"peft.prompt_tuning_init_text": ""}, "peft.prompt_tuning_init=text needs peft.prompt_tuning_init_text"),
    ({"peft.num_virtual_tokens": 0}, "peft.num_virtual_tokens must be a positive integer"),
    ({"peft.prompt_tuning_init": "vocab"}, "peft.prompt_tuning_init must be one of random, text"),
])
def test_bad_prompt_tuning_settings_are_refused(tmp_path, values, message):
    with pytest.raises(UserError, match=message):
        prompt_config(tmp_path, **values)


@pytest.mark.core
def test_the_ipu_backend_refuses_prompt_tuning_in_one_line(tmp_path):
    from ipu_t5.backends.ipu.backend import IpuBackend
    from ipu_t5.layout import plan_from_config

    config = prompt_config(tmp_path)
    with pytest.raises(UserError, match="prompt_tuning runs on the single and torch backends only"):
        IpuBackend(config, plan_from_config(config))


SDK_CHECK = """
import json, sys
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
hf_dir, adapter_dir, prompts_path = sys.argv[1:4]
prompts = json.load(open(prompts_path))
tokenizer = AutoTokenizer.from_pretrained(hf_dir)
model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(hf_dir), adapter_dir).eval()
batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True)
out = model.generate(**batch, do_sample=False, num_beams=1)
json.dump(tokenizer.batch_decode(out, skip_special_tokens=True), open(prompts_path + ".out", "w"))
"""


@pytest.mark.skipif(sdk_python() is None, reason="IPU_T5_SDK_PYTHON (the Poplar SDK's stack) is not set up")
def test_the_adapter_predicts_as_validation_did_on_the_sdk_stack(prompt_run, tmp_path):
    predictions = prompt_run["predictions"]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([p["prompt"] for p in predictions]))
    result = subprocess.run([sdk_python(), "-c", SDK_CHECK, str(prompt_run["hf_dir"]), str(prompt_run["adapter_dir"]),
                             str(prompts)], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "prompts.json.out").read_text()) == [p["generated"] for p in predictions]
