"""Accuracy eval: answer extraction, math equivalence, datasets and the (policy x budget) grid runner."""

from raas_jax.eval.answers import extract_answer, is_equivalent

__all__ = ["extract_answer", "is_equivalent"]
