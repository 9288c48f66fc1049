"""Raw examples for a run: the hub, the user's files, or the project's generated demo data."""
import codecs
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import datasets

from ..config import RunConfig
from ..errors import UserError
from ..tasks import Task

# How `datasets.load_dataset` reads each file type.
FILE_BUILDERS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}


def parse_data_files(text: str) -> Dict[str, str]:
    """`train=a.jsonl,validation=b.jsonl` to {split: path}."""
    files = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise UserError("--data-files takes split=PATH pairs separated by commas "
                            "(train=a.jsonl,validation=b.jsonl), got '{}'".format(item))
        split, path = item.split("=", 1)
        files[split.strip()] = path.strip()
    return files


# Text formats are read as UTF-8; pyarrow's JSON reader even accepts other bytes and fails later.
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
CHUNK_BYTES = 1 << 22


def check_utf8(file: Path, shown: str, split: str) -> None:
    """Refuse a text file that is not UTF-8, naming the first bad line and byte offset; reads the
    file once, a few MB at a time, cut at line ends."""
    line, offset, rest = 1, 0, b""
    with open(str(file), "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            data = rest + chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            piece, rest = data[:cut], data[cut:]
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError as err:
                utf16 = offset == 0 and piece.startswith(UTF16_BOMS)
                raise UserError(
                    "data file '{}' (split {}) is not UTF-8 text{}: line {} (byte offset {}) holds {}, which UTF-8 "
                    "cannot decode. Convert it to UTF-8, e.g. `iconv -f {} -t UTF-8 {} > fixed{}`, and pass the "
                    "converted file.".format(
                        shown, split, " (it starts like UTF-16)" if utf16 else "",
                        line + piece.count(b"\n", 0, err.start), offset + err.start,
                        " ".join("0x{:02x}".format(b) for b in piece[err.start:err.end]),
                        "UTF-16" if utf16 else "<its encoding>", shown, file.suffix)) from None
            line += piece.count(b"\n")
            offset += len(piece)
            if not chunk:
                return


def _reason(err: BaseException) -> str:
    """The first line of the innermost error: `datasets` wraps the reader's own (pandas' "Expected 3
    fields in line 3") in a generic "An error occurred while generating the dataset"."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _load_file(split: str, path: str) -> datasets.Dataset:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError("data file '{}' (split {}) does not exist. Check the path given in "
                        "--data-files.".format(path, split))
    suffix = file.suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise UserError("data file '{}' has type '{}'; use one of {}.".format(
            path, suffix or "(none)", ", ".join(sorted(FILE_BUILDERS))))
    builder, options = FILE_BUILDERS[suffix]
    if file.stat().st_size == 0:
        raise UserError("data file '{}' (split {}) is empty: it needs at least one example.".format(path, split))
    if suffix in TEXT_SUFFIXES:
        check_utf8(file, path, split)
    try:
        return datasets.load_dataset(builder, data_files={split: str(file)}, split=split, **options)
    except Exception as err:  # the readers raise many types; all mean the file is unreadable
        raise UserError("could not read data file '{}' as {}: {}".format(path, suffix[1:], _reason(err))) from None


def _load_hub(task: Task) -> datasets.DatasetDict:
    if task.hub_dataset is None:
        raise UserError("task '{}' has no hub data set: use data.source=files.".format(task.name))
    try:
        return datasets.load_dataset(*task.hub_dataset)
    except Exception as err:  # offline, missing cache, hub errors
        raise UserError("could not load {} from the hub: {}. Without network access use "
                        "data.source=demo or --data-files.".format(
                            "/".join(task.hub_dataset), str(err).splitlines()[0])) from None


def _available(config: RunConfig, task: Task) -> Dict[str, Callable[[], datasets.Dataset]]:
    source = config.data.source
    if source == "demo":
        rows = task.demo_splits(config.training.seed, config.data.demo_train_samples,
                                config.data.demo_eval_samples)
        return {split: (lambda r=r, s=split: datasets.Dataset.from_list(r, split=s)) for split, r in rows.items()}
    if source == "hub":
        hub = _load_hub(task)
        return {split: (lambda s=split: hub[s]) for split in hub}
    return {split: (lambda s=split, p=path: _load_file(s, p)) for split, path in config.data.data_files.items()}


def load_split(config: RunConfig, task: Task, split: str) -> Tuple[datasets.Dataset, str]:
    """One split as it is (the rows to predict: the target column may be absent), and how to name
    it in a message: the file's path, or the split of the hub or demo data."""
    available = _available(config, task)
    if split not in available:
        raise UserError("no '{}' split in the {} data (it has: {}): name it with --split, or give the file "
                        "with --data-files {}=PATH.".format(split, config.data.source, ", ".join(available) or "none",
                                                             split))
    where = "data file '{}'".format(config.data.data_files[split]) if config.data.source == "files" else \
        "{} split '{}'".format(config.data.source, split)
    return available[split](), where


def check_examples(dataset: datasets.Dataset, task: Task, where: str, limit: Optional[int]) -> datasets.Dataset:
    """Cut to `limit` examples, then refuse empty data, missing columns or bad values."""
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    if len(dataset) == 0:
        raise UserError("{} is empty: it needs at least one example.".format(where))
    task.check_columns(dataset.column_names, where)
    return dataset.map(lambda example, i: task.normalize(dict(example), "{} row {}".format(where, i)),
                       with_indices=True, desc="checking " + where)


def load_splits(config: RunConfig, task: Task) -> Tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """The run's training split and (when validating) its evaluation split, checked against the task."""
    available = _available(config, task)
    eval_split = config.data.eval_split or task.eval_split
    if config.data.source == "files" and eval_split not in available and "validation" in available:
        eval_split = "validation"
    wanted = [("training", config.data.train_split, config.data.max_train_samples)]
    if config.validation.do_eval:
        wanted.append(("evaluation", eval_split, config.data.max_eval_samples))
    loaded = []
    for role, split, limit in wanted:
        if split not in available:
            raise UserError("no '{}' split for {} in {} data (it has: {}). Set data.{}_split or name "
                            "the file with --data-files {}=PATH.".format(
                                split, role, config.data.source, ", ".join(available) or "none",
                                "train" if role == "training" else "eval", split))
        where = "{} split '{}'".format(role, split)
        loaded.append(check_examples(available[split](), task, where, limit))
    return loaded[0], (loaded[1] if len(loaded) > 1 else None)
