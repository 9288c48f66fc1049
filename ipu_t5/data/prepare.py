"""A run's inputs: its splits checked (or loaded from the config), the tokenizer, the tokenized
features and the token lengths the layout and the static-shape backends plan with."""
from dataclasses import dataclass
from typing import List, Optional

from ..config import RunConfig
from ..errors import UserError
from ..tasks import Task
from ..tokenizer import cache_root, load_tokenizer
from .features import Lengths, TokenColumns, lengths, prompt_cap, tokenize
from .sources import check_examples, load_splits


@dataclass
class RunData:
    """The tokenized splits of a run and what follows from them."""

    tokenizer: object
    train_features: object
    # None without validation data.
    eval_features: Optional[object]
    eval_split: Optional[str]
    lengths: Lengths
    train_tokens: TokenColumns
    # The prompts' tokenized length cap (truncation=True): the export's tokenizer carries it.
    prompt_length: int


def checked(dataset, task: Task, where: str):
    """A caller's data set, raw (the task's columns, validated) or already tokenized."""
    if "input_ids" in dataset.column_names:
        missing = [c for c in ("labels", "reference") if c not in dataset.column_names]
        if missing:
            raise UserError("{} is tokenized but has no {} column(s).".format(where, ", ".join(missing)))
        return dataset
    return check_examples(dataset, task, where, None)


def corpus(dataset, task: Task) -> List[str]:
    """The texts a demo tokenizer is trained on: every prompt and target of the training data."""
    if "input_ids" in dataset.column_names:
        raise UserError("the training data is already tokenized, so pass the tokenizer that made it.")
    rows = dataset.to_list()
    return [task.source_text(r) for r in rows] + [task.target_text(r) for r in rows]


def prepare_data(config: RunConfig, task: Task, dataset=None, eval_dataset=None, tokenizer=None,
                 static_prompt_length: bool = False) -> RunData:
    """Check the given splits (or load the config's), load or train the tokenizer, and tokenize
    the prompts truncated to `data.max_source_length` (else T5's 512).

    What the config loads is checked as it loads; what the caller passes is checked here. With
    `static_prompt_length` (a backend that compiles one prompt length, the IPU) and a compiled length
    that holds only `ipu.source_length_coverage` of the prompts, the rest are tokenized again,
    truncated to it as the tokenizer truncates (keeping the end-of-sequence token), so training,
    validation and the export see the same ids."""
    if eval_dataset is not None:
        eval_dataset = checked(eval_dataset, task, "evaluation data")
    if dataset is None:
        dataset, loaded_eval = load_splits(config, task)
        eval_dataset = loaded_eval if eval_dataset is None else eval_dataset
    else:
        dataset = checked(dataset, task, "training data")
    tokenizer = tokenizer or load_tokenizer(config, corpus=corpus(dataset, task))
    data = config.data

    def tokenized(cap: int):
        def one(split, role: str):
            return tokenize(split, task, tokenizer, cap, data.preprocessing_num_workers,
                            "tokenizing {} data".format(role), cache_root() / "features", data.overwrite_cache)
        return one(dataset, "training"), None if eval_dataset is None else one(eval_dataset, "evaluation")

    prompt_length = prompt_cap(data.max_source_length)
    train_features, eval_features = tokenized(prompt_length)
    found = lengths(train_features, eval_features, static_coverage=config.ipu.source_length_coverage)
    static = found.static_source
    if static_prompt_length and static < found.source and "input_ids" not in dataset.column_names:
        prompt_length = static
        train_features, eval_features = tokenized(prompt_length)
        found = Lengths(source=static, target=found.target, static_source=static)
    eval_split = None if eval_dataset is None or eval_dataset.split is None else str(eval_dataset.split)
    return RunData(tokenizer, train_features, eval_features, eval_split, found, TokenColumns(train_features),
                   prompt_length)
