"""Fidelity to dense: how closely a sparse policy follows dense attention on the same prompts.

For each prompt the dense greedy generation is the reference. A policy is scored by
  agreement        teacher-forced top-1 agreement: the policy decodes the dense tokens and predicts
                   the next one; the share of steps where its argmax is the dense token;
  kl               mean KL(dense || policy) per generated token, on the same teacher-forced steps;
  first_divergence the first step where the policy's own free-running greedy output differs from
                   dense (= the dense length when it never does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Fidelity:
    agreement: float
    kl: float
    first_divergence: int
    steps: int


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(dense_tokens: Sequence[int], dense_logits: np.ndarray, policy_logits: np.ndarray,
            policy_tokens: Sequence[int]) -> Fidelity:
    """Metrics for one prompt from teacher-forced logits [n, V] and both free-running outputs."""
    steps = len(dense_tokens)
    agreement = float(np.mean(policy_logits.argmax(-1) == np.asarray(dense_tokens)))
    log_p, log_q = log_softmax(dense_logits.astype(np.float64)), log_softmax(policy_logits.astype(np.float64))
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    first = next((i for i, (a, b) in enumerate(zip(dense_tokens, policy_tokens)) if a != b),
                 min(steps, len(policy_tokens)))
    if first == len(policy_tokens) and len(policy_tokens) < steps:
        first = len(policy_tokens)  # the policy stopped early: it diverged there
    return Fidelity(agreement, kl, int(first), steps)
