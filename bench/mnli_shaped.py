"""MNLI-shaped benchmark data: the project's offline demo examples with GLUE MNLI's length profile.

The demo premises are one short clause each (prompts of 34 to 67 demo-tokenizer tokens), while
real MNLI prompts have a long right tail: most are short, a few are several times the median.
Batching, padding and generation speed all depend on that spread, so the benchmark widens the
demo premises with label-neutral filler sentences whose count follows a geometric distribution
(median 1, 95th percentile 5). Fillers use none of the words the labels
depend on (people, actions, objects, places, times), so the labels stay what the demo defines.
"""
import json
import random
from pathlib import Path
from typing import Dict, List

from ipu_t5.tasks.demo.mnli import generate_splits

SUBJECTS = [
    "the weather", "the traffic", "the market square", "the old bridge", "the city council",
    "the price of coffee", "the local team", "the river", "the northern road", "the evening train",
    "the harvest", "the election", "the hospital budget", "the summer festival", "the wind",
]
PREDICATES = [
    "stayed calm", "was busier than expected", "had changed a lot", "drew a large crowd",
    "was the main topic", "seemed quiet", "was in the newspapers", "caused some delays",
    "was in good shape", "became a problem",
]
TAILS = ["", "", "", "", " for weeks", " despite the warnings", " as it often does"]
# P(k fillers) = (1 - q) * q**k: median 1, 95th percentile 5.
FILLER_RATIO = 0.55


def _filler(rng: random.Random) -> str:
    sentence = "{} {}{}.".format(rng.choice(SUBJECTS), rng.choice(PREDICATES), rng.choice(TAILS))
    return sentence[0].upper() + sentence[1:]


def _widen(rows: List[Dict], rng: random.Random) -> List[Dict]:
    widened = []
    for row in rows:
        count = 0
        while rng.random() < FILLER_RATIO:
            count += 1
        fillers = [_filler(rng) for _ in range(count)]
        before = rng.randint(0, count)
        premise = " ".join(fillers[:before] + [row["premise"]] + fillers[before:])
        widened.append(dict(row, premise=premise))
    return widened


def mnli_shaped_splits(seed: int, train_size: int, eval_size: int) -> Dict[str, List[Dict]]:
    """train and validation_mismatched rows (premise, hypothesis, label, idx) with MNLI-like lengths."""
    splits = generate_splits(seed, train_size, eval_size)
    rng = random.Random("mnli-shaped-{}".format(seed))
    return {name: _widen(splits[name], rng) for name in ("train", "validation_mismatched")}


def write_jsonl(rows: List[Dict], path: Path) -> Path:
    """One JSON object per line, as `--data-files` reads."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
