"""Offline text-correction data: a sentence with errors (text) and its corrected form (corrected),
deterministic for a seed.

Clean sentences come from the MNLI demo's vocabulary. Errors are of the kinds people make: a
misspelt word (each word has its one usual misspelling, as "teh" is for "the"), a word typed twice,
a verb in the wrong form, a lower-case start or a missing full stop. One sentence in eight is
already correct and must come back unchanged.
"""
import random
from typing import Any, Callable, Dict, List, Tuple

from .mnli import ACTIONS, PEOPLE, PLACES, TIMES

Words = List[str]


def misspell(word: str) -> str:
    """The word's one usual misspelling: two letters near its middle swapped (or a letter doubled
    where those two are the same)."""
    if len(word) < 4:
        return word
    i = len(word) // 2 - 1
    if word[i] == word[i + 1]:
        return word[:i] + word[i] + word[i:]
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def _typo(rng: random.Random, words: Words, verb: int) -> Words:
    candidates = [i for i, w in enumerate(words) if misspell(w.rstrip(".")) != w.rstrip(".")]
    i = rng.choice(candidates)
    end = "." if words[i].endswith(".") else ""
    return words[:i] + [misspell(words[i].rstrip(".")) + end] + words[i + 1:]


def _double(rng: random.Random, words: Words, verb: int) -> Words:
    i = rng.randrange(len(words) - 1)
    return words[:i + 1] + [words[i].lower()] + words[i + 1:]


def _verb_form(rng: random.Random, words: Words, verb: int) -> Words:
    past, base = words[verb], next(a[1] for a in ACTIONS if a[0] == words[verb])
    return words if past == base else words[:verb] + [base] + words[verb + 1:]


def _lower_start(rng: random.Random, words: Words, verb: int) -> Words:
    return [words[0].lower()] + words[1:]


def _no_stop(rng: random.Random, words: Words, verb: int) -> Words:
    return words[:-1] + [words[-1].rstrip(".")]


ERRORS: List[Callable[[random.Random, Words, int], Words]] = [_typo, _double, _verb_form, _lower_start, _no_stop]


def _sentence(rng: random.Random) -> Tuple[str, int]:
    past, _, _, objects = rng.choice(ACTIONS)
    subject = rng.choice(PEOPLE).split()
    words = subject + [past] + rng.choice(objects).split() + rng.choice(PLACES).split()
    if rng.random() < 0.5:
        words += rng.choice(TIMES).split()
    words[0] = words[0].capitalize()
    words[-1] += "."
    return " ".join(words), len(subject)


def _example(rng: random.Random, idx: int) -> Dict[str, Any]:
    corrected, verb = _sentence(rng)
    words = corrected.split()
    if idx % 8:
        # Errors are applied in a fixed order so a verb-form change never hits a misspelt verb.
        for error in sorted(rng.sample(ERRORS, rng.randint(1, 2)), key=ERRORS.index, reverse=True):
            words = error(rng, words, verb)
    return {"text": " ".join(words), "corrected": corrected, "id": str(idx)}


def generate_splits(seed: int, train_size: int, eval_size: int) -> Dict[str, List[Dict[str, Any]]]:
    """train and validation pairs."""
    splits = {}
    for split, size in (("train", train_size), ("validation", eval_size)):
        rng = random.Random("{}-correction-{}".format(seed, split))
        splits[split] = [_example(rng, idx) for idx in range(size)]
    return splits
