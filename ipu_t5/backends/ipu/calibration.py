"""The step estimate's rates calibrated on Graphcore's two published Flan-T5 fine-tuning runs.

Graphcore's own app (graphcore/examples `nlp/t5/popxl`, commit 3cc8f81: `config/finetuning.yml`,
`finetuning.py`, `modelling/encoder_decoder.py`, `data/mnli_data.py`) trains XXL on a Pod16 with
tensor parallelism 16 and XL on a Pod8 with tensor parallelism 8, about 36 s and 16 s per step (the
fine-tuning notebook's figures), with this schedule, modelled here with the planner's own cost
functions (`batch_serial.phase_traffic`, `batch_serial.serial_cost`):
- global batch 128, micro-batch 1, so 128 slices of one sample per step (batch serialisation);
- prompts and targets both padded to 512 tokens;
- every block is a "unified" block: encoder blocks carry a cross-attention whose weights are zeros
  and whose output is multiplied by zero, streamed and computed like a decoder's (with 512-token
  targets the shapes are the same, so the decoder block's cross-attention stands in for it);
- recomputation on; weights, gradient accumulators (float16) and AdamW moments streamed.

Two measurements cannot pin three rates (compute efficiency, Streaming Memory, IPU-Links). The
calibration therefore scales all three by one factor (the geometric mean of measured / predicted
over the two runs), and also fits each single-term explanation (only compute, only Streaming
Memory, only the links slower than assumed), each by least squares on the log of the step. A
plan's calibrated estimate uses the one factor; its range spans the three single-term ones.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

from ...models import ModelSize, SIZES
from .batch_serial import serial_cost
from .cost import BASE_RATES, Rates, StepCost
from .memory import Shapes, SplitPhase, split_phases

# (model, tensor-parallel IPUs): Graphcore's measured seconds per step.
MEASURED = {("xxl", 16): 36.0, ("xl", 8): 16.0}
GRAPHCORE_BATCH = 128
GRAPHCORE_LENGTH = 512
EXPLANATIONS = ("compute", "streaming", "links")


@dataclass(frozen=True)
class Run:
    """One of Graphcore's runs: predicted at the base rates against measured."""

    model: str
    ipus: int
    measured: float
    base: StepCost


@dataclass(frozen=True)
class Calibration:
    """One factor on every rate, and the factor each single-term explanation needs."""

    runs: Tuple[Run, ...]
    factor: float
    single: Dict[str, float]

    @property
    def rates(self) -> Rates:
        return BASE_RATES.scaled(self.factor, self.factor, self.factor)

    def explanation_rates(self) -> Dict[str, Rates]:
        return {name: BASE_RATES.scaled(**{name: self.single[name]}) for name in EXPLANATIONS}


def graphcore_phases(size: ModelSize, parts: int) -> List[SplitPhase]:
    """The planner's phases for Graphcore's unified blocks: each encoder block also carries the
    matching decoder block's cross-attention (zeroed weights, computed all the same)."""
    phases = split_phases(size, parts, parts)
    crosses = {p.blocks[0].split(".")[1]: p for p in phases if p.kind == "cross_attention"}
    unified: List[SplitPhase] = []
    for phase in phases:
        unified.append(phase)
        if phase.stack == "encoder" and phase.kind == "attention":
            unified.append(crosses[phase.blocks[0].split(".")[1]])
    return unified


def graphcore_step(size: ModelSize, parts: int, rates: Rates = BASE_RATES) -> StepCost:
    """Graphcore's step (one replica, `parts` tensor-parallel IPUs) with the planner's costs."""
    shapes = Shapes(1, GRAPHCORE_LENGTH, GRAPHCORE_LENGTH, 2)
    return serial_cost(size, graphcore_phases(size, parts), shapes, parts, parts, GRAPHCORE_BATCH, 1, 1,
                       True, GRAPHCORE_BATCH, rates)


def _terms(cost: StepCost) -> Dict[str, float]:
    return {"compute": cost.compute_seconds, "streaming": cost.streaming_seconds, "links": cost.exchange_seconds}


def _fit_one(runs: Tuple[Run, ...], term: str) -> float:
    """The factor on `term` alone that best explains every run (least squares on log steps)."""
    def error(factor: float) -> float:
        total = 0.0
        for run in runs:
            terms = _terms(run.base)
            predicted = sum(v * (factor if k == term else 1.0) for k, v in terms.items())
            total += math.log(predicted / run.measured) ** 2
        return total

    low, high = 0.0, 12.0  # log of the factor: up to e^12 times slower
    for _ in range(200):  # the error is convex in the log of the factor: ternary search
        a, b = low + (high - low) / 3, high - (high - low) / 3
        low, high = (low, b) if error(math.exp(a)) <= error(math.exp(b)) else (a, high)
    return math.exp((low + high) / 2)


def calibrate() -> Calibration:
    runs = tuple(Run(model, ipus, seconds, graphcore_step(SIZES[model], ipus))
                 for (model, ipus), seconds in sorted(MEASURED.items()))
    factor = math.exp(sum(math.log(r.measured / r.base.step_seconds) for r in runs) / len(runs))
    return Calibration(runs, factor, {term: _fit_one(runs, term) for term in EXPLANATIONS})


def describe(calibration: Calibration) -> List[str]:
    """Predicted against measured, per run, at the base, calibrated and single-term rates."""
    lines = []
    for run in calibration.runs:
        size = SIZES[run.model]
        calibrated = graphcore_step(size, run.ipus, calibration.rates).step_seconds
        singles = {name: graphcore_step(size, run.ipus, rates).step_seconds
                   for name, rates in calibration.explanation_rates().items()}
        lines.append("{} on {} IPUs: measured {:.0f} s; base rates {:.1f} s ({}); calibrated {:.1f} s ({:+.0%}); "
                     "only compute {:.1f} s, only Streaming Memory {:.1f} s, only IPU-Links {:.1f} s".format(
                         run.model.upper(), run.ipus, run.measured, run.base.step_seconds, run.base.describe(),
                         calibrated, calibrated / run.measured - 1, singles["compute"], singles["streaming"],
                         singles["links"]))
    return lines
