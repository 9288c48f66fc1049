"""The layout plan: how stages, replicas and micro-batches split the model and the global batch, and
every layout that cannot work refused with the numbers that do not fit."""
import itertools

import pytest

from ipu_t5.errors import UserError
from ipu_t5.layout import MEMORY_SLACK, plan_from_config, plan_layout, stage_costs
from ipu_t5.models import canonical_size

pytestmark = pytest.mark.core

TINY = canonical_size("tiny")  # 2 encoder + 2 decoder blocks
BASE = canonical_size("base")  # 12 + 12


def all_blocks(plan):
    return [b for blocks in plan.stage_blocks for b in blocks]


def test_global_batch_is_micro_batch_times_micro_batches_times_replicas():
    plan = plan_layout(BASE, 64, stages=4, replicas=2)
    assert plan.world_size == 8
    assert plan.global_batch_size == plan.micro_batch_size * plan.micro_batches * plan.replicas == 64
    # A pipeline gets at least 2p - 1 micro-batches by default, the fewest that divide evenly.
    assert plan.micro_batches == 8 and plan.micro_batch_size == 4
    split = plan.split(list(range(64)))
    assert [len(r) for r in split] == [8, 8] and all(len(m) == 4 for r in split for m in r)
    assert [x for r in split for m in r for x in m] == list(range(64))


def test_every_block_sits_on_exactly_one_stage_in_order():
    plan = plan_layout(BASE, 64, stages=4)
    names = all_blocks(plan)
    assert names[0] == "embedding" and names[-2:] == ["decoder.final_layer_norm", "lm_head"]
    assert [n for n in names if n[-1].isdigit()] == BASE.block_names
    last_encoder = names.index("encoder.11")
    assert names[last_encoder + 1] == "encoder.final_layer_norm"
    assert plan.stage_of("embedding") == 0 and plan.stage_of("lm_head") == 3


def test_compute_balanced_split_has_the_smallest_slowest_stage_of_all_contiguous_splits():
    costs = stage_costs(BASE, 128, 4)
    best = min(max(sum(costs[a:b]) for a, b in zip((0,) + cuts, cuts + (len(costs),)))
               for cuts in itertools.combinations(range(1, len(costs)), 3))
    plan = plan_layout(BASE, 64, stages=4, source_len=128, target_len=4, split_by="compute")
    assert plan.split_by == "compute"
    assert max(plan.stage_flops(i, 128, 4) for i in range(4)) == pytest.approx(best)
    assert plan.balance(128, 4) >= 1.0


def _stage_state(plan, stage):
    """Training state words of a stage by hand: 4 per parameter (weight, gradient, two AdamW
    moments); the shared embedding is held by the first stage only."""
    return 4 * plan.stage_params(stage)


def test_default_split_holds_the_least_training_state_any_contiguous_split_can_then_the_fastest():
    names = BASE.block_names
    results = []
    for cuts in itertools.combinations(range(1, len(names)), 3):
        counts = [b - a for a, b in zip((0,) + cuts, cuts + (len(names),))]
        plan = plan_layout(BASE, 64, stages=4, layers_per_stage=counts, source_len=48, target_len=4)
        results.append((max(_stage_state(plan, s) for s in range(4)),
                        max(plan.stage_flops(s, 48, 4) for s in range(4)), counts))
    least = min(r[0] for r in results)
    fastest = min(r[1] for r in results if r[0] <= least * (1 + MEMORY_SLACK))
    plan = plan_layout(BASE, 64, stages=4, source_len=48, target_len=4)
    assert plan.split_by == "memory"
    assert max(_stage_state(plan, s) for s in range(4)) <= least * (1 + MEMORY_SLACK)
    assert max(plan.stage_flops(s, 48, 4) for s in range(4)) == pytest.approx(fastest)
    # Balancing compute alone puts the whole decoder and the LM head on the last stage.
    compute = plan_layout(BASE, 64, stages=4, source_len=48, target_len=4, split_by="compute")
    assert compute.stage_blocks[3][0] == "decoder.0"
    assert max(_stage_state(compute, s) for s in range(4)) > 2 * max(_stage_state(plan, s) for s in range(4))


def test_layers_per_stage_is_followed_and_layers_per_ipu_is_its_spelling(make_config):
    plan = plan_layout(TINY, 16, stages=2, layers_per_stage=[1, 3])
    assert plan.stage_blocks == (("embedding", "encoder.0"),
                                 ("encoder.1", "encoder.final_layer_norm", "decoder.0", "decoder.1",
                                  "decoder.final_layer_norm", "lm_head"))
    config = make_config(**{"layout.stages": 2, "layout.layers_per_ipu": "[3, 1]"})
    assert config.layout.layers_per_stage == [3, 1]
    assert plan_from_config(config).stage_blocks[1] == ("decoder.1", "decoder.final_layer_norm", "lm_head")


def test_interleaved_schedule_puts_two_chunks_on_each_stage():
    plan = plan_layout(TINY, 16, stages=2, schedule="Interleaved1F1B")
    assert plan.chunks_per_stage == 2 and len(plan.stage_blocks) == 4
    assert plan.chunks_of(0) == [0, 2] and plan.chunks_of(1) == [1, 3]
    assert plan.stage_of("decoder.0") == 0 and plan.stage_of("lm_head") == 1
    assert plan.stage_params(0) == sum(TINY.block_params(b) for c in (0, 2) for b in plan.stage_blocks[c])
    assert "stage 0 (chunk 2): decoder.0" in plan.describe()


