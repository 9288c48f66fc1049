"""Stage-local construction under torch.distributed: every rank builds only its own chunks, from the
same per-name random draws as one process (bit for bit, under 2 x 2 and 4 x 1) or from a sharded
Hugging Face checkpoint of which it reads only its own tensors."""
import subprocess
import sys

import pytest
import torch

from tests.backends.torch_distributed.pipeline_worker import make_config
from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The tiny run's starting weights in one process, also saved as a sharded Hugging Face
    checkpoint (with the run's tokenizer) to start from."""
    from ipu_t5.training.trainer import T5Trainer

    root = tmp_path_factory.mktemp("one")
    trainer = T5Trainer(make_config(root / "run", backend="single"))
    weights = {k: v.clone() for k, v in trainer.backend.model_state_dict().items()}
    trainer.backend.model.save_pretrained(str(root / "hf"), max_shard_size="300KB")
    trainer.tokenizer.save_pretrained(str(root / "hf"))
    trainer.close()
    assert (root / "hf" / "model.safetensors.index.json").is_file()
    return {"weights": weights, "hf": root / "hf"}


def _launch(out, stages, replicas, *options):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(stages * replicas), "-m", "tests.backends.torch_distributed.stage_local_worker", str(out),
               str(stages), str(replicas)] + list(options)
    done = subprocess.run(command, cwd=str(ROOT), env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(str(out / "rank{}.pt".format(r))) for r in range(stages * replicas)]


@pytest.mark.parametrize("layout", [(2, 2), (4, 1)], ids=["2x2", "4x1"])
def test_random_weights_at_step_0_equal_one_process_bit_for_bit(one_process, tmp_path, layout):
    ranks = _launch(tmp_path, *layout)
    expected = one_process["weights"]
    built = set()
    for rank, found in enumerate(ranks):
        assert found["read"] == []
        for name, value in found["weights"].items():
            assert torch.equal(value, expected[name]), "rank {}: {}".format(rank, name)
            built.add(name)
    assert built == {n for n in expected if "embed_tokens" not in n}


def test_each_rank_reads_only_its_own_tensors_from_a_sharded_checkpoint(one_process, tmp_path):
    ranks = _launch(tmp_path, 2, 2, "--pretrained", str(one_process["hf"]))
    stages = []
    for rank, found in enumerate(ranks):
        # Its own tensors, each read once.
        assert sorted(found["read"]) == sorted(found["weights"]), rank
        for name, value in found["weights"].items():
            assert torch.equal(value, one_process["weights"][name]), "rank {}: {}".format(rank, name)
        stages.append(set(found["owned"]))
    # Replicas of a stage read the same tensors; the stages read disjoint ones.
    assert stages[0] == stages[1] and stages[2] == stages[3] and not stages[0] & stages[2]
    assert stages[0] | stages[2] == {n for n in one_process["weights"] if "embed_tokens" not in n}
