#!/usr/bin/env python
"""Teacher-forced error rate of a checkpoint on milestones problems, per token role and per step.

    python scripts/milestones_token_errors.py checkpoints/milestones-13m --difficulty 2 --limit 8

For each held-out problem (eval seed 0), the gold prompt + solution is fed once (full causal forward, dense);
a token counts as wrong when the argmax at the previous position differs from it. Prints the error rate per
role (prev_value, lemma_value, const_value, sum, answer, ...) and the steps where errors occur, so one can see
which lookups the model has not learned (greedy accuracy needs every token of the solution right).
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--difficulty", type=int, default=2)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the counts here")
    args = p.parse_args(argv)

    import raas_jax
    from raas_jax.tasks import milestones as M

    model = raas_jax.load(args.model, dtype="f32")
    ids = M.Ids()
    errors, totals, by_step = collections.Counter(), collections.Counter(), collections.Counter()
    problems = M.eval_problems(args.difficulty, args.limit)
    for problem in problems:
        prompt, solution = ids.problem(problem)
        row = prompt + solution
        predicted = model.logits([row])[0].argmax(-1)
        for j, (role, step) in enumerate(M.solution_roles(problem)):
            pos = len(prompt) + j
            totals[role] += 1
            if predicted[pos - 1] != row[pos]:
                errors[role] += 1
                by_step[(role, step)] += 1
    tokens = sum(totals.values())
    print(f"{args.model}: difficulty {args.difficulty}, {len(problems)} problems, {tokens} solution tokens, "
          f"{sum(errors.values())} wrong ({sum(errors.values()) / tokens:.4%})")
    for role in sorted(totals, key=lambda r: -errors[r] / totals[r]):
        print(f"  {role:14s} {errors[role]:5d} / {totals[role]:6d}  {errors[role] / totals[role]:.4f}")
    print("most frequent (role, step) errors:", by_step.most_common(12))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"difficulty": args.difficulty, "problems": len(problems), "errors": dict(errors),
                       "totals": dict(totals), "by_step": [[r, s, n] for (r, s), n in by_step.most_common()]}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
