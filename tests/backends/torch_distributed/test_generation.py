"""Pipelined generation (the wavefront of `wavefront.py`) under --stages 2: the same token ids as
one process and as transformers' greedy `generate`, with micro-batches that end early (the last
stage computes no position after all of a micro-batch's rows have ended) and a call whose
micro-batches do not divide among the slots."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, subprocess_env


def _rows(count):
    from ipu_t5.tasks.demo.mnli import generate_splits

    rows = generate_splits(5, 10, count)["validation_mismatched"]
    return [{"premise": r["premise"], "hypothesis": r["hypothesis"]} for r in rows]


def _transformers_ids(export, ids, max_new_tokens, eos_id):
    """transformers' greedy generate, one prompt at a time (no padding), without the start token
    and cut before the end-of-sequence token."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(export)).eval()
    found = []
    with torch.no_grad():
        for row in ids:
            out = model.generate(input_ids=torch.tensor([row]), max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1)[0, 1:].tolist()
            found.append(out[:out.index(eos_id)] if eos_id in out else out)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("layers", [None, "[3,1]"], ids=["encoder-only-first-stage", "decoder-on-both-stages"])
def test_two_stages_generate_what_one_process_and_transformers_do_and_end_micro_batches_early(trained, tmp_path,
                                                                                            layers):
    """The plan's cut leaves the first stage encoder blocks only (its encoder passes run ahead,
    sent tagged); [3,1] puts decoder.0 on it too (every pass in the wavefront's order)."""
    from ipu_t5.backends.torch_distributed.generation_plan import micro_batch_rows

    trainer, export = trained["trainer"], trained["hf_dir"]
    # 101 prompts, 4 slots: micro-batches of 4 rows, 26 of them (the last of 1 row), which 4 slots do
    # not divide; up to 12 new tokens where the trained model ends after 2 or 3.
    rows, max_new_tokens, slots = _rows(101), 12, 4
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "tests.backends.torch_distributed.generation_worker", str(tmp_path), str(export),
               str(tmp_path / "rows.json"), str(max_new_tokens), str(slots), "8"] + ([layers] if layers else [])
    done = subprocess.run(command, cwd=str(ROOT), env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / "rank{}.json".format(r)).read_text()) for r in range(2)]
    assert ranks[0]["generated"] == ranks[1]["generated"] and ranks[0]["slots"] == slots
    generated = ranks[0]["generated"]

    ids = ranks[0]["ids"]
    assert generated == _transformers_ids(export, ids, max_new_tokens, trainer.tokenizer.eos_token_id)
    # One process (the trainer's backend), the same prompts in one call.
    alone = trainer.backend.generate([{"input_ids": i, "labels": []} for i in ids], max_new_tokens)
    assert generated == alone

    size = micro_batch_rows(len(rows), 1, slots, 2)
    cuts = [generated[i:i + size] for i in range(0, len(rows), size)]
    assert size == 4 and len(cuts) == 26 and len(cuts) % slots and len(cuts[-1]) == 1
    # The last stage (rank 1) encoded each micro-batch once and decoded each until all its rows had
    # ended (a row's end-of-sequence token is one more position), never to the cap.
    positions = [min(max_new_tokens, max(len(ids) + 1 for ids in cut)) for cut in cuts]
    assert ranks[1]["encodes"] == len(cuts)
    assert ranks[1]["positions"] == sum(positions) < len(cuts) * max_new_tokens
    assert len(set(len(ids) for ids in generated)) > 1, "every row ended at the same position"
