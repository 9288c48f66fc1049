"""training.auto_find_batch_size (ipu_t5/backends/batch_search.py): the largest micro-batch the memory
plan fits on a (faked) small device, the global batch kept; one line when not even 1 fits."""
import pytest

from ipu_t5.backends.batch_search import fitted_plan, micro_batch_candidates
from ipu_t5.backends.single import SingleProcessBackend
from ipu_t5.backends.torch_distributed import memory_report
from ipu_t5.backends.torch_distributed.memory import plan_memory
from ipu_t5.backends.torch_distributed.memory_report import Memory
from ipu_t5.data.features import Lengths
from ipu_t5.errors import UserError
from ipu_t5.layout import plan_from_config

pytestmark = pytest.mark.core

SOURCE, TARGET = 96, 8


def gpu_of(monkeypatch, size: int) -> None:
    monkeypatch.setattr(memory_report, "available_memory",
                        lambda device_memory=None: Memory("gpu", size, "{} bytes per GPU (test)".format(size)))


def peaks(config, micro_sizes):
    """The plan's largest rank on a GPU for each micro-batch size (the rest of the layout as given)."""
    out = {}
    for micro in micro_sizes:
        config.layout.micro_batch_size = micro
        out[micro] = plan_memory(config, SOURCE, TARGET, "gpu",
                                 plan_from_config(config, SOURCE, TARGET)).largest_process_bytes
    config.layout.micro_batch_size = None
    return out


def test_candidates_are_the_divisors_of_each_replicas_share():
    assert micro_batch_candidates(24, 2) == [12, 6, 4, 3, 2, 1]
    assert micro_batch_candidates(7, 2) == []


@pytest.mark.parametrize("between", [(4, 8), (1, 2)])
def test_picks_the_largest_micro_batch_the_plan_fits_and_keeps_the_global_batch(make_config, monkeypatch, between):
    # Without validation, whose generation caches would set the tiny model's peak at small micro-batches.
    config = make_config(**{"training.global_batch_size": 32, "training.auto_find_batch_size": "true",
                            "validation.do_eval": "false"})
    peak = peaks(config, [1, 2, 4, 8, 16, 32])
    fits, too_big = between
    assert peak[fits] < peak[too_big]
    gpu_of(monkeypatch, (peak[fits] + peak[too_big]) // 2)
    plan = SingleProcessBackend.layout_plan(config, Lengths(SOURCE, TARGET))
    assert plan.micro_batch_size == fits
    assert plan.micro_batch_size * plan.micro_batches * plan.replicas == 32
    # The config itself is left as the user wrote it (the plan carries the choice).
    assert config.layout.micro_batch_size is None


def test_a_pipeline_keeps_enough_micro_batches_to_fill_its_stages(make_config, monkeypatch):
    config = make_config(**{"training.global_batch_size": 16, "training.auto_find_batch_size": "true",
                            "layout.stages": 2, "layout.backend": "torch"})
    gpu_of(monkeypatch, 10 ** 12)
    plan = fitted_plan(config, SOURCE, TARGET, lambda c: plan_from_config(c, SOURCE, TARGET))
    # 16 would leave one micro-batch for two stages: 8 is the largest the pipeline can run.
    assert (plan.micro_batch_size, plan.micro_batches) == (8, 2)


def test_refused_in_one_line_when_not_even_one_fits(make_config, monkeypatch):
    config = make_config(**{"training.auto_find_batch_size": "true"})
    gpu_of(monkeypatch, 10 ** 6)
    with pytest.raises(UserError) as refused:
        SingleProcessBackend.layout_plan(config, Lengths(SOURCE, TARGET))
    message = str(refused.value)
    assert "\n" not in message and "not even micro-batch 1" in message and "auto_find_batch_size" in message


def test_off_by_default_and_refused_beside_a_given_micro_batch(make_config, monkeypatch):
    config = make_config(**{"training.global_batch_size": 32})
    gpu_of(monkeypatch, 10 ** 6)  # the plan is not consulted: the micro-batch follows the layout
    assert SingleProcessBackend.layout_plan(config, Lengths(SOURCE, TARGET)).micro_batch_size == 32
    with pytest.raises(UserError, match="picks the micro-batch itself"):
        make_config(**{"training.auto_find_batch_size": "true", "layout.micro_batch_size": 4})
