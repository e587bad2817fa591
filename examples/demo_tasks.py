"""Built-in tasks for the offline demo: three questions about the same kind of sentence.

Every sentence mentions an animal or a vehicle, a good or bad quality, and a big or small size, so the three tasks
(topic, sentiment, size) read different words of the same texts and answer with their own label words. A model
fine-tuned on one question tends to forget the others: the setting where continual merging has to prove itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ANIMALS = "cat dog horse lion tiger rabbit mouse eagle whale snake sheep goat bear wolf fox owl".split()
VEHICLES = "car truck bus train bicycle boat plane tractor scooter van ship taxi tram rocket jeep wagon".split()
GOOD = "wonderful lovely excellent pleasant charming delightful superb friendly gentle brilliant".split()
BAD = "awful terrible horrible nasty dreadful rude ugly annoying boring miserable".split()
BIG = "huge giant enormous massive tall vast immense".split()
SMALL = "tiny little miniature small short petite compact".split()
FILLER = "today we saw near the old road by the river in town while it was raining and then".split()


@dataclass(frozen=True)
class DemoTask:
    name: str
    question: str
    labels: tuple[str, str]
    word_lists: tuple[list[str], list[str]]


TASKS = (
    DemoTask("topic", "is it about an animal or a vehicle", ("animal", "vehicle"), (ANIMALS, VEHICLES)),
    DemoTask("sentiment", "is the tone positive or negative", ("positive", "negative"), (GOOD, BAD)),
    DemoTask("size", "is the thing big or small", ("big", "small"), (BIG, SMALL)),
)


def sentence(rng: random.Random) -> tuple[str, dict[str, int]]:
    """A random sentence and, per task, the index of its true label."""
    truth = {t.name: rng.randrange(2) for t in TASKS}
    words = [rng.choice(t.word_lists[truth[t.name]]) for t in TASKS] + rng.sample(FILLER, 4)
    rng.shuffle(words)
    return " ".join(words), truth


def prompt(task: DemoTask, text: str) -> str:
    return f"question : {task.question} ? text : {text} . answer :"


def make_split(task: DemoTask, n: int, seed: int) -> list[tuple[str, int]]:
    """`n` (prompt, label index) pairs for `task`."""
    rng = random.Random(f"{task.name}-{seed}")
    out = []
    for _ in range(n):
        text, truth = sentence(rng)
        out.append((prompt(task, text), truth[task.name]))
    return out


def vocabulary_texts() -> list[str]:
    """Every word the demo uses, for building the tiny word-level tokenizer."""
    words = ANIMALS + VEHICLES + GOOD + BAD + BIG + SMALL + FILLER
    return [" ".join(words)] + [prompt(t, "") + " " + " ".join(t.labels) for t in TASKS]
