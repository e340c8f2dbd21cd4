"""`llamaft demo --dpo`: preference alignment (DPO) on the embedded SmolLM2, offline, on a CPU.

The preference a user can see: concise answers preferred to rambling ones. The project writes the
pairs itself (fixed seed): short factual questions (arithmetic, capitals, opposites), each with a
concise answer ("12.") and a rambling one that says the same thing between filler ("Great
question! The answer is 12. I hope this helps!"). Held-out questions are facts never seen
in training. After a short LoRA DPO run:
- validation preference accuracy (the DPO reward of chosen above rejected) rises from 0 (step 0:
  the policy is the reference) towards 1, per the trainer's own evaluations;
- `llamaft eval --compare-base` generates for the held-out questions with the base and the tuned
  model and shows mean_new_tokens and a few answers side by side.

Measured once (2-core CPU, 8 steps, about 3 minutes): preference accuracy 0 -> 1 and
chosen_preferred 0 -> 1 on the 8 held-out pairs; on the 4 generated answers mean_new_tokens 40 -> 32
and stops_on_eos 0 -> 0.25. The generated answers are still wordy: the rejected answers are written
by us, not by the model, so DPO mostly learns to avoid *that* filler. (lr 1e-3 for 16 steps gave
13.75 tokens and 0.75 stops, but half-broken answers such as "capital.": over-optimised.)

    llamaft demo --dpo --out runs/demo-dpo
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .assets import prepare_smollm2
from .console import make_console
from .demo import demo_data_dir, fresh_demo_dir

DPO_STEPS = 8
SYSTEM_PROMPT = "Answer the question."  # short: SmolLM2's default system message is 20 tokens per sequence
_INTROS = ["Great question!", "Oh, that is a really interesting thing to ask.", "Sure, I would be happy to help you with that!",
           "Well, let me think about this carefully for a moment.", "What a wonderful question, thank you for asking!"]
_OUTROS = ["I hope this helps, and feel free to ask me anything else!", "Let me know if you have any other questions!",
           "Have a wonderful day, and keep asking great questions!", "I am always here if you need more help."]
_CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
             "Egypt": "Cairo", "Canada": "Ottawa", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens",
             "Russia": "Moscow", "Kenya": "Nairobi", "Cuba": "Havana", "Ireland": "Dublin", "Austria": "Vienna",
             "Poland": "Warsaw", "Portugal": "Lisbon", "China": "Beijing", "Sweden": "Stockholm", "Chile": "Santiago"}
_OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "happy": "sad",
              "early": "late", "open": "closed", "full": "empty", "hard": "soft", "high": "low", "old": "new"}


def _facts(rng: random.Random) -> list[tuple[str, str]]:
    facts = [(f"What is the capital of {c}?", a) for c, a in _CAPITALS.items()]
    facts += [(f"What is the opposite of '{w}'?", o.capitalize()) for w, o in _OPPOSITES.items()]
    for _ in range(40):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        facts.append((f"What is {a} + {b}?", str(a + b)))
    rng.shuffle(facts)
    return facts


def _pair(rng: random.Random, question: str, answer: str) -> dict:
    # Short enough that a DPO step on two CPU cores takes seconds: pairs of ~40 tokens with the prompt.
    rambling = " ".join([rng.choice(_INTROS), f"The answer is {answer}.", rng.choice(_OUTROS)])
    return {"prompt": question, "chosen": f"{answer}.", "rejected": rambling}


def dpo_demo_rows(seed: int = 0, n_val: int = 8) -> dict[str, list[dict]]:
    """train / concise_val preference rows; validation questions never occur in training."""
    rng = random.Random(seed)
    pairs = [_pair(rng, q, a) for q, a in _facts(rng)]
    return {"train": pairs[n_val:], "concise_val": pairs[:n_val]}


def write_dpo_demo_data(out_dir: Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def dpo_demo_config(model_dir: Path, data: dict[str, Path], out_dir: Path, steps: int | None, *, micro_batch_size: int = 4,
                    gen_samples: int = 4):
    """The demo's run config; gen_samples=0: no generation during training (the slow test's budget)."""
    from .config import config_from_dict

    generation = {"*": {"metrics": ["contains"], "max_samples": gen_samples, "max_new_tokens": 40}} if gen_samples else {}
    return config_from_dict({
        "model": {"name": str(model_dir), "method": "lora", "dtype": "float32"},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": [str(data["train"])], "validation": {"concise_val": str(data["concise_val"])},
                 "system_prompt": SYSTEM_PROMPT, "max_seq_length": 128},
        "train": {"output_dir": str(out_dir), "objective": "dpo", "max_steps": steps or DPO_STEPS, "learning_rate": 5e-4,
                  "scheduler": "constant", "micro_batch_size": micro_batch_size, "eval_every": 0.5, "save_every": 0,
                  "logging_every": 1, "seed": 0, "report_to": []},
        "dpo": {"beta": 0.1},
        "eval": {"generation": generation},
    }, source="dpo demo config")


def run_dpo_demo(out_dir: str = "runs/demo-dpo", steps: int | None = None, *, n_val: int = 8, micro_batch_size: int = 4,
                 gen_samples: int = 4, quick: bool = False) -> Path:
    """Write the pairs, DPO-train SmolLM2 (LoRA), then base vs tuned on the held-out questions.
    quick (the slow test's CPU budget): the training run alone, evaluated once at its end; at step 0
    every DPO reward is 0 by definition (the policy is the reference), so accuracy starts at 0."""
    console = make_console()
    out = fresh_demo_dir(Path(out_dir))
    model_dir = prepare_smollm2(console)
    # built once: the example shown is a row of the split written and trained on (whatever n_val is)
    rows = dpo_demo_rows(n_val=n_val)
    data = write_dpo_demo_data(demo_data_dir(out), rows)
    example = rows["train"][0]
    console.print(f"preference: concise answers over rambling ones, e.g. {example['prompt']!r}\n"
                  f"  chosen:   {example['chosen']!r}\n  rejected: {example['rejected']!r}", highlight=False)
    from .train import train

    cfg = dpo_demo_config(model_dir, data, out, steps, micro_batch_size=micro_batch_size, gen_samples=0 if quick else gen_samples)
    if quick:
        cfg.train.eval_every = 0
    # step 0 evaluated: the base's numbers, for before -> after
    run_dir = Path(train(cfg, training_args={"eval_on_start": not quick}))
    if not quick:
        from .eval.evaluate import evaluate_run

        evaluate_run(run_dir, compare_base=True, console=console, max_samples=gen_samples)
    console.print(f"run: {run_dir} (summary.json: eval.concise_val.preference_accuracy; eval/eval.json: base vs tuned)")
    return run_dir
