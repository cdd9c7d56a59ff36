"""Per-token log-probabilities and entropies from language-model logits.

Owns the one place logits become ``logprobs``; the learner, the reference worker and
``losses.sft_loss`` all call :func:`logprobs_from_logits`, so their numbers agree bit for bit.
Computation is in float32 whatever the logits dtype: bf16 log-softmax loses enough precision
to make importance ratios drift away from 1 (OpenRLHF ``log_probs_from_logits`` does the same).
"""

from __future__ import annotations

import torch


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token: ``log_softmax(logits)[..., label]``.

    Written as ``logit[label] - logsumexp(logits)`` so that no ``(b, a, v)`` log-softmax tensor is
    kept beyond the logsumexp reduction (OpenRLHF ``openrlhf/models/utils.py::log_probs_from_logits``;
    torchtune ``rlhf/_generation.py::logits_to_logprobs`` uses log_softmax + gather, same values).

    Args:
        logits: ``(b, a, v)`` (any leading dims), any float dtype.
        labels: ``(b, a)`` integer token ids in ``[0, v)``; padding must hold a valid id
            (e.g. the pad token) and be masked out downstream.

    Returns:
        ``(b, a)`` float32 log-probabilities.
    """
    logits = logits.float()
    label_logits = torch.gather(logits, dim=-1, index=labels.long().unsqueeze(-1)).squeeze(-1)
    return label_logits - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the token distribution at each position: ``H = -sum_v p_v log p_v``.

    Uses ``H = logsumexp(z) - sum_v softmax(z)_v z_v``, which avoids ``0 * log 0`` NaNs for
    tokens with (near-)zero probability (OpenRLHF ``compute_entropy``, veRL
    ``entropy_from_logits``).

    Args:
        logits: ``(b, a, v)`` (any leading dims), any float dtype.

    Returns:
        ``(b, a)`` float32 entropies in nats.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
