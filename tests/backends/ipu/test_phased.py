"""Phased execution on the IPU backend, through the poptorch stand-in: every phase split over the
replica's IPUs trains as one process does, under Hugging Face names, and the stand-in refuses
what poptorch's phase rules refuse."""
import copy
import dataclasses
import json

import pytest
import torch

from ipu_t5.backends.ipu import backend as ipu_backend_module
from ipu_t5.backends.ipu.batch_serial import popart_settings
from ipu_t5.backends.ipu.plan import plan_ipu
from ipu_t5.backends.single import SingleProcessBackend
from ipu_t5.data.batching import GlobalBatch
from ipu_t5.layout import plan_from_config
from ipu_t5.model_source import build_model

from . import poptorch_standin
from .test_backend import SOURCE, TARGET, ipu_backend, samples, tiny_config, train_export_and_checkpoint

pytestmark = pytest.mark.core
# As in test_backend: a warm-up makes step 0's rate differ from the optimizer's, and a large
# epsilon makes AdamW's update follow the gradient's scale.
COMMON = {"training.warmup_steps": 4, "training.learning_rate": 0.01, "training.adam_epsilon": 1.0}
PHASED = dict(COMMON, **{"layout.stages": 4, "ipu.execution_strategy": "phased"})


@pytest.fixture
def standin(monkeypatch):
    return poptorch_standin.install(monkeypatch, ipus=4)


def only(monkeypatch, phasing):
    """Plan phased execution with one phasing only (the planner picks by its estimate)."""
    monkeypatch.setattr(ipu_backend_module, "plan_ipu",
                        lambda *args, **kwargs: plan_ipu(*args, phasings=(phasing,), **kwargs))


def single_backend(tmp_path, model):
    config = tiny_config(tmp_path, **dict(COMMON, **{"layout.backend": "single"}))
    backend = SingleProcessBackend(config, plan_from_config(config, SOURCE, TARGET), device="cpu")
    backend.setup(copy.deepcopy(model))
    return backend


@pytest.mark.parametrize("phasing", ["serial", "parallel"])
def test_split_phases_train_as_one_process_does(standin, tmp_path, monkeypatch, phasing):
    only(monkeypatch, phasing)
    config = tiny_config(tmp_path, **PHASED)
    model = build_model(config, 512)
    reference = single_backend(tmp_path, model)
    backend = ipu_backend(config, model)
    plan = backend.ipu_plan
    assert (plan.execution, plan.phasing, plan.total_ipus) == ("phased", phasing, 4)
    (training,) = [e for e in standin.executors if e.training]
    strategy = training.options.value("setExecutionStrategy", "strategy")
    kind = {"serial": poptorch_standin.SerialPhasedExecution, "parallel": poptorch_standin.ParallelPhasedExecution}
    assert type(strategy) is kind[phasing]
    for index, phase in enumerate(strategy.phases):
        expected = [0, 1, 2, 3] if phasing == "serial" else [index % 2, index % 2 + 2]
        assert [stage.ipu_id for stage in phase.stages] == expected
    # Serial phases are batch-serialised (one micro-batch of 16 sliced by PopART inside the
    # program, which the stand-in runs slice by slice); parallel ones accumulate micro-batches.
    sets = {a["key"]: a["value"] for a in standin.named("poptorch.options._PopartOptions.set")}
    accumulation = training.options.Training.value("gradientAccumulation", "gradient_accumulation")
    if phasing == "serial":
        assert plan.batch_serial is not None and plan.batch_serial.factor > 1 and accumulation == 1
        assert sets == popart_settings(plan.batch_serial)
    else:
        assert plan.batch_serial is None and sets == {} and accumulation == plan.layout.micro_batches
    for step, seed in enumerate((1, 2)):
        batch = GlobalBatch(samples(16, seed))
        expected, got = reference.train_step(batch, step), backend.train_step(batch, step)
        assert got.loss == pytest.approx(expected.loss, rel=1e-6)
    want, have = reference.model_state_dict(), backend.model_state_dict()
    assert list(have) == list(want)
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-6, atol=1e-6)
    rows = samples(5, 3)
    assert backend.generate(rows, 4) == reference.generate(rows, 4)
    # Generated with the key/value cache: an encoder executor once per batch, then a decoder-step
    # executor per position, each compiled for its own phases; no whole-model executor.
    assert backend.inference_model is None
    encoder, step = backend.kv_generator.executors()
    assert {b.split("/")[0].split(".")[0] for b, _ in encoder.trace} == {"embedding", "encoder"}
    assert {b.split("/")[0].split(".")[0] for b, _ in step.trace} == {"embedding", "decoder", "lm_head"}
    assert [e for e in standin.executors if not e.training] == [encoder, step]


