"""Tasks: templates over named columns, targets, metrics and postprocessors; tasks defined in the
config; the generated demo data; every shipped task trained and validated end to end."""
import json

import pytest

from ipu_t5.config import load_config
from ipu_t5.tasks.demo.summarization import DAYS
from ipu_t5.errors import UserError
from ipu_t5.tasks import TASKS, build_task, get_task, postprocess_mnli_predictions
from ipu_t5.tasks.base import template_columns

from tests.conftest import run_cli, tiny_overrides


def task_config(tmp_path, **values):
    return load_config("tiny", overrides=tiny_overrides(tmp_path / "run", **values))


@pytest.mark.core
def test_mnli_prompt_and_target():
    task = get_task("mnli")
    example = {"premise": "A man plays a guitar.", "hypothesis": "A man makes music.", "label": 0}
    assert task.source_text(example) == "mnli hypothesis: A man makes music. premise: A man plays a guitar."
    assert [task.target_text(dict(example, label=i)) for i in range(3)] == ["entailment", "neutral", "contradiction"]
    assert task.target_text(dict(example, label="Contradiction")) == "contradiction"
    assert task.reference(dict(example, label="neutral")) == 1
    assert task.required_columns == ["hypothesis", "premise", "label"]


@pytest.mark.core
def test_postprocess_maps_labels_and_flags_the_rest():
    generated = ["entailment", " Neutral ", "contradiction", "", "entailment entailment", "2", "maybe"]
    assert postprocess_mnli_predictions(generated) == [0, 1, 2, -1, -1, -1, -1]


@pytest.mark.core
def test_report_counts_per_class_and_invalid():
    report = get_task("mnli").report([0, 1, -1, 2, 2], [0, 2, 1, 2, 1])
    assert report["invalid"] == 1
    assert report["per_class"]["contradiction"] == {"total": 2, "correct": 1, "predicted": 2}
    assert report["per_class"]["neutral"] == {"total": 2, "correct": 0, "predicted": 1}


@pytest.mark.core
def test_shipped_tasks_format_their_demo_rows():
    expected = {"mnli": ("accuracy", "accuracy", "validation_mismatched"),
                "summarization": ("rouge", "rougeL", "validation"),
                "text_correction": ("exact_match", "exact_match", "validation")}
    assert set(TASKS) == set(expected)
    for name, (metric, main, split) in expected.items():
        task = get_task(name)
        assert (task.metric, task.main_metric, task.eval_split) == (metric, main, split)
        rows = task.demo_splits(3, 20, 10)
        assert len(rows["train"]) == 20 and len(rows[split]) == 10
        row = task.normalize(dict(rows["train"][0]), "row")
        prompt = task.source_text(row)
        assert all(str(row[c]) in prompt for c in task.input_columns)
        assert task.target_text(row).strip()


