"""The demo's bundled task: turn a table-booking message into the JSON record an application needs.

    "Hi, this is Maria. Could we get a table for 4 people on Friday at 7:30pm?"
    -> {"name": "Maria", "people": 4, "time": "7:30pm", "day": "Friday"}

The most common reason people fine-tune: a fixed output format. The embedded SmolLM2-135M-Instruct,
even told to reply in JSON, answers in prose or invents fields, so the base model scores ~0 exact
match and a user sees at once that it is wrong; after a short LoRA run it answers with exactly the
record, ~1 exact match on held-out messages. The task needs no facts the model lacks (every value is
copied from the message), so training teaches the format and nothing it knew is overwritten: the
demo's chat stage also asks a general question to show it.

Held-out rows use names never seen in training (values are drawn independently), so a high exact
match means the model extracts, not that it remembers. Everything is generated from a fixed seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM_PROMPT = "Extract the booking as JSON with the keys name, people, time and day."

_NAMES = (
    "Maria James Aiko Omar Sofia Liam Chen Priya Lucas Emma Noah Fatima Mateo Olivia Ivan Zara Hugo Mia "
    "Kenji Amara Leo Nora Diego Hana Samuel Elena Ravi Clara Yusuf Ines Tom Lena Arjun Grace Felix Aisha "
    "Pablo Yuki Daniel Sara"
).split()
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_TIMES = ["6pm", "6:30pm", "7pm", "7:30pm", "8pm", "8:30pm", "9pm", "12pm", "1pm", "1:30pm"]
_TEMPLATES = [
    "Book a table for {people} at {time} on {day} under the name {name}.",
    "Hi, this is {name}. Could we get a table for {people} people on {day} at {time}?",
    "{name} here - {people} of us, {day}, around {time}. Do you have space?",
    "Reservation please: {day}, {time}, party of {people}, name {name}.",
    "Can I reserve for {people} on {day} at {time}? My name is {name}.",
    "Table for {people}, {day} at {time}. Name: {name}.",
]
N_TRAIN, N_VAL, N_VAL_NAMES = 64, 24, 10

# Shown in the demo's chat stage: two new bookings, then a question outside the task (no system prompt).
CHAT_BOOKINGS = [
    "Hello! I'm Rosa and we are 5 people. Could we come on Thursday at 8pm?",
    "Table for 2, Sunday at 1pm. Name: Kwame.",
]
GENERAL_QUESTION = "What is the capital of France?"


def booking(rng: random.Random, names: list[str], template: str) -> dict:
    """One qa row: the message and its exact JSON record (key order and spacing are the format)."""
    values = {"name": rng.choice(names), "people": rng.randint(1, 12), "time": rng.choice(_TIMES), "day": rng.choice(_DAYS)}
    return {"question": template.format(**values), "answer": json.dumps(values)}


def demo_rows(seed: int = 0) -> dict[str, list[dict]]:
    """train / bookings_val rows; validation names never occur in training."""
    rng = random.Random(seed)
    names = _NAMES[:]
    rng.shuffle(names)
    val_names, train_names = names[:N_VAL_NAMES], names[N_VAL_NAMES:]
    pick = lambda n, pool: [booking(rng, pool, _TEMPLATES[i % len(_TEMPLATES)]) for i in range(n)]  # noqa: E731
    return {"train": pick(N_TRAIN, train_names), "bookings_val": pick(N_VAL, val_names)}


def write_demo_data(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl and bookings_val.jsonl (qa rows); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in demo_rows(seed).items():
        paths[name] = out_dir / f"{name}.jsonl"
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return paths
