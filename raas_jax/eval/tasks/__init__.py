"""Synthetic tasks (plain Python, no jax): generators, tokenizers and exact checkers."""
