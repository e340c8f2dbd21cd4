"""Preference metrics of a model on encoded pairs (`llamaft eval` on a dpo / orpo / simpo run's preference sets).

    logps = pair_logps(model, examples, pad_id)              # [(chosen_sum, rejected_sum, n_chosen, n_rejected)]
    metrics = pair_metrics(logps)                            # one model alone
    metrics.update(reward_metrics(tuned_logps, base_logps, beta))   # --compare-base: DPO's implicit reward

One model alone has no reference, so it is scored on what it prefers by itself:
- chosen_preferred: share of pairs whose chosen answer has the higher mean log-prob per token
  (per token: a sum would prefer the shorter answer whatever the model learned);
- logps_chosen / logps_rejected: mean summed log-prob of the answers (TRL's logps/chosen, /rejected).
With the base model as reference (--compare-base; the reference LoRA training used, adapter-off):
- preference_accuracy: share of pairs whose reward beta * (log pi - log pi_base) is higher for the
  chosen answer, reward_margin: its mean margin (TRL's rewards/accuracies and rewards/margins).
"""

from __future__ import annotations

import torch

from ..data.chat import IGNORE_INDEX
from ..data.collate import Collator


@torch.no_grad()
def pair_logps(model, examples: list, pad_id: int, batch_size: int = 8) -> list[tuple[float, float, int, int]]:
    """Summed log-probs of each pair's chosen and rejected completion (given the prompt) and their token counts."""
    collate = Collator(pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sides = [ex.side(name) for ex in examples for name in ("chosen", "rejected")]  # chosen, rejected, chosen, ...
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(sides), batch_size * 2):
        batch = {k: v.to(device) for k, v in collate(sides[start:start + batch_size * 2]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]  # the model predicts token t+1 from t
        mask = labels != IGNORE_INDEX
        # log p(label) = its logit - logsumexp: no second [rows, T, vocab] tensor beside the logits
        token_logps = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
        sums += (token_logps * mask).sum(dim=1).tolist()
        counts += mask.sum(dim=1).tolist()
    if was_training:
        model.train()
    return [(sums[i], sums[i + 1], counts[i], counts[i + 1]) for i in range(0, len(sums), 2)]


def pair_metrics(logps: list[tuple[float, float, int, int]]) -> dict:
    if not logps:
        return {"chosen_preferred": None, "logps_chosen": None, "logps_rejected": None}
    n = len(logps)
    return {
        "chosen_preferred": sum(c / max(nc, 1) > r / max(nr, 1) for c, r, nc, nr in logps) / n,
        "logps_chosen": sum(c for c, _, _, _ in logps) / n,
        "logps_rejected": sum(r for _, r, _, _ in logps) / n,
    }


def reward_metrics(tuned: list[tuple], base: list[tuple], beta: float) -> dict:
    """DPO's implicit reward of the tuned model against the base on the same pairs."""
    margins = [beta * ((tc - bc) - (tr - br)) for (tc, tr, _, _), (bc, br, _, _) in zip(tuned, base)]
    if not margins:
        return {}
    return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins), "reward_margin": sum(margins) / len(margins)}
