"""The torch backend's memory plan (ipu_t5/backends/torch_distributed/memory.py): hand arithmetic for
a small layout and for XXL on 16 stages, `ipu-t5 plan --backend torch --json`, and `ipu-t5 train`
refusing a layout that cannot fit before it reads a weight."""
import json

import pytest

from ipu_t5.backends.precision import cpu_multiplies_bf16

from ipu_t5.backends.torch_distributed import memory
from ipu_t5.backends.torch_distributed.memory import (ADAMW_BYTES, GPUS, PROCESS_BYTES, WEIGHT_BYTES, in_flight,
                                                      plan_memory)
from ipu_t5.backends.torch_distributed.memory_report import check_layout_fits, parse_bytes
from ipu_t5.config import load_config
from ipu_t5.layout import plan_from_config
from ipu_t5.models import canonical_size
from ipu_t5.t5_shapes import Shapes, part_activations

from tests.conftest import run_cli

pytestmark = pytest.mark.core

GIB = 2 ** 30
# tiny: d_model 128, d_ff 256, 4 heads of 32, 2 + 2 layers, vocabulary 512 (hand counts below).
ENCODER_BLOCK = 4 * 128 * 128 + 3 * 128 * 256 + 2 * 128          # 164096 (+128 position bias on block 0)
DECODER_BLOCK = 2 * 4 * 128 * 128 + 3 * 128 * 256 + 3 * 128      # 229760 (+128 on block 0)
EMBEDDING = 512 * 128


def tiny(*overrides):
    return load_config("tiny", overrides=["training.global_batch_size=8", "layout.stages=2",
                                          "layout.layers_per_stage=[2,2]"] + list(overrides))


def test_activation_arithmetic_of_one_encoder_block_by_hand():
    # micro-batch 1, 8 source tokens, float32: stream 1*8*128*(4+4); q,k,v,context 4*8*128*4; scores
    # and softmax 4 heads * 8 * 8 * (4 + 2*4); wi_0, wi_1 and their product 3*8*256*4; wo's input and
    # two float32 streams 8*(256*4 + 2*128*4).
    stream = 8 * 128 * 8
    attention = stream + 4 * 8 * 128 * 4 + 4 * 8 * 8 * 12
    feed_forward = stream + 3 * 8 * 256 * 4 + 8 * (256 * 4 + 2 * 128 * 4)
    assert part_activations(canonical_size("tiny"), "block", "encoder", Shapes(1, 8, 4, 4)) == \
        attention + feed_forward == 76800


def test_two_stages_by_hand_under_1f1b_and_gpipe():
    stage0 = EMBEDDING + (ENCODER_BLOCK + 128) + ENCODER_BLOCK + 128      # + encoder.final_layer_norm
    stage1 = (DECODER_BLOCK + 128) + DECODER_BLOCK + 128 + EMBEDDING       # + decoder norm, lm_head
    config = tiny("layout.gradient_accumulation_steps=4")
    plan = plan_memory(config, 8, 4, "cpu")
    first, second = plan.ranks
    assert (first.weights, first.gradients, first.optimizer) == (4 * stage0, 4 * stage0, 8 * stage0)
    # The shared embedding only on stage 0: stage 1 gets the embedded decoder inputs, holds no copy.
    assert (second.weights, second.gradients, second.optimizer) == (4 * stage1, 4 * stage1, 8 * stage1)
    # One micro-batch of 2 prompts (8 source, 4 target tokens, float32) on stage 0: the embedding
    # 2*2*(8+4)*128*4, two encoder blocks of 153600 and the final norm's stream 2*8*128*8.
    one0 = 2 * 2 * 12 * 128 * 4 + 2 * 153600 + 2 * 8 * 128 * 8
    # Stage 1: two decoder blocks of 119296, the norm 2*4*128*8, the LM head's input and float32
    # logits 2*4*(128*4 + 512*4) and the loss's two float32 rows 2*2*4*512*4.
    one1 = 2 * 119296 + 2 * 4 * 128 * 8 + 2 * 4 * (128 * 4 + 512 * 4) + 2 * 2 * 4 * 512 * 4
    # 1F1B: stage s holds min(m, p - s) micro-batches, plus one block's values for its gradients;
    # autograd keeps ACTIVATION_FACTOR times the count (measured).
    factor = memory.ACTIVATION_FACTOR
    assert first.activations == int(factor * (2 * one0 + 153600))
    assert second.activations == int(factor * (1 * one1 + 119296))
    assert first.training == PROCESS_BYTES + 16 * stage0 + first.activations
    gpipe = plan_memory(tiny("layout.gradient_accumulation_steps=4", "layout.pipeline_schedule=GPipe"), 8, 4, "cpu")
    assert [r.activations for r in gpipe.ranks] == [int(factor * (4 * one0 + 153600)), int(factor * (4 * one1 + 119296))]
    # The export's reload check on the main process: the whole float32 model and the files' mapped pages.
    total = canonical_size("tiny").total_params()
    assert first.reload_check == int(memory.RELOAD_COPIES * 4 * total) and second.reload_check == 0
    assert plan.node_sum_bytes() == memory.LAUNCHER_BYTES + first.peak + second.peak


