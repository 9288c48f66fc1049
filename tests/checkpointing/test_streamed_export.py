"""The export's weights written tensor by tensor: safetensors files the library reads back, each
writer's share cut into numbered shards, and an export of lazily read weights that never holds more
than one of them. The multi-process export is in tests/backends/torch_distributed/test_stage_local.py."""
import json
import tracemalloc
from collections.abc import Mapping

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ipu_t5.checkpointing import export
from ipu_t5.checkpointing.safetensors_stream import write_streamed
from ipu_t5.checkpointing.views import SafetensorsView, weight_files
from ipu_t5.config import load_config
from ipu_t5.model_source import build_model

pytestmark = pytest.mark.core


def test_tensors_written_to_a_stream_are_the_librarys_own_bytes():
    """`write_tensors` writes what `safetensors.torch.save` makes of the same tensors, byte for byte:
    every dtype a checkpoint holds, scalars, and the library's order (widest item first)."""
    import io

    from safetensors.torch import save

    from ipu_t5.checkpointing.safetensors_stream import write_tensors

    generator = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(3, 5, generator=generator), "a": torch.randn(7, generator=generator).bfloat16(),
               "step": torch.tensor(3.0), "m": torch.randn(4, dtype=torch.float64, generator=generator),
               "i": torch.arange(3), "flag": torch.tensor([True, False, True]), "h": torch.randn(2, generator=generator).half()}
    written = io.BytesIO()
    write_tensors(written, tensors, metadata={"format": "pt"})
    assert written.getvalue() == save(tensors, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_streamed_file_is_what_the_library_reads(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=generator), "a.weight": torch.randn(7, generator=generator),
               "scalar": torch.tensor(2.5)}
    tensors["b"][0, 0] = float("nan")
    path = tmp_path / "x.safetensors"
    write_streamed(path, list(tensors), {k: tuple(v.shape) for k, v in tensors.items()}, dtype,
                   lambda name: tensors[name], metadata={"format": "pt"})
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert export.same_bits(loaded[name], value.to(dtype)), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert header % 8 == 0
    with pytest.raises(ValueError, match="b has shape"):
        write_streamed(path, ["b"], {"b": (2, 2)}, dtype, lambda name: tensors[name])


def test_each_writers_share_becomes_numbered_shards():
    one = {"x": (1000,), "y": (1000,)}
    assert export.plan_files([one], torch.float32, "5GB") == [{"model.safetensors": ["x", "y"]}]
    plans = export.plan_files([one, {}, {"z": (600,), "w": (600,)}], torch.float32, "3KB")
    names = [sorted(p) for p in plans]
    assert names == [["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors"], [],
                     ["model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"]]
    assert sorted(n for p in plans for files in p.values() for n in files) == ["w", "x", "y", "z"]


class NumpyView(Mapping):
    """Weights handed out as fresh tensors over numpy memory, which tracemalloc sees allocated and
    freed (torch's own allocations it does not see)."""

    def __init__(self, state):
        self.state = state

    def __getitem__(self, name):
        return torch.from_numpy(self.state[name].detach().numpy().copy())

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)

    def shapes(self):
        return {k: tuple(v.shape) for k, v in self.state.items()}


def test_an_export_of_lazy_weights_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    """As `ipu-t5 export` of a sharded checkpoint runs: where the model does not fit, the reload is
    skipped and said so, and every written tensor is still compared with its source."""
    from ipu_t5.tokenizer import demo_tokenizer

    config = load_config("tiny")
    model = build_model(config, 512)
    state = {k: v for k, v in model.state_dict().items()}
    tokenizer = demo_tokenizer(["some words to train a tokenizer on"] * 20, 64)
    monkeypatch.setattr(export, "fits_in_memory", lambda hf_config: (False, "the model needs 9 TiB"))
    total = sum(v.numel() * 4 for k, v in state.items() if "embed_tokens" not in k)
    # Once before measuring: the modules it imports on first use are not what this test counts.
    export.write_hf_checkpoint(tmp_path / "warm", NumpyView(state), model.config, tokenizer, config.to_dict(),
                               max_shard_size="3MB")
    tracemalloc.start()
    try:
        result = export.write_hf_checkpoint(tmp_path / "hf", NumpyView(state), model.config, tokenizer,
                                            config.to_dict(), max_shard_size="3MB")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The largest tensor (the embedding or the head) is 1/25 of the model; one file is about half.
    assert peak < total / 5, (peak, total)
    assert result.max_difference is None and "the reload with plain transformers was skipped: the model " \
                                              "needs 9 TiB" in result.describe()
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    written = SafetensorsView(weight_files(tmp_path / "hf"))
    assert len(result.files) == len(weight_files(tmp_path / "hf")) > 1
    assert sorted(written) == sorted(k for k in state if "embed_tokens" not in k)
    for name in written:
        assert export.same_bits(written[name], state[name]), name


def test_a_tensor_that_reads_back_otherwise_is_refused(tmp_path, monkeypatch):
    from ipu_t5.errors import UserError
    from ipu_t5.tokenizer import demo_tokenizer

    config = load_config("tiny")
    model = build_model(config, 512)
    state = dict(model.state_dict())
    real = export.same_bits
    monkeypatch.setattr(export, "same_bits", lambda a, b: real(a, b) and a.shape != (128,))
    tokenizer = demo_tokenizer(["some words to train a tokenizer on"] * 20, 64)
    with pytest.raises(UserError, match="did not read back as written .* tensors differ"):
        export.write_hf_checkpoint(tmp_path / "hf", state, model.config, tokenizer, config.to_dict())
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == []
