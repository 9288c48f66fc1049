"""The IPU backend's calls to poptorch, through a stand-in held to the real poptorch 3.3 API
(tests/backends/ipu/poptorch_standin/: the SDK's poptorch cannot be installed here)."""
import copy
import json
import math
import random

import pytest
import torch

from ipu_t5.backends import create_backend, resolve_backend_name
from ipu_t5.backends.ipu.backend import IpuBackend
from ipu_t5.backends.single import SingleProcessBackend
from ipu_t5.config import load_config
from ipu_t5.data.batching import GlobalBatch
from ipu_t5.data.features import Lengths
from ipu_t5.errors import UserError
from ipu_t5.layout import plan_from_config
from ipu_t5.model_source import build_model
from ipu_t5.models import SIZES

from . import poptorch_standin
from tests.conftest import ROOT, cpu_has_float16_matmul, tiny_overrides
from .poptorch_standin import REFERENCE

pytestmark = pytest.mark.core
SOURCE, TARGET = 24, 5


@pytest.fixture
def standin(monkeypatch):
    return poptorch_standin.install(monkeypatch, ipus=64)


def tiny_config(tmp_path, **values):
    settings = {"layout.backend": "ipu", "training.fp16": False, "training.global_batch_size": 16,
                "validation.per_device_eval_batch_size": 8}
    settings.update(values)
    return load_config("tiny", overrides=tiny_overrides(tmp_path / "run", **settings))


