"""Batch-serialised phases: PopART's options through `opts._Popart.set`, refused by the stand-in
where PopTorch/PopART refuse them (tests/backends/ipu/reference/popart-session-options.json), (a batch-serialised phased
step landing on one process's step is test_phased.py's serial case)."""
import pytest
import torch

from ipu_t5.backends.ipu.batch_serial import SerialSchedule, popart_settings

from . import poptorch_standin

pytestmark = pytest.mark.core


class OneBlock(torch.nn.Module):
    def __init__(self, loss: bool):
        super().__init__()
        self.layer = __import__("poptorch").BeginBlock(torch.nn.Linear(2, 2), "only", 0)
        self.loss = loss

    def forward(self, x):
        out = self.layer(x)
        return out.sum() if self.loss else out


def compile_with(settings, batch=4, training=True):
    """Compile a one-block model through the stand-in with these PopART options set."""
    poptorch = __import__("poptorch")
    opts = poptorch.Options()
    for key, value in settings.items():
        opts._Popart.set(key, value)
    model = OneBlock(loss=training)
    if training:
        optimizer = poptorch.optim.AdamW(model.parameters(), lr=0.01)
        executor = poptorch.trainingModel(model, options=opts, optimizer=optimizer)
    else:
        executor = poptorch.inferenceModel(model, options=opts)
    return executor(torch.ones(batch, 2))


def test_standin_refuses_the_popart_options_popart_refuses(monkeypatch):
    poptorch_standin.install(monkeypatch, ipus=4)
    good = popart_settings(SerialSchedule(factor=4, slice_size=1, recompute=True))
    compile_with(good)
    refused = [
        ({"batchSerializationSettings.fator": 4}, "Unknown uint64 option batchSerializationSettings.fator"),
        # A registered key with a value of another type is unknown to that type's table.
        ({"batchSerializationSettings.factor": 4.0}, "Unknown double option batchSerializationSettings.factor"),
        ({"batchSerializationSettings.concatOnExecutionPhaseChange": 0},
         "Unknown uint64 option batchSerializationSettings.concatOnExecutionPhaseChange"),
        ({"executionPhaseSettings.activationIOSchedule": 1}, "Unknown uint64 option"),  # not registered in 3.3
        (dict(good, **{"batchSerializationSettings.batchSchedule": 4}),
         "Value for BatchSerializationBatchSchedule out of range"),
        (dict(good, **{"batchSerializationSettings.method": 3}), "Value for BatchSerializationMethod out of range"),
        (dict(good, **{"batchSerializationSettings.method": 2}), "Loop batch serialisation of a training graph"),
        ({"aliasZeroCopy": True}, "aliasZeroCopy requires explicitRecomputation"),
        (dict(good, **{"batchSerializationSettings.factor": 8}),
         "Batch axis: 4 is smaller than the batch serialization factor: 8"),
    ]
    for settings, message in refused:
        with pytest.raises(poptorch_standin.Error, match=message):
            compile_with(settings)
    # Loop is fine in the backward context; an inference graph has no backward to need it.
    compile_with(dict(good, **{"batchSerializationSettings.method": 2, "batchSerializationSettings.transformContext": 1}))
    compile_with(dict(good, **{"batchSerializationSettings.method": 2}), training=False)
