"""The command line as a user meets it: a subprocess, its output, its exit code, its files."""
import json
from types import SimpleNamespace

import pytest

from ipu_t5.cli import main
from tests.conftest import run_cli, tiny_overrides

QUICK = ["--set=" + s for s in tiny_overrides("unused")[1:]]  # all but output_dir


def _args(out, *extra):
    return ["train", "--output-dir", str(out)] + QUICK + list(extra)


@pytest.mark.core
def test_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(_args(out, "--max-steps", "40"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ipu-t5 run summary" in proc.stdout
    assert "validation accuracy" in proc.stdout and str(out / "hf") in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40
    assert summary["export_predictions_identical"] == summary["export_predictions_checked"] > 0
    assert "layout: 1 stage(s) x 1 replica(s)" in proc.stdout  # the split is printed at start
    # evaluate on the run's export gives the accuracy validation measured
    again = run_cli(["evaluate", "--output-dir", str(out)] + QUICK)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["accuracy"] == pytest.approx(summary["accuracy"])


@pytest.mark.slow
def test_default_demo_reaches_ninety_percent(tmp_path):
    """`./run.sh` with no flags: the embedded default, end to end."""
    out = tmp_path / "demo"
    proc = run_cli(["train", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_samples"] == 600
    assert results["accuracy"] >= 0.90
    assert json.loads((out / "summary.json").read_text())["export_predictions_identical"] == 256


@pytest.fixture
def cli(capsys):
    """`ipu-t5 ARGS` in this process (the same `main` as the console script, without the
    interpreter start-up): returns returncode, stdout, stderr."""
    def call(args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return call


def _refused(proc, *fragments):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ipu-t5: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]


def _data(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [{"premise": "A man sleeps.", "hypothesis": "A man rests.", "label": i % 3} for i in range(40)]


@pytest.mark.core
@pytest.mark.parametrize("args,fragments", [
    (["--set", "training.max_stepz=3"], ["training.max_stepz", "Did you mean 'training.max_steps'?"]),
    (["--set", "training.learning_rate=fast"], ["training.learning_rate must be a number", "'fast'"]),
    (["--max-steps", "-1"], ["training.max_steps must be a positive integer, got -1"]),
    (["--set", "training.global_batch_size=0"], ["training.global_batch_size must be a positive integer, got 0"]),
    (["--model", "giant"], ["unknown model 'giant'"]),
    (["--config", "/nonexistent/run.yaml"], ["/nonexistent/run.yaml", "does not exist"]),
    (["--data-files", "train=/nonexistent/train.jsonl"], ["/nonexistent/train.jsonl", "does not exist"]),
    (["--stages", "9"], ["9 stages", "4 blocks"]),
])
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, args, fragments):
    _refused(cli(["train", "--output-dir", str(tmp_path / "run")] + args), *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.core
def test_yaml_that_does_not_parse(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {max_steps: 3\n")
    _refused(cli(["train", "--output-dir", str(tmp_path / "run"), "--config", str(bad)]),
             str(bad), "not valid YAML")


@pytest.mark.core
@pytest.mark.parametrize("rows,fragments", [
    ([{"text": "x", "label": 0}] * 20, ["no column 'hypothesis', 'premise'"]),
    ([dict(GOOD[0], label=5)] * 20, ["label 5", "outside the known set"]),
    ([], ["is empty"]),
])
def test_bad_data_files(cli, tmp_path, rows, fragments):
    path = _data(tmp_path, rows)
    _refused(cli(["train", "--output-dir", str(tmp_path / "run"),
                      "--data-files", "train={0},validation={0}".format(path)]), *fragments)


@pytest.mark.core
def test_a_data_file_that_is_not_utf8_is_one_line(cli, tmp_path):
    path = _data(tmp_path, GOOD)
    path.write_bytes(path.read_bytes().replace(b"A man rests.", b"A man \xff\xfe rests.", 1))
    _refused(cli(["train", "--output-dir", str(tmp_path / "run"), "--data-files",
                  "train={0},validation={0}".format(path)]), str(path), "line 1 (byte offset", "UTF-8", "iconv")
    assert not (tmp_path / "run").exists()


@pytest.mark.core
def test_output_dir_with_another_run_is_left_intact(cli, tmp_path):
    out = tmp_path / "run"
    first = cli(_args(out, "--max-steps", "3", "--set", "validation.do_eval=false"))
    assert first.returncode == 0, first.stderr[-3000:]
    snapshot = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _refused(cli(_args(out, "--max-steps", "3", "--set", "training.seed=5")), "holds a different run",
             "--overwrite")
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    replaced = cli(_args(out, "--max-steps", "3", "--set", "training.seed=5", "--overwrite",
                             "--set", "validation.do_eval=false"))
    assert replaced.returncode == 0, replaced.stderr[-3000:]


@pytest.mark.core
def test_a_multi_process_run_refuses_another_directory_before_starting(cli, tmp_path):
    """The launcher checks the output directory before any rank starts or any log is written."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refused(cli(["train", "--stages", "2", "--replicas", "2", "--output-dir", str(out)]), "holds no ipu-t5 run")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.core
def test_a_directory_holding_only_launch_logs_counts_as_empty(tmp_path):
    from ipu_t5.checkpointing import run_dir

    (tmp_path / "run" / run_dir.LOGS / "20250101-000000-1").mkdir(parents=True)
    assert run_dir.holds_other_run(tmp_path / "run", {"model": {}}, overwrite=False) is False
    run_dir.claim(tmp_path / "run", {"model": {}}, overwrite=False)
    assert (tmp_path / "run" / run_dir.RECORD).is_file() and (tmp_path / "run" / run_dir.LOGS).is_dir()


@pytest.mark.core
def test_export_command_from_a_checkpoint(cli, trained, tmp_path):
    checkpoint = trained["trainer"].save_checkpoint(tmp_path / "ckpt")
    proc = cli(["export", str(checkpoint), "--out", str(tmp_path / "exported"), "--dtype", "bfloat16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    _refused(cli(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]), "does not exist")


@pytest.mark.core
def test_help_lists_commands():
    proc = run_cli(["--help"])
    assert proc.returncode == 0 and "train" in proc.stdout and "export" in proc.stdout


@pytest.mark.core
def test_the_cli_and_the_launcher_import_neither_torch_nor_transformers_until_they_need_them(tmp_path):
    """The launcher of a multi-process run only reads the config and starts torchrun's agent: the
    package, the CLI and the launcher import no torch, transformers or datasets (every rank and a
    one-process run import them when they build the trainer), and the public API still resolves."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    code = ("import sys\n"
            "import ipu_t5, ipu_t5.cli, ipu_t5.backends.torch_distributed.launch\n"
            "from ipu_t5.cli import build_parser, config_from_args\n"
            "from ipu_t5.layout import plan_from_config\n"
            "from ipu_t5.backends import resolve_backend_name\n"
            "from ipu_t5.checkpointing import run_dir\n"
            "args = build_parser().parse_args(['train', '--model', 'tiny', '--stages', '2', '--backend', 'auto'])\n"
            "config = config_from_args(args)\n"
            "print(resolve_backend_name(config, plan_from_config(config)))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
            "from ipu_t5 import T5Trainer, load_config, postprocess_mnli_predictions, RunConfig, UserError\n"
            "print(T5Trainer.__name__, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          cwd=str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["torch", "[]", "T5Trainer True"]