def samples(count, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        source = [rng.randrange(3, 512) for _ in range(rng.randrange(6, SOURCE))] + [1]
        rows.append({"input_ids": source, "labels": [rng.randrange(3, 512) for _ in range(rng.randrange(1, TARGET))] + [1]})
    return rows


def ipu_backend(config, model):
    backend = IpuBackend(config, plan_from_config(config, SOURCE, TARGET))
    backend.lengths = Lengths(SOURCE, TARGET)
    backend.setup(model)
    return backend


def meta_model(size):
    from transformers import T5Config, T5ForConditionalGeneration

    from ipu_t5.compat import untie_lm_head

    with torch.device("meta"):
        model = T5ForConditionalGeneration(T5Config(**size.t5_config_kwargs()))
        untie_lm_head(model)
    return model


# ----- the stand-in itself is held to the real API -----

def test_standin_offers_only_what_the_real_poptorch_has():
    api = poptorch_standin.API
    for name, value in poptorch_standin.PUBLIC.items():
        assert "poptorch." + name in api, name
        if isinstance(value, type) and not issubclass(value, (Exception, int)):
            for attr, member in vars(value).items():
                if attr.startswith("_") and attr != "__call__":
                    continue
                if callable(member) or isinstance(member, property):
                    qualname = "poptorch.{}.{}".format(name, attr)
                    assert qualname in api, qualname
    assert all("poptorch.optim.AdamW." + m in api for m in ("state_dict", "load_state_dict"))


def test_standin_rejects_what_the_real_poptorch_rejects(standin):
    poptorch = __import__("poptorch")
    opts = poptorch.Options()
    with pytest.raises(TypeError, match="would reject"):
        opts.replicationFactor(4, 2)
    with pytest.raises(AttributeError, match="real poptorch"):
        opts.Profiling  # noqa: B018 - poptorch 3.3 has no Profiling options
    with pytest.raises(AssertionError):
        opts.outputMode("sum")
    with pytest.raises(TypeError, match="would reject"):
        poptorch.BeginBlock(torch.nn.Linear(2, 2), ipu=0)
    layer = poptorch.BeginBlock(torch.nn.Linear(2, 2), "a", 0)
    with pytest.raises(poptorch.Error, match="already been assigned"):
        poptorch.BeginBlock(layer, "b", 1)
    assert not hasattr(poptorch, "CommGroup")


# ----- placement of the big sizes (structure only: no weights are materialised) -----

@pytest.mark.parametrize("model, replicas, per_replica", [("xxl", 4, 16), ("xl", 1, 8)])
def test_big_sizes_split_every_phase_over_every_ipu(standin, model, replicas, per_replica):
    # 512-token prompts, where both plan serial phases (at 128 XXL on a Pod64 takes parallel ones).
    config = load_config(model, **{"layout.replicas": replicas, "layout.backend": "ipu"})
    backend = IpuBackend(config, plan_from_config(config, 512, 4))
    backend.lengths = Lengths(512, 4)
    backend.setup(meta_model(SIZES[model]))
    plan = backend.ipu_plan
    (training,) = standin.executors
    opts = training.options
    assert opts.value("replicationFactor", "replication_factor") == replicas
    assert opts.Training.value("gradientAccumulation", "gradient_accumulation") == plan.layout.micro_batches
    strategy = opts.value("setExecutionStrategy", "strategy")
    assert isinstance(strategy, poptorch_standin.SerialPhasedExecution)
    assert strategy.liveness == poptorch_standin.Liveness.OffChipAfterEachPhase
    # Every phase: one stage per IPU of the replica, part j on IPU j.
    assert len(strategy.phases) == len(plan.phases())
    for phase, (name, ipus) in zip(strategy.phases, plan.phases()):
        assert ipus == tuple(range(per_replica))
        assert [(s.block_ids, s.ipu_id) for s in phase.stages] == [(("{}/{}".format(name, j),), j) for j in ipus]
    stage_ipus = {block: stage.ipu_id for block, (_, stage) in strategy.block_map.items()}
    for _, user_id, ipu in standin.placements:
        assert stage_ipus[user_id] == ipu  # BeginBlock and the strategy agree
    # Every weight is read by exactly one placed module, the one of its slice's part: one IPU each.
    placed = {id(module): user_id for module, user_id, _ in standin.placements}
    readers = {}
    for _, part, module in backend.t5.ipu_split.phase_modules():
        refs = getattr(module, "refs", None)
        for sliced in (refs.sliced.values() if refs else ()):
            readers.setdefault(id(sliced[module.index]), []).append(placed[id(module)])
    names = {id(p): n for n, p in backend.t5.named_parameters()}
    assert set(readers) == set(names) and all(len(r) == 1 for r in readers.values())
    for param, (user_id,) in readers.items():
        name = names[param]
        slice_index = int(name.split(".slices.")[1].split(".")[0])
        parts = per_replica if name.split(".")[0] not in ("shared", "lm_head") else plan.embedding_serialization_factor
        assert stage_ipus[user_id] == slice_index * per_replica // parts, name


# ----- end to end on a tiny model, executed by the stand-in on the CPU -----

def test_ipu_step_matches_the_single_process_step(standin, tmp_path):
    # 2 IPUs per replica x 2 replicas. Warm-up makes step 0's rate differ from the optimizer's
    # (only setOptimizer brings it to the device); a large epsilon makes AdamW's update follow the
    # gradient's scale, so summing micro-batches and replicas (not averaging) is what matches.
    common = {"training.warmup_steps": 4, "training.learning_rate": 0.01, "training.adam_epsilon": 1.0}
    config = tiny_config(tmp_path, **dict(common, **{"layout.stages": 2, "layout.replicas": 2}))
    single_config = tiny_config(tmp_path, **dict(common, **{"layout.backend": "single"}))
    model = build_model(config, 512)
    reference = SingleProcessBackend(single_config, plan_from_config(single_config, SOURCE, TARGET), device="cpu")
    reference.setup(copy.deepcopy(model))
    backend = ipu_backend(config, model)
    assert backend.ipu_plan.execution == "pipelined" and backend.ipu_plan.total_ipus == 4
    for step, seed in enumerate((1, 2)):
        batch = GlobalBatch(samples(16, seed))
        expected, got = reference.train_step(batch, step), backend.train_step(batch, step)
        assert got.loss == pytest.approx(expected.loss, rel=1e-5)
        assert got.lr == expected.lr
    want, have = reference.model_state_dict(), backend.model_state_dict()
    assert set(have) == set(want)
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-3, atol=1e-6)
    (training,) = [e for e in standin.executors if e.training]
    assert training.stages == 2 and training._accumulation >= 3
    assert len(standin.named("poptorch.PoplarExecutor.setOptimizer")) == 2  # lr of steps 0 and 1


