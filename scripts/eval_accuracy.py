#!/usr/bin/env python
"""Accuracy / fidelity eval over policies x budgets (same as `raas-jax eval`)."""

import sys

from raas_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
