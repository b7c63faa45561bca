"""Benchmarks: end-to-end decode (e2e), kernels, prefill, and the torch / HF reference decodes they compare with."""