def test_generation_is_greedy_decoding(standin, tmp_path):
    config = tiny_config(tmp_path, **{"layout.stages": 2})
    model = build_model(config, 512)
    reference = copy.deepcopy(model).eval()
    backend = ipu_backend(config, model)
    rows = samples(11, seed=3)
    got = backend.generate(rows, 4)
    for row, tokens in zip(rows, got):
        ids = torch.tensor([row["input_ids"]])
        out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 num_beams=1, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)[0, 1:].tolist()
        assert tokens == (out[:out.index(1)] if 1 in out else out)
    (inference,) = [e for e in standin.executors if not e.training]
    assert inference._device_iterations >= 2  # pipelined inference over 2 IPUs


def test_weights_and_optimizer_state_keep_hugging_face_names(standin, tmp_path):
    config = tiny_config(tmp_path, **{"ipu.embedding_serialization_factor": 4})
    model = build_model(config, 512)
    keys, original = list(model.state_dict()), copy.deepcopy(model.state_dict())
    backend = ipu_backend(config, model)
    state = backend.model_state_dict()
    assert list(state) == keys and state["shared.weight"].shape == (512, 128)
    for name in keys:
        torch.testing.assert_close(state[name], original[name])
    backend.train_step(GlobalBatch(samples(16)), 0)
    trained = backend.model_state_dict()
    assert not torch.equal(trained["lm_head.weight"], original["lm_head.weight"])  # host synced from device
    moments = backend.optimizer_state_dict()
    assert moments["shared.weight"]["exp_avg"].shape == (512, 128)
    assert set(moments["lm_head.weight"]) == {"exp_avg", "exp_avg_sq", "step"}
    # A fresh backend (another layout) loads both by name.
    other = ipu_backend(tiny_config(tmp_path, **{"ipu.embedding_serialization_factor": 2}), build_model(config, 512))
    other.load_model_state_dict(trained)
    other.load_optimizer_state_dict(moments)
    other.train_step(GlobalBatch(samples(16, 5)), 1)
    backend.train_step(GlobalBatch(samples(16, 5)), 1)
    for name, tensor in backend.model_state_dict().items():
        torch.testing.assert_close(other.model_state_dict()[name], tensor, rtol=1e-4, atol=1e-6)


def test_training_and_generation_take_turns_on_the_same_ipus(monkeypatch, tmp_path):
    record = poptorch_standin.install(monkeypatch, ipus=2)
    backend = ipu_backend(tiny_config(tmp_path, **{"layout.stages": 2}), build_model(tiny_config(tmp_path), 512))
    backend.train_step(GlobalBatch(samples(16)), 0)
    backend.generate(samples(3), 3)
    backend.train_step(GlobalBatch(samples(16, 1)), 1)
    assert len(record.named("poptorch.PoplarExecutor.detachFromDevice")) == 2
    backend.close()
    assert not record.attached


def test_trainer_runs_end_to_end_through_the_ipu_backend(standin, tmp_path):
    from ipu_t5.training.trainer import T5Trainer

    config = tiny_config(tmp_path, **{"layout.stages": 2, "training.max_steps": 2, "data.demo_train_samples": 200,
                                      "data.demo_eval_samples": 8, "training.global_batch_size": 8})
    trainer = T5Trainer(config)
    summary = trainer.train()
    results = trainer.evaluate()
    hf_dir = trainer.export_hf()
    trainer.close()
    assert trainer.backend.name == "ipu" and summary["steps"] == 2 and summary["final_loss"] > 0
    assert results["num_samples"] == 8 and 0.0 <= results["accuracy"] <= 1.0
    assert (hf_dir / "model.safetensors").is_file()
    assert trainer.plan is trainer.backend.plan
    calls = [name for name, _ in standin.calls]
    assert "poptorch.trainingModel" in calls and "poptorch.inferenceModel" in calls


