#!/usr/bin/env python
"""Benchmarks (same as `raas-jax bench ...`): `python scripts/bench.py e2e --models llama3-8b`."""

import sys

from raas_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