def test_checkpoints_move_between_split_phases_a_pipeline_and_one_process(monkeypatch, tmp_path):
    """State saved by name from split phases loads into a pipelined IPU layout and into one
    process, and theirs into split phases: a step from the same state lands on the same weights."""
    poptorch_standin.install(monkeypatch, ipus=16)  # three IPU executables attached at once
    config = tiny_config(tmp_path, **PHASED)
    model = build_model(config, 512)
    phased = ipu_backend(config, model)
    phased.train_step(GlobalBatch(samples(16, 1)), 0)
    weights, moments = phased.model_state_dict(), phased.optimizer_state_dict()
    assert weights["encoder.block.0.layer.0.SelfAttention.o.weight"].shape == (128, 128)
    assert set(moments["decoder.block.1.layer.2.DenseReluDense.wo.weight"]) == {"exp_avg", "exp_avg_sq", "step"}
    assert moments["lm_head.weight"]["exp_avg"].shape == (512, 128)
    pipelined = ipu_backend(tiny_config(tmp_path, **dict(COMMON, **{"layout.stages": 2})), build_model(config, 512))
    one = single_backend(tmp_path, build_model(config, 512))
    again = ipu_backend(config, build_model(config, 512))
    for other, source in ((pipelined, phased), (one, phased), (again, one)):
        other.load_model_state_dict(source.model_state_dict())
        other.load_optimizer_state_dict(source.optimizer_state_dict())
    batch = GlobalBatch(samples(16, 2))
    for backend in (phased, pipelined, one, again):
        backend.train_step(batch, 1)
    want = phased.model_state_dict()
    for other in (pipelined, one, again):
        have = other.model_state_dict()
        for name, tensor in want.items():
            torch.testing.assert_close(have[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_split_run_trains_exports_and_resumes_like_an_uninterrupted_one(standin, tmp_path):
    from ipu_t5.checkpointing.export import reload_and_predict
    from ipu_t5.training.trainer import T5Trainer

    def config(where, **values):
        settings = dict(PHASED, **{"training.max_steps": 2, "data.demo_train_samples": 200,
                                   "data.demo_eval_samples": 8, "training.global_batch_size": 8})
        settings.update(values)
        return tiny_config(where, **settings)

    trainer, hf_dir, checkpoint, straight = train_export_and_checkpoint(config(tmp_path), tmp_path, 4)
    assert trainer.backend.ipu_plan.execution == "phased"
    predictions = [json.loads(line) for line in open(tmp_path / "run" / "eval_predictions.jsonl")]
    assert reload_and_predict(hf_dir, [p["prompt"] for p in predictions]) == [p["generated"] for p in predictions]
    resumed = T5Trainer(config(tmp_path / "again", **{"training.max_steps": 4,
                                                      "output.resume_from_checkpoint": str(checkpoint)}))
    assert resumed.train()["final_loss"] == pytest.approx(straight, rel=1e-6)
    resumed.close()
    # One process resumes the same checkpoint, written by the split IPU run, by name.
    single = T5Trainer(config(tmp_path / "single", **{"training.max_steps": 4, "layout.backend": "single",
                                                      "layout.stages": 1, "output.resume_from_checkpoint": str(checkpoint)}))
    assert single.train()["final_loss"] == pytest.approx(straight, rel=1e-5)
    single.close()


# ----- the stand-in holds poptorch's phase rules -----

class FourBlocks(torch.nn.Module):
    """Blocks "a" and "b" read the input, "c" and "d" read theirs: two phases of two stages."""

    def __init__(self, poptorch):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(4)])
        for layer, name in zip(self.layers, "abcd"):
            poptorch.BeginBlock(layer, name)

    def forward(self, x):
        a, b = self.layers[0](x), self.layers[1](x)
        return self.layers[2](a) + self.layers[3](b)