@pytest.mark.parametrize("coverage", [1.0, 0.5])
def test_static_prompt_length_comes_from_the_data(standin, tmp_path, coverage):
    """The compiled shapes pad prompts to one length chosen from the data's prompt lengths: a
    multiple of 8 holding all of them, or the given share, never a fixed 512. The rest are
    tokenized truncated to it, so the export (whose tokenizer truncates there) predicts what
    validation predicted."""
    import numpy as np

    from ipu_t5.checkpointing.export import reload_and_predict
    from ipu_t5.training.trainer import T5Trainer

    config = tiny_config(tmp_path, **{"training.max_steps": 1, "data.demo_train_samples": 200,
                                      "data.demo_eval_samples": 8, "training.global_batch_size": 8,
                                      "ipu.source_length_coverage": coverage})
    trainer = T5Trainer(config)
    texts = list(trainer.train_features["prompt"]) + list(trainer.eval_features["prompt"])
    whole = sorted(len(ids) for ids in trainer.tokenizer(texts)["input_ids"])
    fed = [len(ids) for ids in list(trainer.train_features["input_ids"]) + list(trainer.eval_features["input_ids"])]
    static = trainer.backend.ipu_plan.source_length
    trainer.train()
    trainer.evaluate()
    hf_dir = trainer.export_hf()
    trainer.close()
    assert static % 8 == 0
    held = sum(n <= static for n in whole) / len(whole)
    assert held >= coverage and static - 8 < int(np.quantile(whole, coverage, method="inverted_cdf"))
    assert max(fed) <= static and trainer.lengths.source == max(fed)
    if coverage == 1.0:
        assert static >= max(whole) and trainer.prompt_length == 512
    else:
        assert static < max(whole) and trainer.prompt_length == static
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["model_max_length"] == trainer.prompt_length
    predictions = [json.loads(line) for line in open(tmp_path / "run" / "eval_predictions.jsonl")]
    assert reload_and_predict(hf_dir, [p["prompt"] for p in predictions]) == [p["generated"] for p in predictions]


# ----- LoRA: the adapters injected before the backend takes the model -----

LORA = {"peft.method": "lora", "peft.r": 4, "peft.lora_alpha": 8, "peft.lora_dropout": 0}


def lora_model(config):
    from ipu_t5 import lora

    model = build_model(config, 512)
    torch.manual_seed(config.training.seed)
    return lora.apply_lora(model, config.peft)


def test_lora_trains_only_the_adapters_and_matches_the_single_process(standin, tmp_path):
    from ipu_t5 import lora

    # As in test_ipu_step_matches_the_single_process_step: 2 IPUs x 2 replicas, AdamW following
    # the gradient's scale.
    common = dict(LORA, **{"training.warmup_steps": 4, "training.learning_rate": 0.01, "training.adam_epsilon": 1.0})
    config = tiny_config(tmp_path, **dict(common, **{"layout.stages": 2, "layout.replicas": 2}))
    single_config = tiny_config(tmp_path, **dict(common, **{"layout.backend": "single"}))
    model = lora_model(config)
    before = copy.deepcopy(model.state_dict())
    adapters = {n for n in before if lora.is_adapter_key(n)}
    reference = SingleProcessBackend(single_config, plan_from_config(single_config, SOURCE, TARGET), device="cpu")
    reference.setup(copy.deepcopy(model))
    backend = ipu_backend(config, model)
    # poptorch gets an optimizer over the adapters alone, and every other weight is frozen for it.
    (compiled,) = standin.named("poptorch.trainingModel")
    assert compiled["optimizer"] is backend.optimizer
    optimized = {id(p) for group in backend.optimizer.param_groups for p in group["params"]}
    trainable = {n: p for n, p in backend.train_module.named_parameters() if p.requires_grad}
    assert optimized == {id(p) for p in trainable.values()}
    assert {n[len("t5."):] for n in trainable} == adapters
    for step, seed in enumerate((1, 2)):
        batch = GlobalBatch(samples(16, seed))
        expected, got = reference.train_step(batch, step), backend.train_step(batch, step)
        assert got.loss == pytest.approx(expected.loss, rel=1e-5)
    want, have = reference.model_state_dict(), backend.model_state_dict()
    assert list(have) == list(before)  # peft's names: ...q.base_layer.weight, ...q.lora_A.default.weight
    for name in before:
        if name in adapters:
            torch.testing.assert_close(have[name], want[name], rtol=1e-3, atol=1e-6)
        else:
            assert torch.equal(have[name], before[name]), "frozen weight {} changed".format(name)
    assert sum(not torch.equal(have[n], before[n]) for n in adapters if ".lora_B." in n) == len(adapters) // 2
    moments = backend.optimizer_state_dict()
    assert set(moments) == adapters and set(moments[min(adapters)]) == {"exp_avg", "exp_avg_sq", "step"}
    # The merged weights are a plain T5 that computes what the adapted model computes (up to the
    # rounding of W + BA, as in test_lora).
    plain = build_model(config, 512)
    plain.load_state_dict(lora.merged_state(have, config.peft))
    adapted = copy.deepcopy(reference.model)
    adapted.load_state_dict(have)
    ids = torch.tensor([samples(1, 7)[0]["input_ids"]])
    inputs = {"input_ids": ids, "decoder_input_ids": torch.tensor([[0, 5, 9]])}
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(**inputs).logits, adapted.eval()(**inputs).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not cpu_has_float16_matmul(), reason="the stand-in executes on the CPU, and this torch (the SDK's "
                                                           "2.0.1) has no float16 matmul there")
