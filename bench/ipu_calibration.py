"""The IPU step estimate calibrated on Graphcore's two published Flan-T5 runs, and this planner's
plans at the same work and at MNLI's real target lengths.

    python bench/ipu_calibration.py [--json]

No IPU and no weights: arithmetic only (`ipu_t5/backends/ipu/calibration.py`, `cost.py`,
`batch_serial.py`). Graphcore's runs (graphcore/examples `nlp/t5/popxl`: XXL on a Pod16 with
tensor parallelism 16, about 36 s per step; XL on a Pod8 with tensor parallelism 8, about 16 s;
global batch 128 as 128 slices of one sample, 512-token prompts and targets padded to 512, zeroed
cross-attention in encoder blocks, recomputation, whole blocks per phase) are modelled with the
planner's cost functions and printed predicted against measured: at the base rates (50% of
250 TFLOPS, 16 GB/s Streaming Memory, 64 GB/s IPU-Links), with one factor on every rate, and with
each single-term explanation (only compute, only Streaming Memory, only the links slower). Then
`ipu-t5 plan`'s own choice for the same hardware, at Graphcore's workload (512-token targets) and
at MNLI's (8-token targets), under the same calibrated rates. docs/ipu.md, 'The cost model',
explains the derivation.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ipu_t5.backends.ipu.calibration import calibrate, describe  # noqa: E402
from ipu_t5.backends.ipu.generation_cost import generation_cost  # noqa: E402
from ipu_t5.backends.ipu.plan import plan_ipu  # noqa: E402
from ipu_t5.config import load_config  # noqa: E402
from ipu_t5.layout import plan_from_config  # noqa: E402

# (model, IPUs per replica, Graphcore's measured seconds per step)
RUNS = (("xxl", 16, 36.0), ("xl", 8, 16.0))
WORKLOADS = (("Graphcore's workload (512-token targets)", 512), ("MNLI's target lengths (8 tokens)", 8))


def plans(calibration):
    rows = []
    for model, ipus, measured in RUNS:
        config = load_config(model, **{"layout.stages": ipus})
        for label, target in WORKLOADS:
            plan = plan_ipu(config, plan_from_config(config, 512, target), 512, target)
            estimates = plan.calibrated(calibration)
            singles = [estimates["only_" + n] for n in ("compute", "streaming", "links")]
            rows.append({"model": model, "ipus": ipus, "workload": label, "target_length": target,
                         "schedule": plan.schedule_words(), "streamed_gb_per_ipu": plan.cost.streamed_bytes / 1e9,
                         "other_schedule_streamed_gb_per_ipu": (plan.other_schedule.cost.streamed_bytes / 1e9
                                                                if plan.other_schedule else None),
                         "base_seconds": plan.cost.step_seconds, "calibrated_seconds": estimates["calibrated"],
                         "single_term_range": [min(singles), max(singles)], "graphcore_measured": measured})
    return rows


def validation():
    """XXL on a Pod16 at Graphcore's validation settings (micro-batch 20, 268-token prompts, 5 new
    tokens, 9,832 prompts): whole model per token against the key/value cache, calibrated; the cache
    with one batch for both executors (the largest the encoder fits) against the planner's fastest
    batch, whose decoder step runs over several encoder chunks; and, not counted in the estimate,
    what stopping once every prompt has ended would give were every batch done after fewer tokens."""
    config = load_config("xxl", **{"validation.max_new_tokens": 5, "validation.per_device_eval_batch_size": 20})
    plan = plan_ipu(config, plan_from_config(config, 268, 5), 268, 5)
    g, rates = plan.generation, calibrate().rates
    args = (plan.layout.size, plan.split_phases, plan.ipus_per_phase, plan.embedding_serialization_factor)
    one = g.best_encoder_batch
    same = generation_cost(*args, one, plan.replicas, plan.shards, 268, 5, 2, config.ipu.matmul_proportion,
                           rates=rates, encoder_batch=one)
    shorter = {tokens: generation_cost(*args, g.best_batch, plan.replicas, plan.shards, 268, tokens, 2,
                                       config.ipu.matmul_proportion, rates=rates,
                                       encoder_batch=g.best_encoder_batch).seconds / 60 for tokens in (4, 3)}
    return {"prompts": g.prompts, "batch": g.batch, "whole_model_minutes": g.whole_model_seconds / 60,
            "kv_cache_minutes": g.seconds / 60, "one_batch": one, "one_batch_minutes": same.seconds / 60,
            "best_batch": g.best_batch, "best_encoder_batch": g.best_encoder_batch,
            "best_batch_minutes": g.best_seconds / 60, "if_done_after_tokens_minutes": shorter,
            "graphcore_measured_minutes": 18.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    calibration = calibrate()
    rows = plans(calibration)
    if args.json:
        print(json.dumps({"factor": calibration.factor, "single_term_factors": calibration.single,
                          "runs": [{"model": r.model, "ipus": r.ipus, "measured": r.measured,
                                    "predicted_base": r.base.step_seconds,
                                    "predicted_calibrated": r.base.step_seconds * calibration.factor}
                                   for r in calibration.runs], "plans": rows, "validation": validation()}, indent=2))
        return 0
    print("Graphcore's runs modelled with the planner's costs:")
    for line in describe(calibration):
        print("  " + line)
    print("One factor on every rate: {:.2f}; single-term factors: compute {:.2f}, Streaming Memory {:.2f}, "
          "IPU-Links {:.2f}".format(calibration.factor, calibration.single["compute"],
                                   calibration.single["streaming"], calibration.single["links"]))
    print("\nThis planner's choice, at the calibrated rates:")
    for r in rows:
        print("  {} on {} IPUs, {}: {}; {:.1f} GB streamed per IPU per step{}; calibrated {:.1f} s "
              "(single-term {:.1f} to {:.1f} s), Graphcore measured {:.0f} s at their workload".format(
                  r["model"].upper(), r["ipus"], r["workload"], r["schedule"], r["streamed_gb_per_ipu"],
                  " (gradient accumulation: {:.1f} GB)".format(r["other_schedule_streamed_gb_per_ipu"])
                  if r["other_schedule_streamed_gb_per_ipu"] else "", r["calibrated_seconds"],
                  r["single_term_range"][0], r["single_term_range"][1], r["graphcore_measured"]))
    v = validation()
    print("\nValidation, XXL on a Pod16, {prompts:,} prompts at Graphcore's settings (268-token prompts, 5 new tokens), "
          "calibrated:\n  whole model per token at batch {batch}: {whole_model_minutes:.1f} min (Graphcore measured about "
          "{graphcore_measured_minutes:.0f})\n  key/value cache at batch {batch}: {kv_cache_minutes:.1f} min; at batch "
          "{one_batch} for both executors (the largest the encoder fits): {one_batch_minutes:.1f} min\n  key/value cache, "
          "the decoder step over batches of {best_batch} in encoder chunks of {best_encoder_batch}: "
          "{best_batch_minutes:.1f} min".format(**v))
    print("  not counted: stopping once every prompt has ended; were every batch done after 4 or 3 tokens: "
          "{:.1f} or {:.1f} min".format(v["if_done_after_tokens_minutes"][4], v["if_done_after_tokens_minutes"][3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
