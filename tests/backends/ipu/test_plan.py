"""The IPU plan: poptorch's rules checked before any compile, and per-IPU memory against hand arithmetic."""
import pytest

from ipu_t5.config import load_config
from ipu_t5.errors import UserError
from ipu_t5.backends.ipu.memory import SRAM_BYTES
from ipu_t5.backends.ipu.plan import IpuPlanRefused, plan_ipu
from ipu_t5.layout import plan_from_config

pytestmark = pytest.mark.core
MB = 10 ** 6


def ipu_plan(model, source=128, target=4, **values):
    config = load_config(model, **values)
    return plan_ipu(config, plan_from_config(config, source, target), source, target)


def test_pipelined_small_on_one_ipu_matches_hand_arithmetic():
    plan = ipu_plan("small", 128, 8, **{"layout.micro_batch_size": 16, "ipu.embedding_serialization_factor": 8,
                                        "ipu.execution_strategy": "pipelined"})
    assert plan.execution == "pipelined" and plan.layout.micro_batches == 4
    (ipu,) = plan.ipus
    # flan-t5-small: d_model 512, d_ff 1024, 6 heads x 64, 8 + 8 blocks, vocabulary 32128.
    attention, ff = 4 * 512 * 384, 3 * 512 * 1024
    encoder_block, decoder_block = attention + ff + 2 * 512, 2 * attention + ff + 3 * 512
    params = 8 * encoder_block + 8 * decoder_block + 2 * 32 * 6 + 2 * 32128 * 512 + 2 * 512
    assert ipu.params == params == 76961152
    assert ipu.weights == ipu.gradients == 2 * params  # float16 weights and accumulators
    # Optimizer state streamed: on chip only the moments of the largest tensor, a 4016-row slice.
    assert ipu.optimizer == 8 * (32128 // 8) * 512
    assert ipu.streamed == 8 * params
    m, s, t = 16, 128, 8
    # One micro-batch in flight on a single stage: block inputs (float32), the encoder's position
    # bias with mask, and what decoder blocks read (encoder output, their bias, the source mask).
    stash = 8 * m * s * 512 * 4 + 8 * m * t * 512 * 4 + m * 6 * s * s * 2 + (m * s * 512 * 2 + m * 6 * t * t * 2 + m * s * 2)
    stream = m * s * 512 * 6
    encoder_block_work = ((stream + 4 * m * s * 384 * 2 + m * 6 * s * s * 8)
                          + (stream + 3 * m * s * 1024 * 2) + m * s * (1024 * 2 + 2 * 512 * 4))
    assert ipu.activations == stash + 2 * encoder_block_work
    assert ipu.working == int(0.2 * SRAM_BYTES) + 100 * MB
    assert ipu.onchip == 758451200 and ipu.fits


def test_phased_xxl_on_64_ipus_matches_hand_arithmetic():
    plan = ipu_plan("xxl", **{"layout.replicas": 4, "layout.micro_batch_size": 2,
                              "ipu.embedding_serialization_factor": 2, "ipu.matmul_proportion": 0.2})
    assert (plan.execution, plan.total_ipus, plan.shards) == ("phased", 64, 4)
    decoder_only = [m for m in plan.ipus if all(b.startswith("decoder.") and "norm" not in b for b in m.blocks)]
    assert decoder_only
    # flan-t5-xxl: the largest phase is a decoder block's wi_0 + wi_1 (+ layer norm).
    ff_in = 2 * 4096 * 10240 + 4096
    m, t = 2, 4
    activations = 2 * (m * t * 4096 * 6 + 3 * m * t * 10240 * 2)
    expected = 2 * ff_in + 2 * ff_in + 8 * 4096 * 10240 // 4 + activations + int(0.2 * SRAM_BYTES) + 100 * MB
    decoder_block = 2 * 4 * 4096 * 4096 + 3 * 4096 * 10240 + 3 * 4096
    for ipu in decoder_only:
        assert ipu.peak_piece.endswith(".ff_in")
        assert ipu.onchip == expected == 700823040
        blocks = len(ipu.blocks)
        params = blocks * decoder_block + (32 * 64 if "decoder.0" in ipu.blocks else 0)
        # Streamed: weights and moments sharded over 4 replicas, float16 accumulators whole.
        assert ipu.streamed == 2 * params // 4 + 2 * params + 8 * params // 4


@pytest.mark.parametrize("model, replicas, per_replica", [("xxl", 4, 16), ("xl", 1, 8), ("xl", 2, 8)])
def test_accepted_plans_place_every_block_once_within_budget(model, replicas, per_replica):
    plan = ipu_plan(model, **{"layout.replicas": replicas})
    assert plan.ipus_per_replica == per_replica and plan.total_ipus == per_replica * replicas
    assert all(m.onchip <= SRAM_BYTES for m in plan.ipus)
    placed = [b for m in plan.ipus for b in m.blocks]
    size = plan.layout.size
    assert sorted(placed) == sorted(size.block_names + ["embedding", "lm_head", "encoder.final_layer_norm",
                                                        "decoder.final_layer_norm"])
    for m in plan.ipus:
        assert m.params == plan.layout.stage_params(m.ipu)
        assert all(plan.layout.stage_of(b) == m.ipu for b in m.blocks)
    assert plan.ipus[0].blocks[0] == "embedding" and plan.ipus[-1].blocks[-1] == "lm_head"


def test_xxl_and_xl_weights_alone_exceed_sram_when_pipelined():
    for model, stages in (("xxl", 16), ("xl", 8)):
        with pytest.raises(IpuPlanRefused) as refused:
            ipu_plan(model, **{"ipu.execution_strategy": "pipelined"})
        (attempt,) = refused.value.attempts
        assert attempt.ipus_per_replica == stages
        assert max(m.weights for m in attempt.ipus) > SRAM_BYTES * 0.75
        assert not attempt.fits and "pipelined execution needs" in str(refused.value)


def test_a_plan_that_cannot_fit_is_refused_with_the_per_ipu_numbers():
    # One replica: nothing shards the optimizer state, and a 42M-element matrix's moments alone are 336 MB.
    with pytest.raises(IpuPlanRefused) as refused:
        ipu_plan("xxl", **{"ipu.matmul_proportion": 0.2, "ipu.execution_strategy": "auto"})
    message = str(refused.value)
    assert "xxl does not fit 16 IPU(s) per replica x 1 replica(s)" in message and "MB on IPU" in message
    assert [a.execution for a in refused.value.attempts] == ["pipelined", "phased"]
    assert all(not a.fits for a in refused.value.attempts)
    assert "on chip MB" in refused.value.details and " NO" in refused.value.details


def test_ipu_counts_must_be_powers_of_two_unless_rounded():
    with pytest.raises(UserError, match="6 IPUs per replica x 1 replica.* = 6 IPUs.*powers of two"):
        ipu_plan("large", **{"layout.stages": 6})
    plan = ipu_plan("large", **{"layout.stages": 6, "ipu.auto_round_num_ipus": True})
    assert plan.total_ipus == 6


def test_pipelined_training_needs_accumulation_for_forward_and_backward_stages():
    # 4 IPUs run 7 pipeline stages in training: 4 forward, 3 backward (the last fused).
    with pytest.raises(UserError, match="gradient accumulation >= 7.*gives 4 micro-batch"):
        ipu_plan("base", **{"layout.stages": 4, "layout.gradient_accumulation_steps": 4,
                            "ipu.execution_strategy": "pipelined", "training.global_batch_size": 64})
    plan = ipu_plan("base", **{"layout.stages": 4, "layout.gradient_accumulation_steps": 8,
                               "ipu.execution_strategy": "pipelined", "training.global_batch_size": 64})
    assert plan.layout.micro_batches == 8


def test_pipelined_inference_needs_device_iterations_for_every_stage():
    with pytest.raises(UserError, match="at least 4 device iterations.*is 2"):
        ipu_plan("base", **{"layout.stages": 4, "ipu.inference_device_iterations": 2,
                            "ipu.execution_strategy": "pipelined"})
    assert ipu_plan("base", **{"layout.stages": 4, "ipu.execution_strategy": "pipelined"}).inference_device_iterations == 4


def test_phased_plans_list_every_piece_once_in_execution_order():
    plan = ipu_plan("xl", **{"layout.replicas": 2})
    phases = plan.phases()
    names = [name for name, _ in phases]
    assert len(names) == len(set(names))
    ipus = [ipu for _, ipu in phases]
    assert ipus == sorted(ipus)  # contiguous runs of blocks: no IPU is revisited
    assert names[0] == "embedding.0" and names[-1].startswith("lm_head.")
    assert "encoder.0.attention" in names and "decoder.23.ff_out" in names


def test_more_replicas_shard_the_streamed_state():
    one = ipu_plan("xl")
    two = ipu_plan("xl", **{"layout.replicas": 2, "training.global_batch_size": 128})
    assert two.shards == 2 and one.shards == 1
    assert sum(m.streamed for m in two.ipus) < sum(m.streamed for m in one.ipus)


def test_json_form_names_the_blocks_and_bytes_per_ipu():
    data = ipu_plan("xxl", **{"layout.replicas": 4}).to_dict()
    assert (data["total_ipus"], data["ipus_per_replica"], data["replicas"], data["execution"]) == (64, 16, 4, "phased")
    assert len(data["ipus"]) == 16 and data["ipus"][3]["ids"] == [3, 19, 35, 51]
    blocks = [b for ipu in data["ipus"] for b in ipu["blocks"]]
    assert all(blocks.count("encoder.{}".format(i)) == 1 and blocks.count("decoder.{}".format(i)) == 1
               for i in range(24))
    assert all(ipu["onchip_bytes"] <= data["sram_bytes"] for ipu in data["ipus"])