def test_lora_float16_step_keeps_the_base_frozen(standin, tmp_path):
    """The IPU's own precision: float16 weights and adapters, loss scaling, only adapters move."""
    from ipu_t5 import lora

    config = tiny_config(tmp_path, **dict(LORA, **{"training.fp16": True}))
    model = lora_model(config)
    before = copy.deepcopy(model.state_dict())
    backend = ipu_backend(config, model)
    assert backend.ipu_plan.half and next(backend.t5.parameters()).dtype == torch.float16
    result = backend.train_step(GlobalBatch(samples(16)), 0)
    assert math.isfinite(result.loss) and result.loss > 0
    after = backend.model_state_dict()
    moved = [n for n in before if not torch.equal(after[n].float(), before[n].half().float())]
    assert all(lora.is_adapter_key(n) for n in moved)
    assert {n for n in moved if ".lora_B." in n} == {n for n in before if ".lora_B." in n}


def train_export_and_checkpoint(config, where, more_steps):
    """A run trained, validated and exported, a checkpoint saved, then trained on to `more_steps`
    steps without a break: (trainer, export directory, checkpoint, the unbroken run's final loss)."""
    from ipu_t5.training.trainer import T5Trainer

    trainer = T5Trainer(config)
    trainer.train()
    trainer.evaluate()
    hf_dir = trainer.export_hf()
    checkpoint = trainer.save_checkpoint(where / "run" / "checkpoints" / "final")
    trainer.config.training.max_steps = more_steps
    straight = trainer.train()["final_loss"]
    trainer.close()
    return trainer, hf_dir, checkpoint, straight


def test_lora_run_end_to_end_on_the_ipu_backend(standin, tmp_path):
    from safetensors.torch import load_file

    from ipu_t5 import lora
    from ipu_t5.checkpointing.export import reload_and_predict
    from ipu_t5.training.trainer import T5Trainer

    def config(where, **values):
        settings = dict(LORA, **{"layout.stages": 2, "training.max_steps": 2, "data.demo_train_samples": 200,
                                 "data.demo_eval_samples": 8, "training.global_batch_size": 8,
                                 "training.learning_rate": 0.01})
        settings.update(values)
        return tiny_config(where, **settings)

    trainer, hf_dir, checkpoint, straight = train_export_and_checkpoint(config(tmp_path), tmp_path, 3)
    assert trainer.backend.name == "ipu"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert len(saved) == 2 * 12 and all(lora.is_adapter_key(n) for n in saved)
    predictions = [json.loads(line) for line in open(tmp_path / "run" / "eval_predictions.jsonl")]
    assert reload_and_predict(hf_dir, [p["prompt"] for p in predictions]) == [p["generated"] for p in predictions]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # The adapter checkpoint resumes on the IPU: the base rebuilt, adapters and AdamW state loaded.
    resumed = T5Trainer(config(tmp_path / "again", **{"training.max_steps": 3,
                                                      "output.resume_from_checkpoint": str(checkpoint)}))
    assert resumed.train()["final_loss"] == pytest.approx(straight, rel=1e-6)
    resumed.close()