@pytest.mark.core
def test_summarization_formats_document_and_scores_rouge():
    import evaluate

    task = get_task("summarization")
    row = {"document": "Heavy rain hit Oakville. Officials in Riverton declined to comment.",
           "summary": "Heavy rain hit Oakville."}
    assert task.source_text(row) == "summarize: Heavy rain hit Oakville. Officials in Riverton declined to comment."
    assert task.target_text(row) == task.reference(row) == "Heavy rain hit Oakville."
    rouge = evaluate.load(task.metric_path)
    perfect = rouge.compute(predictions=["Heavy rain hit Oakville."], references=["heavy rain hit oakville"])
    assert perfect == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    partial = rouge.compute(predictions=["rain hit Riverton"], references=["Heavy rain hit Oakville."])
    # 2 of 3 predicted and 2 of 4 reference unigrams; 1 of 2 and 1 of 3 bigrams.
    assert partial["rouge1"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert partial["rouge2"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    report = task.report(["a b c", ""], ["a b", "c"])
    assert report == {"prediction_words": 1.5, "reference_words": 1.5, "empty_predictions": 1}


@pytest.mark.core
def test_text_correction_scores_exact_match_on_stripped_text():
    import evaluate

    task = get_task("text_correction")
    row = {"text": "the chef cook the soup", "corrected": "The chef cooked the soup."}
    assert task.source_text(row) == "correct: the chef cook the soup"
    predictions = task.postprocess([" The chef cooked the soup. ", "The chef cooked the soup"])
    assert predictions == ["The chef cooked the soup.", "The chef cooked the soup"]
    scores = evaluate.load(task.metric_path).compute(predictions=predictions, references=[task.reference(row)] * 2)
    assert scores == {"exact_match": 0.5}


@pytest.mark.core
def test_demo_data_is_deterministic_for_a_seed_and_differs_between_seeds():
    for name in ("summarization", "text_correction"):
        task = get_task(name)
        assert task.demo_splits(7, 30, 10) == task.demo_splits(7, 30, 10)
        assert task.demo_splits(7, 30, 10)["train"] != task.demo_splits(8, 30, 10)["train"]
        splits = task.demo_splits(7, 30, 10)
        train_texts = {r[task.input_columns[0]] for r in splits["train"]}
        assert len(train_texts) == 30, "generated examples repeat"


@pytest.mark.core
def test_text_correction_demo_pairs_differ_by_the_errors_it_names():
    rows = get_task("text_correction").demo_splits(1, 400, 10)["train"]
    unchanged = [r for r in rows if r["text"] == r["corrected"]]
    # One in eight is already correct; a verb-form error on "read" (same in every form) adds a few.
    assert 0.1 < len(unchanged) / len(rows) < 0.2
    for row in rows:
        assert row["corrected"][0].isupper() and row["corrected"].endswith(".")


@pytest.mark.core
def test_summaries_take_their_facts_from_the_story_not_the_fillers():
    rows = get_task("summarization").demo_splits(5, 200, 10)["train"]
    for row in rows:
        sentences = row["document"].split(". ")
        assert len(sentences) >= 3
        # Runs of capitalised words after the first word: teams, places, people, companies.
        names, run = [], []
        for word in row["summary"].split()[1:] + ["."]:
            if word[0].isupper() and word.rstrip(".,").lower() not in DAYS:
                run.append(word.rstrip(".,"))
            elif run:
                names, run = names + [" ".join(run)], []
        story = [s for s in sentences if any(n in s for n in names)]
        assert names and all(n in row["document"] for n in names), row
        # The fillers name other places and people: the story's names sit in its own two sentences.
        assert len(story) <= 2, row


@pytest.mark.core
def test_a_task_defined_in_the_config(tmp_path):
    config = task_config(tmp_path, **{"data.task": "sentiment", "task.input_template": "review: {review} stars?",
                                      "task.target_column": "stars", "task.postprocess": "lower"})
    task = build_task(config)
    assert (task.name, task.metric, task.input_columns, task.target_column) == (
        "sentiment", "exact_match", ["review"], "stars")
    assert task.postprocess([" Five "]) == ["five"]
    assert task.source_text({"review": "great", "stars": "five"}) == "review: great stars?"
    with pytest.raises(UserError, match="has no generated demo data"):
        task.demo_splits(1, 2, 2)


@pytest.mark.core
def test_config_keys_adapt_a_registered_task_to_other_columns(tmp_path):
    config = task_config(tmp_path, **{"data.task": "summarization", "task.input_template": "summarize: {article}",
                                      "task.target_column": "highlights"})
    task = build_task(config)
    assert (task.metric, task.main_metric, task.input_columns, task.target_column) == (
        "rouge", "rougeL", ["article"], "highlights")
    with pytest.raises(UserError, match="no column 'article', 'highlights'"):
        task.check_columns(["document", "summary"], "training split 'train'")


@pytest.mark.core
@pytest.mark.parametrize("values, message", [
    ({"data.task": "mine"}, "task 'mine' is not registered"),
    ({"data.task": "mine", "task.input_template": "x: {a}"}, "set task.input_template and task.target_column"),
    ({"task.input_template": "mnli {} {premise}"}, "empty or positional field"),
    ({"task.input_template": "mnli {0}"}, "empty or positional field"),
    ({"task.input_template": "mnli {premise"}, "not a valid format string"),
    ({"task.input_template": "mnli premise"}, "uses no column"),
    ({"task.input_template": "mnli {premise.text}"}, "without attribute or index access"),
    ({"task.target_column": " "}, "empty target column"),
    ({"data.task": "summarization", "task.metric": "bleu"}, "metric 'bleu' is neither a shipped metric"),
    ({"task.metric": "rouge"}, "cannot change them"),
    ({"data.task": "summarization", "task.postprocess": "upper"}, "task.postprocess must be one of lower, strip"),
])
def test_bad_task_settings_are_refused_when_the_config_is_built(tmp_path, values, message):
    with pytest.raises(UserError, match=message):
        task_config(tmp_path, **values)


@pytest.mark.core
def test_template_columns_are_unique_and_in_order():
    assert template_columns("q: {b} {a} and {b!r:>5}") == ["b", "a"]


@pytest.mark.core
def test_a_metric_module_of_the_users_own(tmp_path):
    module = tmp_path / "first_word"
    module.mkdir()
    (module / "first_word.py").write_text(
        "import datasets\n"
        "import evaluate\n"
        "class FirstWord(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        return evaluate.MetricInfo(description='', citation='', inputs_description='',\n"
        "            features=datasets.Features({'predictions': datasets.Value('string'),\n"
        "                                        'references': datasets.Value('string')}))\n"
        "    def _compute(self, predictions, references):\n"
        "        same = sum(p.split()[:1] == r.split()[:1] for p, r in zip(predictions, references))\n"
        "        return {'first_word': same / len(references)}\n")
    config = task_config(tmp_path, **{"data.task": "text_correction", "task.metric": str(module)})
    task = build_task(config)
    assert task.main_metric is None and task.metric_path == str(module)
    import evaluate

    scores = evaluate.load(task.metric_path).compute(predictions=["The cat", "A dog"], references=["The hat", "The dog"])
    assert scores == {"first_word": 0.5}


@pytest.mark.core
def test_empty_fields_in_data_are_refused_with_the_row_named(tmp_path):
    task = get_task("summarization")
    with pytest.raises(UserError, match="row 3 has an empty 'document' field"):
        task.normalize({"document": "  ", "summary": "x"}, "training split 'train' row 3")
    with pytest.raises(UserError, match="empty 'summary' field"):
        task.normalize({"document": "text", "summary": None}, "row")


# (task, steps, score the trained tiny model must exceed; the untrained one scores 0 on each)
END_TO_END = [("summarization", 60, 0.5), ("text_correction", 90, 0.2), ("mnli", 40, 0.6)]


@pytest.mark.parametrize("task, steps, floor", END_TO_END)
def test_each_shipped_task_trains_and_validates_on_its_demo_data(tmp_path, task, steps, floor):
    from ipu_t5.training.trainer import T5Trainer

    config = task_config(tmp_path, **{"data.task": task, "data.demo_train_samples": 1600,
                                      "data.demo_eval_samples": 60, "training.max_steps": steps,
                                      "training.global_batch_size": 32})
    trainer = T5Trainer(config)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.close()
    main = after["main_metric"]
    assert main == get_task(task).main_metric
    assert before[main] < 0.05 < floor < after[main], (before, after)
    written = json.loads((config.output_dir / "eval_results.json").read_text())
    assert written["task"] == task and written["split"] == get_task(task).eval_split
    assert set(written["metrics"]) <= set(written)
    assert written[main] == after[main] and written["step"] == steps


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_trains_summarization_on_the_users_own_files(tmp_path):
    splits = get_task("summarization").demo_splits(11, 200, 20)
    train = write_jsonl(tmp_path / "a.jsonl", splits["train"])
    validation = write_jsonl(tmp_path / "b.jsonl", splits["validation"])
    out = tmp_path / "run"
    result = run_cli(["train", "--model", "tiny", "--task", "summarization",
                      "--data-files", "train={},validation={}".format(train, validation)]
                     + sum((["--set", s] for s in tiny_overrides(out, **{"training.max_steps": 6,
                                                                         "training.global_batch_size": 8})), []))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation rougeL" in result.stdout and "(rouge1 " in result.stdout
    assert "of the validation split" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["main_metric"] == "rougeL" and {"rouge1", "rouge2", "rougeL"} <= set(summary)
    assert summary["export_predictions_identical"] == summary["export_predictions_checked"] == 20
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_samples"] == 20 and results["task"] == "summarization"
    assert "summarize: " in (out / "hf" / "README.md").read_text()


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a long text", "summary": "short"}] * 4, "no column 'document' needed by task 'summarization'"),
    ([{"document": "a long text", "summary": "short"}] * 3 + [{"document": "", "summary": "x"}],
     "training split 'train' row 3 has an empty 'document' field"),
])
def test_cli_refuses_files_that_do_not_fit_the_task_in_one_line(tmp_path, rows, message):
    data = write_jsonl(tmp_path / "a.jsonl", rows)
    result = run_cli(["train", "--model", "tiny", "--task", "summarization", "--output-dir", str(tmp_path / "run"),
                      "--data-files", "train={},validation={}".format(data, data)])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("ipu-t5: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
