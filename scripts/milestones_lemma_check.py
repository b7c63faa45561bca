#!/usr/bin/env python
"""Where a milestones solution breaks under RaaS: at a given step's lemma-value token, replay the gold solution
(teacher-forced) under dense attention and under RaaS, and report per layer and KV head how much dense attention
mass goes to the lemma's own lines, to the previous line (which restates the lemma's value) and to everything
else, and whether RaaS still holds the lemma's pages at that step.

    python scripts/milestones_lemma_check.py checkpoints/milestones-13m --difficulty 3 --index 0 --step 123 \
        --budget 512 [--score exact]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--difficulty", type=int, default=3)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--step", type=int, required=True, help="solution step whose lemma-value token is examined")
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--score", default="estimate", choices=["estimate", "exact"], help="RaaS page score")
    args = p.parse_args(argv)

    import raas_jax
    from raas_jax import attention_map
    from raas_jax.policies import Dense, RaaS
    from raas_jax.tasks import milestones as M

    model = raas_jax.load(args.model, dtype="f32")
    problem = M.eval_problems(args.difficulty, args.index + 1)[args.index]
    if not 2 <= args.step <= problem.n_steps or M.lemma_index(args.step) in (args.step - 1, None):
        raise ValueError(f"--step must be a step in 2..{problem.n_steps} whose lemma is not the previous step")
    prompt, solution = M.Ids().problem(problem)
    words = problem.solution_words()
    lines, at = {}, len(prompt)  # step -> (first position, last position) of its line
    for i in range(1, problem.n_steps + 1):
        n = len(problem.step_words(i))
        lines[i] = (at, at + n - 1)
        at += n
    lemma = M.lemma_index(args.step)
    first, _ = lines[args.step]
    roles = M.step_roles(args.step)
    value_at = first + roles.index("lemma_value")  # position of the lemma-value token of line `step`
    query = value_at - 1  # the decode step whose output is that token
    P = args.page_size
    lemma_pages = sorted({q // P for i in (lemma, lemma + 1) for q in range(lines[i][0], lines[i][1] + 1)})
    prev_pages = sorted({q // P for q in range(*lines[args.step - 1])} | {lines[args.step - 1][1] // P})
    print(f"problem {args.difficulty}:{args.index}, step {args.step} (lemma m{lemma}); the lemma value token at "
          f"position {value_at} ({words[value_at - len(prompt)]}); lemma lines on pages {lemma_pages}, previous line "
          f"on pages {prev_pages}")

    continuation = solution[:query - len(prompt) + 1]
    dense = attention_map.trace(model, prompt, continuation, Dense(page_size=P), progress=False)
    raas_policy = RaaS(budget=args.budget, page_size=P, score=args.score)
    raas = attention_map.trace(model, prompt, continuation, raas_policy, progress=False)
    t = query - len(prompt)
    print("page masses are per KV head, max over its query heads (so a row can sum past 1)")
    print("layer head | lemma lines  previous line  prompt | heaviest other page (tokens back): mass | RaaS holds: "
          "lemma pages, that page")
    prompt_pages = list(range(-(-len(prompt) // P)))
    for layer in range(model.cfg.num_layers):
        grid = np.nan_to_num(dense.page_mass(layer)[t])  # [Hkv, pages]
        held = ~np.isnan(raas.page_mass(layer)[t])  # [Hkv, pages]
        for head in range(grid.shape[0]):
            row = grid[head]
            known = set(lemma_pages) | set(prev_pages) | set(prompt_pages)
            on = lambda pages: float(row[[q for q in pages if q < row.size]].sum())
            others = [q for q in range(row.size) if q not in known and q != query // P]
            top = max(others, key=lambda q: row[q])
            holds = "".join("y" if held[head][q] else "-" for q in lemma_pages)
            evicted = [len(prompt) + s for s, q in raas.events(layer, head)[0] if q == top]
            gone = f" (evicted at position {evicted[-1]})" if evicted and not held[head][top] else ""
            print(f"{layer:5d} {head:4d} | {on(lemma_pages):11.3f} {on([q for q in prev_pages if q not in lemma_pages]):14.3f} "
                  f"{on(prompt_pages):7.3f} | page {top:3d} ({query - top * P:4d}): {row[top]:.3f} | "
                  f"{holds}, {'y' if held[head][top] else '-'}{gone}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
