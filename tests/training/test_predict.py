"""Predictions for new data: `T5Trainer.predict` in the shape of Seq2SeqTrainer.predict, and
`ipu-t5 predict` writing its file as it goes, refusing bad rows without touching what it wrote,
continuing after kill -9 to the same file an uninterrupted run writes, and GLUE's submission file."""
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, run_cli, subprocess_env, tiny_overrides


def _demo_rows(count, labels=True, seed=3):
    from ipu_t5.tasks.demo.mnli import generate_splits

    rows = generate_splits(seed, 10, count)["validation_mismatched"]
    return [dict(r) if labels else {"idx": r["idx"], "premise": r["premise"], "hypothesis": r["hypothesis"]}
            for r in rows]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.core
def test_trainer_predict_returns_validations_predictions_and_metrics(trained):
    trainer = trained["trainer"]
    rows = trainer.eval_features
    raw = [json.loads(line) for line in open(trained["output_dir"] / "eval_predictions.jsonl")]
    from ipu_t5.tasks.demo.mnli import generate_splits

    config = trainer.config
    source = generate_splits(config.training.seed, config.data.demo_train_samples,
                             config.data.demo_eval_samples)["validation_mismatched"]
    found = trainer.predict(source)
    assert found.generated == [r["generated"] for r in raw]
    assert found.predictions == [r["prediction"] for r in raw]
    assert found.label_ids == [r["reference"] for r in raw] and len(rows) == len(source)
    assert found.metrics["accuracy"] == trained["results"]["accuracy"]
    unlabelled = trainer.predict([{"premise": r["premise"], "hypothesis": r["hypothesis"]} for r in source[:20]])
    assert unlabelled.label_ids is None and unlabelled.metrics is None
    assert unlabelled.generated == found.generated[:20]


