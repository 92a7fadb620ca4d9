"""Write examples/data/toy_corpus.txt: a small synthetic English-like corpus for the examples.

Every line is made from a template and a seeded random generator, so the file is the same on
every run and holds no copied text. The lines have structure a tiny character-level model can
pick up within a few hundred steps:

- story sentences from a toy grammar (subject, verb, object, place, with a/an agreement),
- arithmetic facts on small numbers (`seven plus three is ten.` / `12 + 5 = 17.`),
- counting runs (`count from 4: 4 5 6 7 8.`),
- copy lines (`say gabu twice: gabu gabu.`), which reward looking back in the context.

    python examples/data/make_text.py [OUT_FILE]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SEED = 1234
LINES = 4000
DEFAULT = Path(__file__).resolve().parent / "toy_corpus.txt"

NAMES = ["Ada", "Bruno", "Cleo", "Dara", "Emil", "Fern", "Gus", "Hana", "Ivo", "Juno",
         "Kai", "Lena", "Milo", "Nora", "Otto", "Pia"]
ANIMALS = ["cat", "dog", "fox", "owl", "hen", "goat", "mouse", "otter", "eel", "ant"]
THINGS = ["apple", "ball", "book", "cup", "drum", "egg", "hat", "kite", "lamp", "map",
          "orange", "rope", "spoon", "umbrella"]
ADJECTIVES = ["big", "small", "red", "blue", "old", "new", "quiet", "loud", "green", "odd",
              "empty", "tiny"]
VERBS = ["found", "took", "dropped", "painted", "carried", "hid", "saw", "kept", "washed", "lost"]
PLACES = ["the garden", "the kitchen", "the river", "the barn", "the market", "the hill",
          "the forest", "the school"]
TIMES = ["in the morning", "at noon", "after lunch", "at night", "on monday", "on sunday"]
FEELINGS = ["happy", "sleepy", "hungry", "proud", "sad", "calm"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]
SYLLABLES = ["ba", "bo", "da", "di", "ga", "gu", "ka", "ki", "lo", "lu", "ma", "mi", "na",
             "no", "pa", "pe", "ra", "ri", "sa", "su", "ta", "to", "ze", "zu"]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(rng: random.Random) -> str:
    noun = rng.choice(ANIMALS + THINGS)
    if rng.random() < 0.5:
        adjective = rng.choice(ADJECTIVES)
        return f"{article(adjective)} {adjective} {noun}"
    return f"{article(noun)} {noun}"


def story(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    kind = rng.randrange(4)
    if kind == 0:
        line = f"{name} {rng.choice(VERBS)} {noun_phrase(rng)} in {rng.choice(PLACES)}."
    elif kind == 1:
        line = (f"{rng.choice(TIMES).capitalize()}, {name} {rng.choice(VERBS)} "
                f"{noun_phrase(rng)}.")
    elif kind == 2:
        other = rng.choice([n for n in NAMES if n != name])
        line = (f"{name} gave {other} {noun_phrase(rng)}, and {other} was "
                f"{rng.choice(FEELINGS)}.")
    else:
        animal = rng.choice(ANIMALS)
        line = f"The {animal} of {name} is {rng.choice(ADJECTIVES)} and {rng.choice(FEELINGS)}."
    return line


def arithmetic(rng: random.Random) -> str:
    if rng.random() < 0.5:
        a, b = rng.randrange(11), rng.randrange(11)
        if rng.random() < 0.5 or a < b:
            return f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."
        return f"{NUMBER_WORDS[a]} minus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a - b]}."
    a, b = rng.randrange(50), rng.randrange(50)
    return f"{a} + {b} = {a + b}."


def counting(rng: random.Random) -> str:
    start, length = rng.randrange(1, 60), rng.randrange(4, 9)
    return f"count from {start}: " + " ".join(str(start + i) for i in range(length)) + "."


def copying(rng: random.Random) -> str:
    word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randrange(2, 4)))
    times = rng.choice([("twice", 2), ("three times", 3)])
    return f"say {word} {times[0]}: " + " ".join([word] * times[1]) + "."


def make_text(seed: int = SEED, lines: int = LINES) -> str:
    """The corpus: `lines` lines, half stories, the rest arithmetic, counting and copying."""
    rng = random.Random(seed)
    makers = [story, story, story, arithmetic, counting, copying]
    return "\n".join(rng.choice(makers)(rng) for _ in range(lines)) + "\n"


def write(path: Path = DEFAULT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(make_text(), encoding="ascii")
    return path


if __name__ == "__main__":
    out = write(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
