"""The IPU plan: poptorch's rules checked before any compile, and per-IPU memory against hand arithmetic."""
import pytest

from ipu_t5.config import load_config
from ipu_t5.errors import UserError
from ipu_t5.backends.ipu.calibration import calibrate
from ipu_t5.backends.ipu.generation_cost import GRAPHCORE_VALIDATION_SECONDS, generation_cost
from ipu_t5.backends.ipu.memory import SRAM_BYTES
from ipu_t5.backends.ipu.plan import IpuPlanRefused, plan_ipu
from ipu_t5.backends.ipu.report import HEADROOM
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


# ----- phased execution: every phase split over the replica's IPUs -----

def split_hand_arithmetic(d, inner, ff, heads, layers, n, m, s, t, micro_batches, matmul_proportion):
    """Per IPU of a phase split n ways, float16, one replica, written out from the T5 shapes alone:
    the fullest phase's bytes on chip (block 0's encoder self-attention), FLOPs and bytes to and
    from Streaming Memory per step."""
    vocab, a = 32128, 2
    # On chip at encoder.0's self-attention: its share of q, k, v, o, the layer norm and the bias.
    share = (4 * d * inner + d + 32 * heads) // n
    common = m * s * d // n * (4 + 4 + a) + m * s * d * a  # float32 stream chunks, the gathered input
    work = 4 * m * s * inner // n * a + m * (heads // n) * s * s * (4 + 2 * a)  # q k v context, scores
    partials = m * s * d * a + (n - 1) * m * s * d // n * a  # its own partial, the others' chunks
    onchip = (2 * share * a + 8 * d * inner // n + 2 * (common + work) + 2 * partials
              + int(matmul_proportion * 900e6) + 100e6)
    # FLOPs: the forward of every sub-layer per sample, three times (forward and backward), 1/n each.
    encoder = s * 8 * d * inner + 4 * s * s * inner + s * 6 * d * ff
    decoder = (t * 8 * d * inner + 4 * t * t * inner) + (t * 4 * d * inner + s * 4 * d * inner + 4 * t * s * inner) \
        + t * 6 * d * ff
    flops = 128 * 3 * (layers * (encoder + decoder) + 2 * vocab * d * t) / n

    # Streamed per micro-batch and phase: weights in twice, accumulators in and out, what the
    # backward keeps of the forward out and back in; once per step the AdamW update.
    def saved(kind, length):
        kept = m * length * d // n * 4 + m * length * d * a
        if kind == "attention":
            return kept + 4 * m * length * inner // n * a + m * (heads // n) * length * length * a
        if kind == "cross":
            return kept + m * s * d * a + 2 * m * (s + t) * inner // n * a + m * (heads // n) * t * s * a
        return kept + 4 * m * length * ff // n * a
    attention, ffn, first = (4 * d * inner + d) // n, (3 * d * ff + d) // n, (4 * d * inner + d + 32 * heads) // n
    phases = [(vocab * d // n, 0), (first, saved("attention", s)), (first, saved("attention", t))]
    phases += [(attention, saved("attention", s))] * (layers - 1) + [(ffn, saved("ff", s))] * layers
    phases += [(attention, saved("attention", t))] * (layers - 1) + [(attention, saved("cross", t))] * layers
    phases += [(ffn, saved("ff", t))] * layers + [(vocab * d // n, m * t * d * a + m * t * vocab // n * 4)]
    params = sum(p for p, _ in phases) + 2 * d // n  # and the final layer norms
    streamed = micro_batches * sum(8 * p + 2 * k for p, k in phases) + 2 * params + 2 * (2 + 8) * params
    return onchip, flops, streamed


@pytest.mark.parametrize("model, ipus, heads, d, ff, micro", [("xxl", 16, 64, 4096, 10240, 8),
                                                              ("xl", 8, 32, 2048, 5120, 8)])
def test_phased_plans_of_the_presets_match_hand_arithmetic(model, ipus, heads, d, ff, micro):
    chosen = ipu_plan(model, 512, 8)  # Graphcore's settings: global batch 128, 512-token prompts
    # The gradient-accumulation schedule, which the plan weighs against the batch-serialised one.
    plan = chosen.other_schedule
    assert plan.batch_serial is None and chosen.batch_serial is not None
    assert (plan.execution, plan.phasing, plan.total_ipus, plan.ipus_per_phase) == ("phased", "serial", ipus, ipus)
    assert plan.layout.micro_batch_size == micro and plan.layout.global_batch_size == 128
    proportion = 0.2  # the presets' matmul_proportion, Graphcore's own
    onchip, flops, streamed = split_hand_arithmetic(d, d, ff, heads, 24, ipus, micro, 512, 8, 128 // micro,
                                                    proportion)
    assert all(m.onchip <= SRAM_BYTES for m in plan.ipus)
    assert max(m.onchip for m in plan.ipus) == pytest.approx(onchip, abs=MB)
    assert plan.cost.flops == pytest.approx(flops, rel=1e-9)
    assert plan.cost.streamed_bytes == pytest.approx(streamed, rel=1e-6)
    parts = plan.cost
    assert parts.step_seconds == pytest.approx(parts.compute_seconds + parts.streaming_seconds + parts.exchange_seconds)
    assert parts.compute_seconds == pytest.approx(flops / 125e12, rel=1e-9)  # 50% of 250 TFLOPS
    assert parts.streaming_seconds == pytest.approx(streamed / 16e9, rel=1e-6)


def test_presets_meet_graphcores_step_times_on_paper():
    """At Graphcore's workload (global batch 128, 512-token prompts and targets) XXL on a Pod16 and
    XL on a Pod8 estimate faster than Graphcore measured (36 s and 16 s) at the calibrated rates and
    under every single-term explanation; XXL at MNLI's 8-token targets at most half of 36 s."""
    xxl, xl = ipu_plan("xxl", 512, 512), ipu_plan("xl", 512, 512)
    assert xxl.graphcore_workload() and xl.graphcore_workload()
    assert xxl.published_step_seconds() == 36.0 and max(xxl.calibrated().values()) < 36.0
    assert xl.published_step_seconds() == 16.0 and max(xl.calibrated().values()) < 16.0
    mnli = ipu_plan("xxl", 512, 8)
    assert not mnli.graphcore_workload() and mnli.calibrated()["calibrated"] <= 18.0
    assert max(p.cost.streamed_bytes for p in (xxl, mnli)) <= 60e9
    assert ipu_plan("xl", 128, 8).cost.samples_per_second >= 4 * 128 / 16.0
    assert ipu_plan("xxl", 128, 8).cost.samples_per_second >= 4 * 128 / 36.0
    pod64 = ipu_plan("xxl", 512, 8, **{"layout.replicas": 4})
    assert pod64.fits and pod64.total_ipus == 64 and pod64.ipus_per_phase == 16 and pod64.shards == 4


def test_xxl_at_128_token_prompts_on_a_pod16_takes_fewer_micro_batches_than_ipus():
    """Phased execution has no pipeline to fill: at 128-token prompts XXL's 16 IPUs take 4
    micro-batches of 32 (a pipeline would need 31), which stream every phase's weights in 4 times
    instead of 16, and estimate over four times Graphcore's 3.56 samples/s."""
    plan = ipu_plan("xxl", 128, 8).other_schedule
    assert (plan.execution, plan.phasing, plan.ipus_per_replica) == ("phased", "serial", 16)
    assert (plan.layout.micro_batch_size, plan.layout.micro_batches) == (32, 4)
    d, ff, n, m, s, a = 4096, 10240, 16, 32, 128, 2
    onchip, flops, streamed = split_hand_arithmetic(d, d, ff, 64, 24, n, m, s, 8, 4, 0.2)
    assert plan.cost.flops == pytest.approx(flops, rel=1e-9)
    assert plan.cost.streamed_bytes == pytest.approx(streamed, rel=1e-6)
    # The fullest phase is now the last encoder feed-forward (its share of wi_0, wi_1, wo and of
    # two layer norms), not block 0's attention: 32 x 128 tokens of 10240 inner units.
    (fullest,) = {m_.peak_piece for m_ in plan.ipus}
    assert fullest == "encoder.23.ff"
    share = (3 * d * ff + 2 * d) // n
    common = m * s * d // n * (4 + 4 + a) + m * s * d * a
    work = 3 * m * s * ff // n * a
    partials = m * s * d * a + (n - 1) * m * s * d // n * a
    ff_onchip = 2 * share * a + 8 * d * ff // n + 2 * (common + work) + 2 * partials + int(0.2 * 900e6) + 100 * MB
    assert max(m_.onchip for m_ in plan.ipus) == ff_onchip == 581991936 > onchip
    assert ff_onchip <= HEADROOM * SRAM_BYTES  # the planner keeps 15% of SRAM spare
    assert plan.cost.samples_per_second == pytest.approx(128 / plan.cost.step_seconds)
    assert plan.cost.samples_per_second >= 4 * 128 / 36.0


@pytest.mark.parametrize("model, ipus, d, ff", [("xxl", 16, 4096, 10240), ("xl", 8, 2048, 5120)])
def test_batch_serialised_phases_stream_each_phase_once_per_step(model, ipus, d, ff):
    """Batch-serialised, a phase's weights come in twice per step (forward, backward) and its
    accumulators go out once, whatever the slices; with recomputation each slice streams only the
    phase's float32 input chunk out and back: hand arithmetic from the T5 shapes."""
    plan = ipu_plan(model, 512, 8)
    serial = plan.batch_serial
    assert serial is not None and serial.recompute and plan.layout.micro_batches == 1
    assert plan.layout.micro_batch_size == 128 == serial.factor * serial.slice_size
    n, a, s, t, vocab, m = ipus, 2, 512, 8, 32128, serial.slice_size
    share = sum(p.share for p in plan.split_phases)
    assert share == pytest.approx(plan.layout.size.total_params() / n, rel=1e-6)  # 1/n of every parameter
    inputs = sum((s if p.stack == "encoder" else t) * d // n * 4 for p in plan.split_phases if p.kind != "embedding")
    streamed = 128 * 2 * inputs + 3 * a * share + a * share + 2 * (a + 8) * share
    assert plan.cost.streamed_bytes == pytest.approx(streamed, rel=1e-9)
    # Against gradient accumulation, which streams every phase's weights again per micro-batch.
    assert plan.other_schedule.cost.streamed_bytes > 5 * plan.cost.streamed_bytes


@pytest.mark.parametrize("model, replicas, per_replica", [("xxl", 4, 16), ("xl", 1, 8), ("xl", 2, 8)])
def test_every_ipu_of_a_replica_takes_part_in_every_phase(model, replicas, per_replica):
    # 512-token prompts: at 128 XXL on a Pod64 takes one micro-batch of 32 per replica, where
    # parallel phases estimate faster (each IPU then works on every other phase).
    plan = ipu_plan(model, 512, 8, **{"layout.replicas": replicas})
    assert plan.ipus_per_replica == per_replica and plan.total_ipus == per_replica * replicas
    assert plan.ipus_per_phase == per_replica
    assert all(m.onchip <= SRAM_BYTES for m in plan.ipus)
    assert all(ipus == tuple(range(per_replica)) for _, ipus in plan.phases())
    # The phases add up to the whole model, and each IPU holds 1/n of every phase.
    assert sum(p.params for p in plan.split_phases) == plan.layout.size.total_params()
    assert all(p.params // per_replica <= p.share <= -(-p.params // per_replica) for p in plan.split_phases)
    assert {m.params for m in plan.ipus} == {sum(p.share for p in plan.split_phases)}


def test_parallel_phases_alternate_between_the_even_and_the_odd_ipus():
    config = load_config("xxl")
    plan = plan_ipu(config, plan_from_config(config, 512, 8), 512, 8, phasings=("parallel",))
    assert plan.phasing == "parallel" and plan.ipus_per_phase == 8
    for index, (_, ipus) in enumerate(plan.phases()):
        assert ipus == tuple(range(index % 2, 16, 2))
    chosen = ipu_plan("xxl", 512, 8)
    serial = chosen.other_schedule  # gradient accumulation under serial phases, as the parallel plan
    # Each phase on half the IPUs takes twice as long to compute; streaming the next phase hides
    # under compute only as far as the two are equal, so serial phases are faster here, and the
    # plan says so. (The even group gets every feed-forward phase: the busier IPUs are reported.)
    assert plan.cost.compute_seconds == pytest.approx(2 * serial.cost.compute_seconds, rel=1e-9)
    assert plan.cost.flops > serial.cost.flops
    assert plan.cost.step_seconds > serial.cost.step_seconds
    assert chosen.reason.startswith("serial phases (every phase on all 16 IPUs)") and "parallel phases" in chosen.reason


def test_xxl_and_xl_weights_alone_exceed_sram_when_pipelined():
    for model, stages in (("xxl", 16), ("xl", 8)):
        with pytest.raises(IpuPlanRefused) as refused:
            ipu_plan(model, **{"ipu.execution_strategy": "pipelined"})
        (attempt,) = refused.value.attempts
        assert attempt.ipus_per_replica == stages
        assert max(m.weights for m in attempt.ipus) > SRAM_BYTES * 0.75
        assert not attempt.fits and "pipelined execution needs" in str(refused.value)


def test_a_plan_that_cannot_fit_is_refused_with_the_per_ipu_numbers():
    # One IPU per replica: a feed-forward phase's 126M float16 weights, their accumulators and the
    # largest matrix's 336 MB of AdamW moments are past the SRAM before any activation.
    with pytest.raises(IpuPlanRefused) as refused:
        ipu_plan("xxl", **{"layout.stages": 1, "ipu.execution_strategy": "auto"})
    message = str(refused.value)
    assert "xxl does not fit 1 IPU(s) per replica x 1 replica(s)" in message and "MB on IPU" in message
    assert "parallel phases alternate between two groups of IPUs" in message
    assert [a.execution for a in refused.value.attempts] == ["pipelined", "phased"]
    assert all(not a.fits for a in refused.value.attempts)
    assert "on chip MB" in refused.value.details and " NO" in refused.value.details


def test_ipu_counts_must_be_powers_of_two_unless_rounded():
    with pytest.raises(UserError, match="6 IPUs per replica x 1 replica.* = 6 IPUs.*powers of two"):
        ipu_plan("base", **{"layout.stages": 6})
    plan = ipu_plan("base", **{"layout.stages": 6, "ipu.auto_round_num_ipus": True})
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


def test_phased_plans_list_every_phase_once_in_execution_order():
    plan = ipu_plan("xl", **{"layout.replicas": 2})
    names = [name for name, _ in plan.phases()]
    assert len(names) == len(set(names)) == 1 + 24 * 2 + 24 * 3 + 1
    assert names[0] == "embedding" and names[-1] == "lm_head"
    assert names[1:3] == ["encoder.0.attention", "encoder.0.ff"] and names[49] == "decoder.0.self_attention"
    assert "decoder.23.cross_attention" in names
    assert plan.split_phases[48].blocks == ("encoder.23", "encoder.final_layer_norm")


def test_more_replicas_shard_the_streamed_state():
    one = ipu_plan("xl")
    two = ipu_plan("xl", **{"layout.replicas": 2, "training.global_batch_size": 128})
    assert two.shards == 2 and one.shards == 1
    assert sum(m.streamed for m in two.ipus) < sum(m.streamed for m in one.ipus)


def test_json_form_gives_the_phases_bytes_and_step_estimate():
    data = ipu_plan("xxl", 512, 8, **{"layout.replicas": 4}).to_dict()
    assert (data["total_ipus"], data["ipus_per_replica"], data["replicas"], data["execution"]) == (64, 16, 4, "phased")
    assert data["phasing"] == "serial" and data["ipus_per_phase"] == 16
    assert len(data["ipus"]) == 16 and data["ipus"][3]["ids"] == [3, 19, 35, 51]
    assert all(phase["ipus"] == list(range(16)) for phase in data["phases"])
    assert all(ipu["onchip_bytes"] <= data["sram_bytes"] for ipu in data["ipus"])
    parts = data["compute_seconds"] + data["streaming_seconds"] + data["exchange_seconds"]
    assert data["estimated_step_seconds"] == pytest.approx(parts)
    assert data["samples_per_second"] == pytest.approx(128 / data["estimated_step_seconds"])
    assert data["rates"]["matmul_efficiency"] <= 0.5 and data["rates"]["peak_flops_per_ipu"] == 250e12


def test_calibration_reproduces_graphcores_two_step_times_with_one_set_of_rates():
    """Graphcore's XXL/Pod16 and XL/Pod8 runs, modelled with the planner's own costs, land within
    15% of their measured 36 s and 16 s with one factor on every rate; each single-term factor
    makes that term alone slower than assumed."""
    calibration = calibrate()
    assert {(r.model, r.ipus) for r in calibration.runs} == {("xxl", 16), ("xl", 8)}
    for run in calibration.runs:
        assert abs(run.base.step_seconds * calibration.factor / run.measured - 1) <= 0.15
        assert run.base.step_seconds < run.measured  # the base rates are too fast
    assert calibration.factor > 1 and all(f > calibration.factor for f in calibration.single.values())


def test_validation_estimate_with_the_key_value_cache():
    """At Graphcore's validation settings (micro-batch 20, 268-token prompts, 5 new tokens, 9,832
    prompts) the whole-model-per-token estimate at the calibrated rates lands within 15% of their
    measured 18 minutes (the calibration saw only training steps); the key/value cache is faster at
    their batch. The fastest batch that fits runs the decoder step over several encoder chunks at
    once, faster than both executors at the largest batch the encoder fits, and within issue 25's
    target of a third of Graphcore's 18 minutes."""
    values = {"validation.max_new_tokens": 5, "validation.per_device_eval_batch_size": 20}
    plan = ipu_plan("xxl", 268, 8, **values)
    g = plan.generation
    assert (g.prompts, g.batch, g.calls, g.encoder_batch) == (9832, 20, 492, 20) and g.fits
    assert abs(g.whole_model_seconds / GRAPHCORE_VALIDATION_SECONDS - 1) <= 0.15
    assert g.seconds < g.whole_model_seconds
    assert g.best_batch >= 2 * g.best_encoder_batch and g.best_seconds < g.seconds
    one_batch = generation_cost(plan.layout.size, plan.split_phases, plan.ipus_per_phase,
                                plan.embedding_serialization_factor, g.best_encoder_batch, plan.replicas, plan.shards,
                                268, 5, 2, load_config("xxl", **values).ipu.matmul_proportion, rates=calibrate().rates)
    assert one_batch.peak_bytes <= HEADROOM * SRAM_BYTES
    assert g.best_seconds < one_batch.seconds
    assert g.best_seconds <= GRAPHCORE_VALIDATION_SECONDS / 3
    assert "Validation of 9,832 prompts" in plan.table()
