#!/usr/bin/env bash
# Run a command against this checkout on a GPU machine that has jax but not this package installed:
#   bash scripts/device_run.sh 'python -m raas_jax.cli bench e2e ...'
# The package is copied into a site directory (no pip, no network); the command runs in /tmp with
# R=<repo root> set, so tests run as: python -m pytest --rootdir "$R" "$R/tests/test_gpu.py".
set -euo pipefail
R=$(cd "$(dirname "$0")/.." && pwd)
SITE=/tmp/site
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r "$R/raas_jax" "$SITE/" && cp -r "$R/models" "$SITE/raas_jax/models" && cp -r "$R/kernels" "$SITE/raas_jax/kernels"
# JAX's allocator settings are left to each command (`bench e2e` takes one preallocated region: see raas_jax/cli.py)
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 R
cd /tmp
exec bash -c "$1"