def test_fsdp2_shards_moments_and_resting_weights_and_lora_trains_only_adapters():
    config = tiny("layout.replicas=2", "layout.data_parallel=fsdp", "layout.gradient_accumulation_steps=2")
    plan = plan_memory(config, 8, 4, "cpu")
    assert [(r.stage, r.replica) for r in plan.ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    stage0 = EMBEDDING + 2 * ENCODER_BLOCK + 128 + 128
    rank = plan.ranks[1]
    # A unit per block (the default): the shards, and the largest unit (here encoder.0, with the
    # position bias) whole twice: computing and prefetched, or its gradient and the reduce-scatter's
    # buffer.
    unit = ENCODER_BLOCK + 128
    assert rank.weights == rank.gradients == 4 * (stage0 // 2 + 2 * unit)
    assert rank.optimizer == 8 * stage0 // 2
    whole = plan_memory(tiny("layout.replicas=2", "layout.data_parallel=fsdp", "layout.gradient_accumulation_steps=2",
                             "layout.fsdp_reshard_after_forward=false"), 8, 4, "cpu").ranks[1]
    # The chunk one unit: under a pipeline schedule FSDP2 holds the unsharded parameters and
    # gradients through the step beside their shards (and on a GPU its flat communication buffer).
    assert whole.weights == whole.gradients == 4 * stage0 + 4 * stage0 // 2
    assert whole.optimizer == rank.optimizer and whole.peak > rank.peak
    assert rank.checkpoint == PROCESS_BYTES + 4 * stage0 // 2 + 8 * stage0 // 2 + 2 * 4 * EMBEDDING
    lora = plan_memory(tiny("peft.method=lora", "peft.r=4", "layout.gradient_accumulation_steps=4"), 8, 4, "cpu")
    # q and v adapters (A: 4 x 128, B: 128 x 4) in each attention: one per encoder block.
    adapters = 2 * 2 * (4 * 128 + 128 * 4)
    assert lora.ranks[0].trainable == adapters
    assert (lora.ranks[0].gradients, lora.ranks[0].optimizer) == (4 * adapters, 8 * adapters)
    assert lora.ranks[0].weights == 4 * (stage0 + adapters)


def test_in_flight_micro_batches_by_schedule():
    layout = plan_from_config(load_config("small", overrides=["layout.stages=4", "training.global_batch_size=16"]))
    assert layout.micro_batches == 8
    assert [in_flight(layout, s) for s in range(4)] == [4, 3, 2, 1]
    gpipe = plan_from_config(load_config("small", overrides=[
        "layout.stages=4", "training.global_batch_size=16", "layout.pipeline_schedule=GPipe"]))
    assert [in_flight(gpipe, s) for s in range(4)] == [8] * 4
    alone = plan_from_config(load_config("small", overrides=["layout.gradient_accumulation_steps=4"]))
    assert in_flight(alone, 0) == 1


def test_xxl_on_16_stages_by_hand():
    """Every rank starts under 16 GB of host memory; on GPUs the fullest rank fits 80 GB, not 40 GB."""
    config = load_config("xxl")
    size = canonical_size("xxl")
    # Each device's plan for the cut the backend takes there (the lighter of the two).
    cpu = plan_memory(config, 512, 8, "cpu", memory.lightest_cut(config, 512, 8, "cpu"))
    gpu = plan_memory(config, 512, 8, "gpu", memory.lightest_cut(config, 512, 8, "gpu"))
    layout = gpu.layout
    assert (layout.stages, layout.replicas, len(cpu.ranks)) == (16, 1, 16)
    embedding = size.vocab_size * size.d_model
    # Every parameter on one stage: the decoder.0 stage holds no copy of the shared embedding.
    held = [layout.stage_params(s) for s in range(16)]
    assert layout.stage_of("decoder.0") != 0
    assert sum(held) == size.total_params()
    for stage, rank in enumerate(gpu.ranks):
        assert (rank.weights, rank.gradients, rank.optimizer) == (
            WEIGHT_BYTES * held[stage], WEIGHT_BYTES * held[stage], ADAMW_BYTES * held[stage])
        # A GPU rank stages one tensor at a time in host memory: the largest is the embedding.
        assert rank.startup == PROCESS_BYTES + 4 * embedding < 1.0e9
    for stage, rank in enumerate(cpu.ranks):
        # CPU processes hold their stage's float32 weights in host memory at start.
        assert rank.startup == PROCESS_BYTES + 4 * cpu.layout.stage_params(stage) < 16e9
    # bfloat16 autocast on GPUs (and on CPUs that multiply in it): 2-byte activations and a 2-byte
    # copy of the weights per micro-batch in flight.
    assert gpu.activation_bytes == 2 and cpu.activation_bytes == (2 if cpu_multiplies_bf16() else 4)
    largest = gpu.largest_process_bytes
    fits = {name: ok for name, _, ok in memory.gpu_fits(config, 512, 8)}
    assert fits == {name: largest <= bytes_ for name, bytes_ in GPUS}
    assert fits == {"A100 40 GB": False, "A100 80 GB": True, "H100 80 GB": True}, largest / GIB
    # At 512-token prompts the encoder stages' micro-batches in flight outweigh evened-out weights:
    # on GPUs the compute cut is the lighter, and the memory cut would not fit 80 GB.
    by_memory = plan_memory(config, 512, 8, "gpu", plan_from_config(config, 512, 8, split_by="memory"))
    assert gpu.layout.split_by == "compute" and by_memory.largest_process_bytes > 80e9 > largest


def test_a_layout_that_fits_is_not_refused_and_sizes_parse():
    config = tiny("layout.gradient_accumulation_steps=4")
    check_layout_fits(config, plan_from_config(config, 64, 8), 64, 8)
    assert parse_bytes("80GB") == 80 * 10 ** 9 and parse_bytes("40GiB") == 40 * GIB and parse_bytes("512") == 512


def test_plan_json_has_every_rank_of_a_2x2_fsdp_layout():
    result = run_cli(["plan", "--model", "base", "--backend", "torch", "--stages", "2", "--replicas", "2",
                      "--set", "layout.data_parallel=fsdp", "--device-memory", "80GB", "--json"])
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [(r["stage"], r["replica"]) for r in plan["ranks"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for rank in plan["ranks"]:
        assert {"weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "peak_bytes",
                "startup_peak_bytes"} <= set(rank)
        assert rank["peak_bytes"] >= rank["weights_bytes"] + rank["gradients_bytes"] + rank["optimizer_bytes"]
    assert plan["startup_peak_bytes"] == max(r["startup_peak_bytes"] for r in plan["ranks"])
    assert plan["device"] == "gpu" and plan["device_memory_bytes"] == 80 * 10 ** 9 and plan["fits"]
    assert [g["name"] for g in plan["gpus"]] == ["A100 40 GB", "A100 80 GB", "H100 80 GB"]


def test_plan_table_for_xxl_says_which_gpus_it_fits():
    result = run_cli(["plan", "--model", "xxl", "--backend", "torch", "--device-memory", "80GB"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank "))
    assert [int(line.split()[0]) for line in lines[header + 1:header + 17]] == list(range(16))
    assert "A100 40 GB does NOT fit; A100 80 GB fits; H100 80 GB fits" in result.stdout
    bad = run_cli(["plan", "--model", "tiny", "--backend", "torch", "--device-memory", "lots"])
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "80GB" in bad.stderr


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from ipu_t5.tasks import get_task
    from ipu_t5.tasks.demo.mnli import generate_splits
    from ipu_t5.tokenizer import demo_tokenizer

    task, rows = get_task("mnli"), generate_splits(0, 200, 10)["train"]
    directory = tmp_path_factory.mktemp("tokenizer")
    demo_tokenizer([task.source_text(r) for r in rows] + [task.target_text(r) for r in rows], 512).save_pretrained(
        str(directory))
    return directory


def _xxl_alone(tmp_path, tokenizer_dir, *extra):
    return run_cli(["train", "--model", "xxl", "--stages", "1", "--backend", "single", "--output-dir",
                    str(tmp_path / "run"), "--set", "data.source=demo", "--set", "data.demo_train_samples=200",
                    "--set", "data.demo_eval_samples=10", "--set", "model.tokenizer={}".format(tokenizer_dir)]
                   + list(extra), env={"HF_HUB_OFFLINE": "1"})


def test_train_refuses_a_layout_that_cannot_fit_before_reading_a_weight(tmp_path, tokenizer_dir):
    result = _xxl_alone(tmp_path, tokenizer_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("ipu-t5: error: the layout does not fit in memory:"), lines[-1]
    assert "--ignore-memory-plan" in lines[-1]
    assert any(line.startswith("rank ") and "peak GB" in line for line in lines)
    # Nothing was read: the hub weights (absent offline) would have been the next error.
    assert "could not load weights" not in result.stderr and "training:" not in result.stderr
    # With the flag it goes on, to reading XXL's weights (which this offline test does not have).
    forced = _xxl_alone(tmp_path, tokenizer_dir, "--ignore-memory-plan", "--overwrite")
    assert forced.returncode == 2 and "could not load weights 'google/flan-t5-xxl'" in forced.stderr.strip().splitlines()[-1]


def test_the_torch_backend_takes_the_lighter_cut():
    """MNLI-shaped prompts on 4 CPU processes: the cut with the least training state has the
    lightest fullest rank, lighter than the faster memory cut's (which leaves the embedding's stage
    a block more, beside its 4 micro-batches in flight) and the compute cut's (which puts the whole
    decoder and LM head on the last stage); a given cut stays."""
    config = load_config("base", overrides=["layout.stages=4", "training.global_batch_size=8"])
    chosen = memory.lightest_cut(config, 64, 4, "cpu")
    peaks = {split: plan_memory(config, 64, 4, "cpu", plan_from_config(config, 64, 4, split_by=split))
             .largest_process_bytes for split in ("compute", "memory", "state")}
    assert chosen.split_by == "state" and peaks["state"] < peaks["memory"] < peaks["compute"]
    assert plan_memory(config, 64, 4, "cpu", chosen).largest_process_bytes == peaks["state"]
    given = load_config("base", overrides=["layout.stages=4", "layout.layers_per_stage=[5,7,7,5]"])
    assert memory.lightest_cut(given, 64, 4, "cpu").split_by == "given"


def test_generation_utilisation_and_caches_in_flight_by_hand():
    from ipu_t5.backends.torch_distributed.generation_plan import cache_bytes, micro_batch_rows, slots, utilisation

    # K micro-batches in flight, each an encoder pass and 4 positions: a stage waits only while the
    # pipeline fills (S - 1 visits) once per K micro-batches; with K < S it waits S - K of every S visits.
    assert utilisation(16, 16, 5) == 80 / (80 + 15) > 0.8
    assert utilisation(16, 32, 5) > utilisation(16, 16, 5) > utilisation(16, 8, 5)
    assert utilisation(16, 8, 5) == 40 / (80 + 15)
    assert utilisation(1, 1, 5) == 1.0
    # The pipeline moves at its busiest stage's pace: stages of 1 and 3 units compute 2/3 of the time.
    assert utilisation(2, 4, 5, work=[1.0, 3.0]) == (2.0 / 3.0) * 20 / (20 + 1)
    # tiny over 2 stages, 10-token prompts: stage 0 (embedding, encoder.0) computes its encoder block
    # once; each further position costs stage 1 its decoder blocks (the cross-attention's keys and
    # values not again) and the LM head.
    from ipu_t5.backends.torch_distributed.generation_plan import stage_work
    from ipu_t5.layout import plan_layout

    size = canonical_size("tiny")
    layout = plan_layout(size, 16, stages=2, layers_per_stage=[1, 3])
    assert layout.stage_blocks[0] == ("embedding", "encoder.0")
    assert stage_work(size, layout, 10, 4)[0] == size.block_flops("encoder.0", 10, 1)
    per_position = sum(sum(size.sublayer_flops(b, 10, 1)) - 10 * 4 * size.d_model * size.inner_dim
                       for b in ("decoder.0", "decoder.1")) + size.block_flops("lm_head", 10, 1)
    assert stage_work(size, layout, 10, 5)[1] - stage_work(size, layout, 10, 4)[1] == per_position
    assert slots(None, 1) == 1 and slots(None, 4) == 8 and slots(5, 4) == 5
    # A window of 8 batches of 64 per replica cut into K micro-batches per batch; a short last window finer.
    assert micro_batch_rows(8 * 64 * 2, 2, 4, 2) == 16 and micro_batch_rows(40, 1, 4, 2) == 2
    # tiny's 2 decoder blocks on stage 1: keys and values over 10 prompt and 3 new tokens, 4 x 32 wide,
    # for 8 rows in float32, and the encoder output the stage receives.
    size = canonical_size("tiny")
    expected = 2 * (2 * 8 * 128 * (10 + 3) * 4) + 8 * 10 * 128 * 4
    assert cache_bytes(size, ("decoder.0", "decoder.1", "lm_head"), 8, 10, 3) == expected
    assert cache_bytes(size, ("embedding", "encoder.0"), 8, 10, 3) == 0
    # The first stage's encoder passes run ahead (two micro-batches of 8 rows over 10 prompt tokens):
    # the hidden states and, mid-encoder, the position bias; none where it holds a decoder block.
    from ipu_t5.backends.torch_distributed.generation_plan import RUN_AHEAD, run_ahead_bytes

    assert run_ahead_bytes(size, ("embedding", "encoder.0"), 8, 10) == RUN_AHEAD * (8 * 10 * 128 + 4 * 10 * 10) * 4
    assert run_ahead_bytes(size, ("embedding", "encoder.0", "encoder.1", "encoder.final_layer_norm"), 8, 10) == \
        RUN_AHEAD * 8 * 10 * 128 * 4
    assert run_ahead_bytes(size, ("embedding", "encoder.0", "encoder.1", "encoder.final_layer_norm", "decoder.0"),
                           8, 10) == 0


def test_plan_counts_generation_caches_and_prints_the_utilisation():
    plan = plan_memory(tiny("validation.per_device_eval_batch_size=8"), 10, 3)
    # Rank 0 holds the encoder passes it runs ahead; rank 1 the caches.
    from ipu_t5.backends.torch_distributed.generation_plan import run_ahead_bytes

    assert plan.ranks[0].generation == run_ahead_bytes(plan.layout.size, plan.ranks[0].blocks, 2, 10) > 0
    assert plan.ranks[1].generation > 0
    assert plan.ranks[1].validation == (plan.ranks[1].fixed + plan.ranks[1].weights + plan.ranks[1].optimizer
                                        + plan.ranks[1].generation)
    from ipu_t5.backends.torch_distributed.generation_plan import stage_work

    work = stage_work(plan.layout.size, plan.layout, 10, 3)
    assert plan.generation_micro_batches == 4 and plan.generation_utilisation == utilisation_of(2, 4, 4, work)
    assert plan.generation_utilisation < utilisation_of(2, 4, 4)
    done = run_cli(["plan", "--backend", "torch", "--model", "xxl", "--stages", "16", "--device-memory", "80GB",
                    "--json", "--set", "validation.generation_micro_batches=16"])
    found = json.loads(done.stdout)
    assert found["generation_micro_batches"] == 16 and found["generation_utilisation"] > 0.8
    done = run_cli(["plan", "--backend", "torch", "--model", "tiny", "--stages", "2", "--set",
                    "validation.generation_micro_batches=1"])
    assert done.returncode == 2
    assert "validation.generation_micro_batches=1 is fewer than the 2 stages" in done.stderr.strip().splitlines()[-1]


def utilisation_of(stages, slots_, positions, work=None):
    from ipu_t5.backends.torch_distributed.generation_plan import utilisation

    return utilisation(stages, slots_, positions, work)
