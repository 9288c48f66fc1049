"""Offline MNLI-shaped data: premise, hypothesis, label, idx, deterministic for a seed.

The labels follow from how the hypothesis relates to the premise: a restatement of part of it
(entailment), a denial of it (contradiction), or a claim that adds facts the premise does not
give (neutral). Premises of the mismatched split come from sentence templates that training never
sees (passive voice, reported speech, time clauses), as MNLI's mismatched genres differ from its
training genres; a tiny model must generalise across templates to score well there.
"""
import random
from typing import Any, Callable, Dict, List, Tuple

PEOPLE = [
    "the teacher", "a doctor", "my sister", "the old farmer", "a young boy", "the pilot",
    "her uncle", "the singer", "a student", "the baker", "his cousin", "the nurse", "a tourist",
    "the mayor", "our neighbor", "the chef", "a little girl", "the captain",
]
# past, base, past participle, objects
ACTIONS = [
    ("read", "read", "read", ["a book", "the letter", "the newspaper", "a poem"]),
    ("cooked", "cook", "cooked", ["dinner", "a cake", "the soup", "some rice"]),
    ("painted", "paint", "painted", ["the fence", "a picture", "the door", "the wall"]),
    ("washed", "wash", "washed", ["the car", "the dishes", "a shirt", "the window"]),
    ("bought", "buy", "bought", ["a bike", "some bread", "the tickets", "a hat"]),
    ("fixed", "fix", "fixed", ["the radio", "a chair", "the roof", "the lamp"]),
    ("visited", "visit", "visited", ["the museum", "a friend", "the farm", "the castle"]),
    ("wrote", "write", "written", ["a song", "the report", "a story", "an email"]),
    ("carried", "carry", "carried", ["the box", "a bag", "the chairs", "some wood"]),
    ("cleaned", "clean", "cleaned", ["the kitchen", "the garage", "a table", "the floor"]),
]
PLACES = [
    "in the park", "at the library", "near the river", "in the kitchen", "at the station",
    "in the garden", "at school", "downtown", "by the lake", "in the village",
]
TIMES = ["this morning", "last night", "on sunday", "after lunch", "yesterday", "early today",
         "before dinner", "at noon"]
# Framing words around the clause in training premises: they carry no label, and the model learns
# to look past them. The mismatched premises reuse these words in structures training never shows
# (a report opening the sentence, a time clause, the passive), as MNLI's genres share a language.
OPENERS = ["as usual", "surprisingly", "by the way", "once again", "luckily", "in fact"]
CLOSERS = ["people say", "according to the news", "it seems", "as planned", "we heard",
           "when it was late"]
EXTRAS = [
    "because it was raining", "because a friend asked", "to win a prize", "for the first time",
    "with a friend", "in a hurry", "while singing", "for money", "with great care",
    "to please the family", "after a long argument", "with two helpers",
]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


Slots = Dict[str, str]
Template = Callable[[Slots], str]

# (template, names a place); a hypothesis that adds a place is entailed only by a premise that
# names it, so part of the labels can only be read off the premise.
TRAIN_PREMISES: List[Tuple[Template, bool]] = [
    (lambda s: "{S} {Vp} {O} {place} {time}.".format(**s), True),
    (lambda s: "{Time}, {S} {Vp} {O} {place}.".format(Time=_cap(s["time"]), **s), True),
    (lambda s: "{S} {Vp} {O} {time}.".format(**s), False),
    (lambda s: "{Place}, {S} quietly {Vp} {O}.".format(Place=_cap(s["place"]), **s), True),
    (lambda s: "{Opener}, {S} {Vp} {O} {place}.".format(Opener=_cap(s["opener"]), **s), True),
    (lambda s: "{Opener}, {S} {Vp} {O} {time}.".format(Opener=_cap(s["opener"]), **s), False),
    (lambda s: "{S} {Vp} {O} {place}, {closer}.".format(**s), True),
    (lambda s: "{S} {Vp} {O} {time}, {closer}.".format(**s), False),
]
MISMATCHED_PREMISES: List[Tuple[Template, bool]] = [
    (lambda s: "{O} was {Vpp} by {S} {place}.".format(**s), True),
    (lambda s: "It was {time} when {S} {Vp} {O} {place}.".format(**s), True),
    (lambda s: "According to the news, {S} {Vp} {O} {place}.".format(**s), True),
    (lambda s: "People say that {S} {Vp} {O} {time}.".format(**s), False),
]

HYPOTHESES: Dict[int, List[Template]] = {
    0: [lambda s: "{S} {Vp} {O}.".format(**s),
        lambda s: "someone {Vp} {O}.".format(**s),
        lambda s: "{S} {Vp} something.".format(**s)],
    1: [lambda s: "{S} {Vp} {O} {extra}.".format(**s),
        lambda s: "someone {Vp} {O} {extra}.".format(**s)],
    2: [lambda s: "{S} did not {Vb} {O}.".format(**s),
        lambda s: "nobody {Vp} {O}.".format(**s),
        lambda s: "{S} never {Vp} anything.".format(**s)],
}
WITH_PLACE: Template = lambda s: "{S} {Vp} {O} {place}.".format(**s)


def _slots(rng: random.Random) -> Slots:
    past, base, participle, objects = rng.choice(ACTIONS)
    return {"S": rng.choice(PEOPLE), "Vp": past, "Vb": base, "Vpp": participle,
            "O": rng.choice(objects), "place": rng.choice(PLACES), "time": rng.choice(TIMES),
            "extra": rng.choice(EXTRAS), "opener": rng.choice(OPENERS),
            "closer": rng.choice(CLOSERS)}


def _examples(rng: random.Random, count: int, premises: List[Tuple[Template, bool]]) -> List[Dict[str, Any]]:
    rows = []
    for idx in range(count):
        label = idx % 3
        slots = _slots(rng)
        premise, names_place = rng.choice(premises)
        hypothesis = rng.choice(HYPOTHESES[label])
        # One in four entailment/neutral pairs turns on the place: entailed if the premise says it.
        if label != 2 and rng.random() < 0.25:
            label = 0 if names_place else 1
            hypothesis = WITH_PLACE
        rows.append({"premise": _cap(premise(slots)), "hypothesis": _cap(hypothesis(slots)),
                     "label": label, "idx": idx})
    rng.shuffle(rows)
    return rows


def generate_splits(seed: int, train_size: int, eval_size: int) -> Dict[str, List[Dict[str, Any]]]:
    """train, validation_matched and validation_mismatched, like GLUE MNLI's splits."""
    specs = [("train", train_size, TRAIN_PREMISES),
             ("validation_matched", eval_size, TRAIN_PREMISES),
             ("validation_mismatched", eval_size, MISMATCHED_PREMISES)]
    return {split: _examples(random.Random("{}-{}".format(seed, split)), size, premises)
            for split, size, premises in specs}