@pytest.mark.core
def test_predictions_file_drops_a_torn_line_and_refuses_another_runs_file(tmp_path):
    from ipu_t5.errors import UserError
    from ipu_t5.training.predict import PredictionsFile

    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 0, "generated": "a"}\n{"id": 1, "generated": "b"}\n{"id": 2, "gen')
    assert PredictionsFile(path, 10).done == 2
    assert path.read_text() == '{"id": 0, "generated": "a"}\n{"id": 1, "generated": "b"}\n'
    with pytest.raises(UserError, match="holds 2 rows but the data have 1"):
        PredictionsFile(path, 1)
    path.write_text('{"id": 0}\n{"id": 5}\n')
    with pytest.raises(UserError, match="line 2 is not row 1"):
        PredictionsFile(path, 10)


@pytest.mark.core
def test_bad_rows_are_refused_in_one_line_and_the_file_is_untouched(trained, tmp_path):
    export = trained["hf_dir"]
    out = tmp_path / "p.jsonl"
    out.write_text('{"id": 0, "generated": "kept"}\n')
    rows = _demo_rows(5, labels=False)
    cases = {
        "no_column.jsonl": ([{"premise": r["premise"]} for r in rows], "row 0 has no 'hypothesis' column"),
        "row_without.jsonl": ([dict(r) for r in rows[:2]] + [{"premise": "x"}], "row 2 has no text in 'hypothesis'"),
        "empty.jsonl": ([dict(r) for r in rows[:3]] + [dict(rows[3], premise="  ")], "row 3 has no text in 'premise'"),
    }
    for name, (data, message) in cases.items():
        done = run_cli(["predict", str(export), "--model", "tiny", "--data-files", "test={}".format(
            _write(tmp_path / name, data)), "--out", str(out)])
        assert done.returncode == 2, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert "Traceback" not in done.stderr and message in last and name in last, done.stderr
    (tmp_path / "broken.csv").write_text('premise,hypothesis\n"a,b\n')
    done = run_cli(["predict", str(export), "--model", "tiny", "--data-files",
                    "test={}".format(tmp_path / "broken.csv"), "--out", str(out)])
    assert done.returncode == 2 and "broken.csv" in done.stderr.strip().splitlines()[-1], done.stderr
    assert out.read_text() == '{"id": 0, "generated": "kept"}\n'


def _predict(export, data, out, *extra):
    return [sys.executable, "-m", "ipu_t5", "predict", str(export), "--model", "tiny", "--data-files",
            "test={}".format(data), "--out", str(out), "--set", "validation.per_device_eval_batch_size=8"] + list(extra)


@pytest.mark.slow
def test_predict_killed_and_rerun_writes_the_uninterrupted_file(trained, tmp_path):
    """kill -9 once some lines exist; the same command again ends with every row once, the file
    byte for byte as an uninterrupted run's; the predictions are transformers' own."""
    from ipu_t5.checkpointing.export import reload_and_predict

    export, rows = trained["hf_dir"], _demo_rows(400, labels=False)
    data = _write(tmp_path / "test.jsonl", rows)
    whole = tmp_path / "whole.jsonl"
    done = subprocess.run(_predict(export, data, whole), cwd=str(ROOT), env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "resumed.jsonl"
    proc = subprocess.Popen(_predict(export, data, out), cwd=str(ROOT), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out.exists() and out.read_text().count("\n") >= 64):
            assert proc.poll() is None, "the run ended before it was killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = out.read_text().count("\n")
    assert 64 <= written < len(rows)
    done = subprocess.run(_predict(export, data, out), cwd=str(ROOT), env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == whole.read_bytes()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(len(rows)))
    sample = lines[::10]
    assert reload_and_predict(export, [line["prompt"] for line in sample]) == [line["generated"] for line in sample]


@pytest.mark.slow
def test_predict_under_two_stages_writes_what_one_process_writes_and_a_glue_file(trained, tmp_path):
    from ipu_t5.tasks.mnli import LABELS

    export, rows = trained["hf_dir"], _demo_rows(150, labels=False)
    data = _write(tmp_path / "test_matched.jsonl", rows)
    one = tmp_path / "one.jsonl"
    done = run_cli(["predict", str(export), "--model", "tiny", "--data-files", "test_matched={}".format(data),
                    "--out", str(one)])
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two.jsonl"
    done = run_cli(["predict", str(export), "--model", "tiny", "--stages", "2", "--data-files",
                    "test_matched={}".format(data), "--out", str(two), "--glue-submission", str(tmp_path / "glue")],
                   env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    submission = (tmp_path / "glue" / "MNLI-m.tsv").read_text().splitlines()
    predicted = [json.loads(line)["generated"] for line in one.read_text().splitlines()]
    assert submission[0] == "index\tprediction"
    assert [line.split("\t")[0] for line in submission[1:]] == [str(r["idx"]) for r in rows]
    named = [(line.split("\t")[1], p) for line, p in zip(submission[1:], predicted) if p in LABELS]
    assert len(named) > len(rows) // 2 and all(a == b for a, b in named)



@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """A tiny run of 2 steps that leaves a checkpoint and its export: what `predict` reads, not how
    well it predicts."""
    from ipu_t5 import checkpointing
    from ipu_t5.config import load_config
    from ipu_t5.training.trainer import T5Trainer

    out = tmp_path_factory.mktemp("quick") / "run"
    config = load_config("tiny", overrides=tiny_overrides(out, **{
        "training.max_steps": 2, "output.save_steps": 2, "validation.do_eval": "false",
        "data.demo_train_samples": 64, "data.demo_eval_samples": 8, "training.global_batch_size": 8}))
    trainer = T5Trainer(config)
    trainer.train()
    trainer.save_hf_checkpoint()
    trainer.close()
    steps = checkpointing.list_steps(out)
    return {"export": trainer.hf_path, "run": out, "checkpoint": checkpointing.step_path(out, steps[-1])}


def _write_table(path, rows, delimiter):
    import csv

    with open(str(path), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.core
def test_predict_reads_an_export_a_run_and_a_checkpoint_and_jsonl_csv_tsv_with_or_without_labels(
        quick_run, tmp_path, capsys):
    """Every source and file type predicts the same texts as transformers on the export; labelled
    data get references and the metric, unlabelled data neither."""
    from ipu_t5.checkpointing.export import reload_and_predict
    from ipu_t5.cli import main

    labelled = [{k: r[k] for k in ("premise", "hypothesis", "label")} for r in _demo_rows(12)]
    unlabelled = [{k: r[k] for k in ("premise", "hypothesis")} for r in labelled]
    files = {"labelled.csv": _write_table(tmp_path / "labelled.csv", labelled, ","),
             "unlabelled.tsv": _write_table(tmp_path / "unlabelled.tsv", unlabelled, "\t"),
             "unlabelled.jsonl": _write(tmp_path / "unlabelled.jsonl", unlabelled)}
    found = {}
    for source in ("export", "run", "checkpoint"):
        for name, data in files.items():
            if source != "export" and name != "unlabelled.jsonl":
                continue
            out = tmp_path / "{}-{}.jsonl".format(source, name)
            capsys.readouterr()
            assert main(["predict", str(quick_run[source]), "--model", "tiny", "--data-files", "test={}".format(data),
                         "--out", str(out), "--set", "validation.max_new_tokens=4"]) == 0
            summary = json.loads(capsys.readouterr().out)
            lines = [json.loads(line) for line in out.read_text().splitlines()]
            assert [line["id"] for line in lines] == list(range(12)) and summary["rows"] == 12
            if name.startswith("labelled"):
                assert [line["reference"] for line in lines] == [r["label"] for r in labelled]
                assert summary["accuracy"] == sum(line["prediction"] == line["reference"] for line in lines) / 12
            else:
                assert "reference" not in lines[0] and "accuracy" not in summary
            found[(source, name)] = [(line["prompt"], line["generated"]) for line in lines]
    first = found[("export", "labelled.csv")]
    assert len(found) == 5 and all(texts == first for texts in found.values()), found
    assert reload_and_predict(quick_run["export"], [p for p, _ in first]) == [g for _, g in first]


@pytest.mark.core
def test_glue_submission_names_the_mismatched_file_and_refuses_another_split_before_writing(quick_run, tmp_path):
    from ipu_t5.cli import main
    from ipu_t5.tasks.mnli import LABELS

    rows = _demo_rows(9, labels=False)
    data = _write(tmp_path / "mm.jsonl", rows)
    out = tmp_path / "mm-predictions.jsonl"
    common = ["--model", "tiny", "--set", "validation.max_new_tokens=4"]
    assert main(["predict", str(quick_run["export"]), "--data-files", "test_mismatched={}".format(data),
                 "--out", str(out), "--glue-submission", str(tmp_path / "glue")] + common) == 0
    lines = (tmp_path / "glue" / "MNLI-mm.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and not (tmp_path / "glue" / "MNLI-m.tsv").exists()
    assert [line.split("\t")[0] for line in lines[1:]] == [str(r["idx"]) for r in rows]
    assert all(line.split("\t")[1] in LABELS for line in lines[1:])
    other = tmp_path / "other.jsonl"
    assert main(["predict", str(quick_run["export"]), "--data-files", "test={}".format(data), "--out", str(other),
                 "--glue-submission", str(tmp_path / "glue2")] + common) == 2
    assert not other.exists() and not (tmp_path / "glue2").exists()


@pytest.mark.core
def test_a_second_predict_into_a_live_predictions_file_is_refused(quick_run, tmp_path):
    """One writer per predictions file: the lock of its `.run` directory, taken before anything is
    generated; a killed holder blocks nobody."""
    import os
    import signal

    from ipu_t5.cli import main
    from tests.checkpointing.test_lock import _holder

    data = _write(tmp_path / "rows.jsonl", _demo_rows(4, labels=False))
    out = tmp_path / "predictions.jsonl"
    args = ["predict", str(quick_run["export"]), "--model", "tiny", "--data-files", "test={}".format(data),
            "--out", str(out), "--set", "validation.max_new_tokens=4"]
    holder = _holder(tmp_path / "predictions.jsonl.run")
    try:
        assert main(args) == 2 and not out.exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert main(args) == 0 and len(out.read_text().splitlines()) == 4
