"""The DPO objective of LLaVA-NeXT's ``train_dpo.py``: ``dpo_alpha * mean(DPO or IPO loss) + gamma * SFT(chosen)``.

    loss, metrics = dpo_objective(policy_sums, policy_counts, ref_sums, beta=0.1, dpo_alpha=1.0, gamma=0.0,
                                  loss_type="sigmoid")

``policy_sums`` / ``ref_sums`` ``[2n]``: each row's summed log p(answer tokens), the ``n`` chosen rows first;
``policy_counts`` ``[2n]``: each row's number of answer tokens. With ``h = (pi_c - pi_r) - (ref_c - ref_r)``:

- ``sigmoid`` (DPO): ``-logsigmoid(beta * h)`` on the summed log-probs;
- ``ipo``: ``(h' - 1 / (2 * beta))^2`` with ``h'`` from each row's *mean* token log-prob (LLaVA-NeXT's
  ``average_log_prob`` for ipo; TRL's ipo divides the summed log-ratios by the answer lengths: the same value).

The SFT term is the mean cross-entropy of the chosen answers' tokens (LLaVA-NeXT's ``get_sft_loss`` on the chosen
rows). Metrics carry TRL's names: ``rewards/chosen`` and ``rewards/rejected`` (``beta * (pi - ref)`` of the summed
log-probs), ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, plus LLaVA-NeXT's
``losses/dpo`` and ``losses/sft``. Checked against TRL's and LLaVA-NeXT's formulas in ``tests/train/test_dpo.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


def preference_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor, *, beta: float, loss_type: str) -> torch.Tensor:
    """Per-pair losses ``[n]`` from the chosen / rejected log-probs (sums for sigmoid, per-token means for ipo)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type}")


def dpo_objective(policy_sums: torch.Tensor, policy_counts: torch.Tensor, ref_sums: torch.Tensor, *, beta: float,
                  dpo_alpha: float, gamma: float, loss_type: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss (0-dim) and the batch's metrics (0-dim, detached)."""
    counts = policy_counts.to(policy_sums.device).float()
    ref_sums = ref_sums.to(policy_sums.device).float()
    pi_c, pi_r = policy_sums.chunk(2)
    ref_c, ref_r = ref_sums.chunk(2)
    if loss_type == "ipo":
        n_c, n_r = counts.clamp(min=1).chunk(2)
        losses = preference_losses(pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r, beta=beta, loss_type=loss_type)
    else:
        losses = preference_losses(pi_c, pi_r, ref_c, ref_r, beta=beta, loss_type=loss_type)
    dpo = losses.mean()
    sft = -pi_c.sum() / counts.chunk(2)[0].sum().clamp(min=1)
    loss = dpo_alpha * dpo + gamma * sft if gamma else dpo_alpha * dpo
    chosen_rewards = beta * (pi_c - ref_c).detach()
    rejected_rewards = beta * (pi_r - ref_r).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pi_c.detach().mean(),
        "logps/rejected": pi_r.detach().mean(),
        "losses/dpo": dpo.detach(),
        "losses/sft": sft.detach(),
    }
    return loss, metrics
