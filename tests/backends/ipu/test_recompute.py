"""`ipu.recompute_checkpoint_every_layer`: a poptorch recomputation checkpoint at the end of every
T5 block, pipelined and split, as Graphcore's T5 placed them; none when the setting is off, and the
computation unchanged either way (through the poptorch stand-in)."""
import copy

import pytest
import torch

from ipu_t5.backends.ipu.backend import RECOMPUTE_PIPELINE
from ipu_t5.data.batching import GlobalBatch
from ipu_t5.model_source import build_model

from . import poptorch_standin
from .test_backend import ipu_backend, samples, tiny_config
from .test_phased import PHASED

pytestmark = pytest.mark.core
PIPELINED = {"layout.stages": 2}
BLOCKS = ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]  # the tiny model's T5 blocks


@pytest.fixture
def standin(monkeypatch):
    return poptorch_standin.install(monkeypatch, ipus=4)


def trained(standin, tmp_path, layout, recompute):
    """A backend after one training step and one generation, with the setting on or off."""
    config = tiny_config(tmp_path, **dict(layout, **{"ipu.recompute_checkpoint_every_layer": recompute}))
    backend = ipu_backend(config, build_model(config, 512))
    result = backend.train_step(GlobalBatch(samples(16, 1)), 0)
    backend.generate(samples(3, 2), 3)
    (training,) = [e for e in standin.executors if e.training]
    # One whole-model executor when pipelined; the encoder and decoder-step executors when phased.
    inference = [e for e in standin.executors if not e.training]
    return backend, result.loss, training, inference


def recomputation_modes(standin):
    return [a["value"] for a in standin.named("poptorch.options._PopartOptions.set") if a["key"] == "autoRecomputation"]


def test_pipelined_blocks_end_in_a_checkpoint_and_recompute_from_it(standin, tmp_path):
    backend, _, training, inference = trained(standin, tmp_path, PIPELINED, True)
    micro = backend.ipu_plan.layout.micro_batch_size
    # One checkpoint per T5 block, on its hidden states (source or target length x d_model), in
    # that block's own poptorch block.
    shapes = [(micro, backend.ipu_plan.source_length, 128)] * 2 + [(micro, backend.ipu_plan.target_length, 128)] * 2
    assert [shape for _, shape in training.checkpoints] == shapes
    stage_of = {block: piece.name for piece in backend.ipu_plan.pieces for block in piece.blocks}
    assert [block for block, _ in training.checkpoints] == [stage_of[b] for b in BLOCKS]
    assert all(len(args["tensors"]) == 1 for args in standin.named("poptorch.recomputationCheckpoint"))
    assert recomputation_modes(standin) == [RECOMPUTE_PIPELINE] == [3]  # popart.RecomputationType.Pipeline
    assert [e.checkpoints for e in inference] == [[]]  # generation has no backward pass


def test_split_blocks_end_in_a_checkpoint_on_every_ipu(standin, tmp_path):
    backend, _, training, inference = trained(standin, tmp_path, PHASED, True)
    plan = backend.ipu_plan
    assert plan.execution == "phased" and plan.ipus_per_phase == 4
    micro = plan.layout.micro_batch_size
    # The last sum of each block's feed-forward phase, on each IPU: its 32-column chunk of the output.
    want = [("{}.ff/{}".format(block, part),
             (micro, plan.source_length if block.startswith("encoder") else plan.target_length, 32))
            for block in BLOCKS for part in range(4)]
    assert training.checkpoints == want
    assert [e.checkpoints for e in inference] == [[], []]
    # Batch-serialised phases recompute each phase's forward from its streamed input where the plan
    # counts that faster (PopART's Standard recomputation, made explicit); otherwise each phase's
    # saved values are streamed out and recomputation stays off.
    assert plan.batch_serial is not None
    assert recomputation_modes(standin) == ([1] if plan.batch_serial.recompute else [])


@pytest.mark.parametrize("layout", [PIPELINED, PHASED], ids=["pipelined", "phased"])
def test_no_checkpoint_when_off_and_the_same_step_either_way(monkeypatch, tmp_path, layout):
    results = {}
    for recompute in (True, False):
        standin = poptorch_standin.install(monkeypatch, ipus=4)
        backend, loss, training, _ = trained(standin, tmp_path / str(recompute), layout, recompute)
        results[recompute] = (loss, copy.deepcopy(backend.model_state_dict()), training.checkpoints,
                              recomputation_modes(standin), backend.ipu_plan.batch_serial)
    assert results[False][2] == [] and results[False][3] == []
    assert results[True][2] != []
    on, off = results[True][1], results[False][1]
    assert list(on) == list(off)
    if results[True][4] == results[False][4] or layout is PIPELINED:
        assert results[True][0] == results[False][0]
        assert all((on[n] == off[n]).all() for n in on)
    else:
        # Without recomputation the plan may take other slices (or gradient accumulation): the
        # same step, added up in another order.
        assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
        for name in on:
            torch.testing.assert_close(on[name], off[name], rtol=1e-6, atol=1e-6)