def compile_phases(kind, *phases):
    poptorch = __import__("poptorch")
    model = FourBlocks(poptorch)
    options = poptorch.Options()
    strategy = getattr(poptorch, kind)(*[poptorch.Phase(*[poptorch.Stage(b).ipu(i) for b, i in phase])
                                         for phase in phases])
    options.setExecutionStrategy(strategy)
    executor = poptorch.inferenceModel(model, options=options)
    try:
        return executor(torch.ones(2, 4))
    finally:
        executor.destroy()


def test_standin_runs_the_documented_phase_layouts(standin):
    # poptorch's own examples: serial phases on one group, parallel phases on even then odd IPUs.
    assert compile_phases("SerialPhasedExecution", [("a", 0), ("b", 1)], [("c", 0), ("d", 1)]).shape == (2, 4)
    assert compile_phases("ParallelPhasedExecution", [("a", 0), ("b", 2)], [("c", 1), ("d", 3)]).shape == (2, 4)


@pytest.mark.parametrize("kind, phases, message", [
    ("SerialPhasedExecution", ([("a", 0), ("b", 1)], [("c", 2), ("d", 3)]), "single group of IPUs"),
    ("ParallelPhasedExecution", ([("a", 0), ("b", 2)], [("c", 1), ("d", 2)]), "phase 1 is odd and must run on odd"),
    ("ParallelPhasedExecution", ([("a", 1), ("b", 3)], [("c", 0), ("d", 2)]), "phase 0 is even"),
    ("SerialPhasedExecution", ([("a", 0), ("b", 4)], [("c", 0), ("d", 4)]), "outside the 4 IPUs of a replica"),
    ("SerialPhasedExecution", ([("a", 1), ("b", 1)], [("c", 1), ("d", 1)]), "two stages on one IPU"),
])
def test_standin_refuses_a_plan_that_breaks_a_phase_rule(standin, kind, phases, message):
    with pytest.raises(poptorch_standin.Error, match=message):
        compile_phases(kind, *phases)


def test_standin_refuses_a_block_in_two_stages(standin):
    with pytest.raises(AssertionError, match="associated with more than one stage"):
        compile_phases("SerialPhasedExecution", [("a", 0), ("b", 1)], [("a", 0), ("d", 1)])


def test_kv_generation_encodes_in_chunks_and_stops_when_every_prompt_has_ended(standin, tmp_path, monkeypatch):
    """The decoder step takes the whole batch while the encoder runs it in the plan's chunks (the
    last padded), and the host stops stepping once every prompt has produced EOS; the tokens equal
    one process's greedy generation."""
    def chunked(*args, **kwargs):
        plan = plan_ipu(*args, **kwargs)
        return dataclasses.replace(plan, generation=dataclasses.replace(plan.generation, encoder_batch=3))
    monkeypatch.setattr(ipu_backend_module, "plan_ipu", chunked)
    config = tiny_config(tmp_path, **PHASED)  # an evaluation batch of 8: encoder chunks of 3, 3 and 2
    model = build_model(config, 512)
    # Logits of EOS and of one other token only, of opposite signs: each step is EOS or that token
    # by the sign of one column of the decoder output (column 26 of this seed's model: the prompts
    # end at different positions, all well before 12).
    with torch.no_grad():
        model.decoder.final_layer_norm.weight.zero_()
        model.decoder.final_layer_norm.weight[26] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[1, 26], model.lm_head.weight[7, 26] = 1.0, -1.0
    reference = single_backend(tmp_path, model)
    backend = ipu_backend(config, model)
    assert backend.ipu_plan.generation.encoder_batch == 3 and backend.eos_id == reference.eos_id == 1
    rows = samples(5, 3)
    expected = reference.generate(rows, 12)
    calls = len(standin.named("poptorch.PoplarExecutor.__call__"))
    assert backend.generate(rows, 12) == expected
    shapes = [[tuple(t.shape) for t in c["args"]] for c in standin.named("poptorch.PoplarExecutor.__call__")[calls:]]
    encoder = [s for s in shapes if len(s) == 2]
    steps = [s for s in shapes if len(s) == 4]
    assert [s[0][0] for s in encoder] == [3, 3, 3]
    assert all(s[0][0] == 8 and s[2][0] == 8 for s in steps)
    # One step per position up to the last prompt's EOS (trimmed from its tokens), fewer than 12.
    ended = [len(row) + 1 if len(row) < 12 else 12 for row in expected]
    assert len(steps) == max(ended) < 12 and min(ended) < max(ended)
