#!/usr/bin/env python
"""How far FP8 pages move a model's next-token distribution, with and without calibrated k/v scales.

    python scripts/fp8_fidelity.py [--model PATH] [--dataset gsm8k] [--calibrate 8] [--held 4] [--new-tokens 96]
        [--budget 224]

Calibrates per-layer key/value maxima on the first `--calibrate` prompts (not saved: the model directory is left
as it is), then teacher-forces the model's own greedy continuations of the next `--held` prompts under Dense and
RaaS with pages in the model's dtype (the reference) and over FP8 (unscaled, scaled) and bf16 pages: mean KL of the
next-token distribution, the largest logit difference and how often the argmax agrees.
"""

import argparse

import numpy as np

import raas_jax
from raas_jax.api import teacher_forced_logits
from raas_jax.calibrate import measure_kv_absmax
from raas_jax.eval.datasets import load_samples
from raas_jax.eval.runner import build_prompt
from raas_jax.policies import Dense, RaaS


def compare(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float, float]:
    """(mean KL(reference || other), max |logit difference|, argmax agreement) over every position."""
    kls, errors, agree = [], [], []
    for a, b in zip(reference, other):
        log_a = a - a.max(-1, keepdims=True)
        log_a -= np.log(np.exp(log_a).sum(-1, keepdims=True))
        log_b = b - b.max(-1, keepdims=True)
        log_b -= np.log(np.exp(log_b).sum(-1, keepdims=True))
        kls.append((np.exp(log_a) * (log_a - log_b)).sum(-1))
        errors.append(np.abs(a - b).max())
        agree.append(a.argmax(-1) == b.argmax(-1))
    return float(np.concatenate(kls).mean()), float(max(errors)), float(np.concatenate(agree).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--calibrate", type=int, default=8)
    ap.add_argument("--held", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--budget", type=int, default=224)
    args = ap.parse_args()
    model = raas_jax.load(args.model, dtype="f32")
    samples = load_samples(args.dataset, args.data_dir, limit=args.calibrate + args.held)
    prompts = [build_prompt(model, s.question, args.dataset) for s in samples]
    absmax = measure_kv_absmax(model, prompts[:args.calibrate], args.new_tokens)
    print(f"calibrated on {args.calibrate} prompts: per-layer |k| max {min(absmax[0]):.3g}-{max(absmax[0]):.3g}, "
          f"|v| max {min(absmax[1]):.3g}-{max(absmax[1]):.3g}")
    held = prompts[args.calibrate:]
    continuations = [r.token_ids for r in model.generate(held, max_new_tokens=args.new_tokens, chat=False)]
    print("| policy | pages | KL | max abs logit difference | argmax agreement |\n|---|---|---|---|---|")
    for cls, options in ((Dense, {}), (RaaS, {"budget": args.budget})):
        reference = teacher_forced_logits(model, held, continuations, cls(**options))
        for pages, extra in (("fp8", {"kv_dtype": "fp8"}), ("fp8, calibrated scales", {"kv_dtype": "fp8",
                             "kv_absmax": absmax}), ("bfloat16", {"kv_dtype": "bfloat16"})):
            kl, error, agree = compare(reference, teacher_forced_logits(model, held, continuations,
                                                                        cls(**options, **extra)))
            name = cls.__name__ + (f"@{args.budget}" if options else "")
            print(f"| {name} | {pages} | {kl:.2e} | {error:.3f} | {agree:.4f} |", flush=True)


if __name__ == "__main__":
    main()