def test_describe_prints_the_batch_split_and_the_stages():
    # The compute-balanced cut puts runs of both stacks on stage 1 (the default cut by memory does not).
    text = plan_layout(TINY, 16, stages=2, replicas=2, split_by="compute").describe()
    assert text.splitlines()[0] == ("layout: 2 stage(s) x 2 replica(s) = 4 process(es); global batch 16 = "
                                    "micro-batch 2 x 4 micro-batch(es) x 2 replica(s)")
    assert "stage 1: encoder.1 .. encoder.final_layer_norm, decoder.0 .. decoder.final_layer_norm, lm_head" in text


@pytest.mark.parametrize("kwargs, message", [
    (dict(stages=5), "5 stages for a model of 4 blocks (2 encoder + 2 decoder): every stage needs at least one "
                     "block, so use at most 4 stages."),
    (dict(stages=2, layers_per_stage=[0, 4]), "layers_per_stage [0, 4] leaves a stage with no block: every "
                                              "count must be at least 1."),
    (dict(stages=2, layers_per_stage=[1, 2]), "layers_per_stage [1, 2] sums to 3 but the model has 4 blocks "
                                              "(2 encoder + 2 decoder)."),
    (dict(stages=2, layers_per_stage=[1, 1, 2]), "layers_per_stage [1, 1, 2] has 3 entries but there are 2 "
                                                 "stages: give one count per stage."),
    (dict(stages=2, replicas=3), "global batch 16 does not split over 3 replicas"),
    (dict(stages=2, micro_batch_size=3), "each replica's share of the global batch (16 / 1 = 16) is not a "
                                         "multiple of micro_batch_size 3."),
    (dict(stages=4, micro_batch_size=8), "a 4-stage pipeline needs at least 4 micro-batches per step, but global "
                                         "batch 16 over 1 replica(s) gives 2"),
    (dict(stages=1, schedule="Interleaved1F1B"), "the Interleaved1F1B schedule interleaves 2 model chunks per "
                                                 "stage over several stages, but the layout has 1 stage"),
    (dict(stages=3, schedule="Interleaved1F1B"), "3 stages x 2 interleaved chunks = 6 chunks for a model of 4 "
                                                 "blocks"),
    (dict(stages=2, schedule="Interleaved1F1B", layers_per_stage=[2, 2]),
     "layers_per_stage [2, 2] has 2 entries but Interleaved1F1B runs 2 stages x 2 = 4 model chunks"),
    (dict(stages=2, schedule="Interleaved1F1B", micro_batch_size=3, global_batch_size=15),
     "Interleaved1F1B runs micro-batches in rounds of 2 stages: 5 micro-batches per step is not a multiple "
     "of 2 rounds."),
])
def test_layouts_that_do_not_fit_are_refused_with_the_numbers(kwargs, message):
    global_batch = kwargs.pop("global_batch_size", 16)
    with pytest.raises(UserError) as err:
        plan_layout(TINY, global_batch, **kwargs)
    assert message in str(err.value)


def test_phased_ipu_layouts_take_fewer_micro_batches_than_stages():
    """Phased IPU execution is no pipeline: its stages are IPUs that each compute a share of every
    phase, so 2 micro-batches over 4 IPUs are allowed; a pipeline is still refused, in one line,
    by the layout and by the torch.distributed backend that would run it."""
    from ipu_t5.config import load_config
    from ipu_t5.layout import check_pipeline_fill

    phased = plan_layout(TINY, 16, stages=4, micro_batch_size=8, pipelined=False)
    assert (phased.micro_batch_size, phased.micro_batches) == (8, 2)
    with pytest.raises(UserError, match=r"^a 4-stage pipeline needs at least 4 micro-batches per step, but global "
                                        r"batch 16 over 1 replica\(s\) gives 2") as err:
        plan_layout(TINY, 16, stages=4, micro_batch_size=8)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="a 4-stage pipeline needs at least 4 micro-batches per step, but the layout "
                                        "gives 2"):
        check_pipeline_fill(phased)
    settings = {"layout.stages": 4, "layout.micro_batch_size": 8, "training.global_batch_size": 16}
    for backend in ("ipu", "auto"):
        config = load_config("tiny", **dict(settings, **{"layout.backend": backend, "ipu.execution_strategy": "phased"}))
        assert plan_from_config(config).micro_batches == 2
    for values in ({"layout.backend": "torch", "ipu.execution_strategy": "phased"},
                   {"layout.backend": "ipu", "ipu.execution_strategy": "auto"}):
        with pytest.raises(UserError, match="a 4-stage pipeline needs at least 4 micro-batches"):
            plan_from_config(load_config("tiny", **dict(settings, **values)))


def test_world_size_must_match_the_processes_launched():
    plan = plan_layout(TINY, 16, stages=2, replicas=2)
    plan.check_world_size(4)
    with pytest.raises(UserError, match=r"the layout needs stages x replicas = 2 x 2 = 4 processes but 3 "
                                        r"were launched: launch 4"):
        plan.check_world_size(3)