def test_resume_continues_the_ipus_own_random_stream(standin, tmp_path, monkeypatch):
    from ipu_t5.training.trainer import T5Trainer

    def config(where, **values):
        settings = {"layout.stages": 2, "training.max_steps": 2, "data.demo_train_samples": 200,
                    "data.demo_eval_samples": 8, "training.global_batch_size": 8, "model.dropout_rate": 0.3}
        settings.update(values)
        return tiny_config(where, **settings)

    def resumed_loss(where):
        resumed = T5Trainer(config(where, **{"training.max_steps": 4, "output.resume_from_checkpoint": str(checkpoint)}))
        loss = resumed.train()["final_loss"]
        resumed.close()
        return loss

    trainer = T5Trainer(config(tmp_path))
    trainer.train()
    checkpoint = trainer.save_checkpoint(tmp_path / "run" / "checkpoints" / "final")
    trainer.config.training.max_steps = 4
    straight = trainer.train()["final_loss"]
    trainer.close()
    # The checkpoint carries the IPUs' generator (dropout masks), which the host's does not cover.
    assert resumed_loss(tmp_path / "again") == pytest.approx(straight, rel=1e-6)
    # Without it the IPUs would restart their stream from the seed, and train on other masks.
    monkeypatch.setattr(IpuBackend, "load_extra_state", lambda self, state: None)
    assert resumed_loss(tmp_path / "fresh-stream") != pytest.approx(straight, rel=1e-6)


def test_lora_on_the_vocabulary_slices_is_refused(standin, tmp_path):
    config = tiny_config(tmp_path, **dict(LORA, **{"peft.target_modules": "q,lm_head"}))
    with pytest.raises(UserError, match=r"adapts lm_head, which the IPU backend splits into vocabulary slices"):
        ipu_backend(config, lora_model(config))


# ----- choosing and refusing -----

def test_auto_picks_the_ipu_when_poptorch_reports_ipus(monkeypatch, tmp_path):
    config = tiny_config(tmp_path, **{"layout.backend": "auto"})
    plan = plan_from_config(config, SOURCE, TARGET)
    poptorch_standin.install(monkeypatch, ipus=4)
    assert resolve_backend_name(config, plan) == "ipu"
    poptorch_standin.install(monkeypatch, ipus=0)
    assert resolve_backend_name(config, plan) == "single"
    monkeypatch.delitem(__import__("sys").modules, "poptorch")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert resolve_backend_name(config, plan) == "single"


def test_refusals_name_the_sdk_and_the_ipu_count(monkeypatch, tmp_path):
    config = tiny_config(tmp_path, **{"layout.stages": 2, "layout.replicas": 2})
    monkeypatch.setitem(__import__("sys").modules, "poptorch", None)
    with pytest.raises(UserError, match="needs poptorch from the Poplar SDK"):
        ipu_backend(config, build_model(config, 512))
    poptorch_standin.install(monkeypatch, ipus=2)
    with pytest.raises(UserError, match="needs 4 IPUs \\(2 per replica x 2 replica"):
        ipu_backend(config, build_model(config, 512))
    backend = create_backend(config, plan_from_config(config, SOURCE, TARGET))
    with pytest.raises(UserError, match="token lengths"):
        backend.setup(build_model(config, 512))


def test_float16_training_uses_poptorch_adamw_with_loss_scaling(standin, tmp_path):
    config = tiny_config(tmp_path, **{"training.fp16": "none"})
    backend = ipu_backend(config, build_model(config, 512))
    (adamw,) = standin.named("poptorch.optim.AdamW")
    assert adamw["loss_scaling"] == 1024.0 and adamw["accum_type"] == torch.float16
    assert adamw["first_order_momentum_accum_type"] == adamw["second_order_momentum_accum_type"] == torch.float32
    assert adamw["max_grad_norm"] == 1.0 and backend.ipu_plan.half
    assert next(backend.t5.parameters()).dtype == torch.float16
    assert standin.named("poptorch.options._PrecisionOptions.enableStochasticRounding") == [{"enabled": True}]


@pytest.mark.core
def test_vendored_api_record_matches_shared():
    """The stand-in's copy of the recorded poptorch API is the one in shared/, where CI has it."""
    shared = ROOT.parent / "shared" / "reference" / "poptorch-3.3-api.json"
    if not shared.is_file():
        pytest.skip("no shared/ beside this checkout to compare the vendored API record with")
    assert json.loads(REFERENCE.read_text()) == json.loads(shared.read_text())
