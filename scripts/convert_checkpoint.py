#!/usr/bin/env python
"""Convert an HF directory or .gguf file into a raas-jax model directory (same as `raas-jax convert`)."""

import sys

from raas_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
