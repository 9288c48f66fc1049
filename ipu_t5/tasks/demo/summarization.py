"""Offline summarization data: short news reports (document) and one-sentence summaries (summary),
deterministic for a seed, with XSum's column names.

Each report states one story (a match, a forecast, company results, an election) in a key sentence
and a detail sentence, among sentences about other places and people. The summary takes facts
from both story sentences and none from the others, so a model has to pick the story out rather
than copy the first sentence.
"""
import random
from typing import Any, Callable, Dict, List, Tuple

TEAMS = ["the river hawks", "the city lions", "the north stars", "the red foxes", "the blue sharks",
         "the iron wolves", "the green giants", "the valley bears", "the harbor kings", "the storm riders"]
SCORES = ["two to one", "three to nil", "one to nil", "four to two", "three to two", "five to one"]
CITIES = ["riverton", "oakville", "lakeside", "millbrook", "stonebridge", "fairport", "hillcrest",
          "westham", "brookfield", "kingsbay", "elmwood", "ashford"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
PLAYERS = ["anna berg", "tom wilde", "sara okafor", "li chen", "marco ruiz", "eva novak", "sam price"]
WEATHER = ["snow", "rain", "wind", "fog", "hail", "storms"]
COMPANIES = ["northwind foods", "bright motors", "apex shipping", "green leaf energy", "silver bank",
             "blue river toys", "summit steel", "coral media"]
MOVES = [("rose", "up"), ("fell", "down")]
PERCENTS = ["five", "ten", "twelve", "twenty", "thirty", "forty"]
REASONS = ["strong sales abroad", "higher fuel costs", "a long strike", "a new product",
           "weak demand at home", "lower taxes"]
PEOPLE = ["maria lopez", "john baker", "ruth adams", "omar haddad", "nina petrova", "paul murphy",
          "grace kim"]
PROMISES = ["build more homes", "fix the roads", "open a new school", "cut local taxes",
            "clean the river", "hire more nurses"]
FILLERS = [
    "Meanwhile, people in {city} had a quiet {day}.",
    "Officials in {city} declined to comment.",
    "Residents of {city} said they were not surprised.",
    "In other news, a new bakery opened in {city}.",
    "Traffic in {city} was heavy on {day} morning.",
    "A spokesperson for {company} said nothing about {city}.",
    "{Person} was seen in {city} earlier that week.",
]

Slots = Dict[str, str]
# (key sentence, detail sentence, summary) templates of one kind of story.
Story = Tuple[Callable[[Slots], str], Callable[[Slots], str], Callable[[Slots], str]]

STORIES: List[Story] = [
    (lambda s: "On {day}, {team} beat {rival} {score} in front of a home crowd in {city}.".format(**s),
     lambda s: "{player} scored the winning goal late in the game.".format(**s),
     lambda s: "{team} beat {rival} {score} in {city}, with a late goal from {player}.".format(**s)),
    (lambda s: "Forecasters warned that heavy {weather} will hit {city} on {day}.".format(**s),
     lambda s: "Schools in {city} may close and trains could be delayed.".format(**s),
     lambda s: "Heavy {weather} is expected in {city} on {day}.".format(**s)),
    (lambda s: "{company} said on {day} that its profits {move} by {percent} percent.".format(**s),
     lambda s: "The company said the change came from {reason}.".format(**s),
     lambda s: "{company} profits {direction} {percent} percent because of {reason}.".format(**s)),
    (lambda s: "{person} won the election for mayor of {city} on {day}.".format(**s),
     lambda s: "During the campaign, {person} promised to {promise}.".format(**s),
     lambda s: "{person} was elected mayor of {city} after promising to {promise}.".format(**s)),
]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _title(name: str) -> str:
    return " ".join(w if w == "the" else w.capitalize() for w in name.split())


def _slots(rng: random.Random) -> Slots:
    team, rival = rng.sample(TEAMS, 2)
    move, direction = rng.choice(MOVES)
    return {"team": _title(team), "rival": _title(rival), "score": rng.choice(SCORES),
            "city": _title(rng.choice(CITIES)), "day": _title(rng.choice(DAYS)),
            "player": _title(rng.choice(PLAYERS)), "weather": rng.choice(WEATHER),
            "company": _title(rng.choice(COMPANIES)), "move": move, "direction": direction,
            "percent": rng.choice(PERCENTS), "reason": rng.choice(REASONS),
            "person": _title(rng.choice(PEOPLE)), "promise": rng.choice(PROMISES)}


def _filler(rng: random.Random, story: Slots) -> str:
    # Other places and people than the story's, so copying them into a summary is always wrong.
    city = _title(rng.choice([c for c in CITIES if _title(c) != story["city"]]))
    person = _title(rng.choice([p for p in PEOPLE if _title(p) != story["person"]]))
    company = _title(rng.choice([c for c in COMPANIES if _title(c) != story["company"]]))
    return rng.choice(FILLERS).format(city=city, day=_title(rng.choice(DAYS)), company=company,
                                      Person=person)


def _report(rng: random.Random, idx: int) -> Dict[str, Any]:
    key, detail, summary = STORIES[idx % len(STORIES)]
    slots = _slots(rng)
    before = [_filler(rng, slots) for _ in range(rng.randint(0, 2))]
    after = [_filler(rng, slots) for _ in range(rng.randint(1, 2))]
    sentences = before + [key(slots), detail(slots)] + after
    return {"document": " ".join(_cap(s) for s in sentences), "summary": _cap(summary(slots)), "id": str(idx)}


def generate_splits(seed: int, train_size: int, eval_size: int) -> Dict[str, List[Dict[str, Any]]]:
    """train and validation reports, as XSum's splits are named."""
    splits = {}
    for split, size in (("train", train_size), ("validation", eval_size)):
        rng = random.Random("{}-summarization-{}".format(seed, split))
        rows = [_report(rng, idx) for idx in range(size)]
        rng.shuffle(rows)
        splits[split] = rows
    return splits
