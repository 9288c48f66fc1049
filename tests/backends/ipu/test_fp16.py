"""float16 numerics for T5: finite where plain float16 overflows, and equal to float32 otherwise."""
import copy

import pytest
import torch

from ipu_t5.backends.ipu.fp16 import use_float16_numerics
from ipu_t5.config import load_config
from ipu_t5.model_source import build_model

from tests.conftest import cpu_has_float16_matmul


pytestmark = [pytest.mark.core, pytest.mark.skipif(not cpu_has_float16_matmul(),
                                reason="this torch has no float16 matmul on the CPU (torch 2.0.1 lacks it); "
                                       "the IPU runs these numerics in float16 itself")]


def logits(model, ids):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :4], use_cache=False)
    return out.logits.float()


@pytest.fixture
def tiny_t5(tmp_path):
    torch.manual_seed(0)
    return build_model(load_config("tiny", overrides=["output.output_dir={}".format(tmp_path)]), 512).eval()


def test_float16_numerics_match_float32(tiny_t5):
    ids = torch.randint(3, 512, (2, 12))
    reference = logits(tiny_t5, ids)
    model = copy.deepcopy(tiny_t5)
    use_float16_numerics(model)
    got = logits(model.half(), ids)
    torch.testing.assert_close(got, reference, rtol=2e-2, atol=2e-2)
    assert set(model.state_dict()) == set(tiny_t5.state_dict())  # names unchanged


def test_feed_forward_overflow_stays_finite(tiny_t5):
    # Feed-forward outputs past 1e5 overflow float16 (max 65504), as in large T5 checkpoints; plain
    # float16 overflows (transformers clamps the damage, the result is still wrong).
    with torch.no_grad():
        for block in tiny_t5.encoder.block:
            block.layer[-1].DenseReluDense.wo.weight.mul_(40000.0)
    ids = torch.randint(3, 512, (2, 12))
    reference = logits(tiny_t5, ids)
    plain = logits(copy.deepcopy(tiny_t5).half(), ids)
    plain_error = (plain - reference).abs().max() if torch.isfinite(plain).all() else float("inf")
    safe = copy.deepcopy(tiny_t5)
    use_float16_numerics(safe)
    got = logits(safe.half(), ids)
    assert torch.isfinite(got).all()
    safe_error = (got - reference).abs().max()
    assert safe_error < 0.05 and plain_error > 10 * safe_error
