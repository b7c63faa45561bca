#!/usr/bin/env python
"""Accuracy against solution length at a fixed budget, from one or more milestones eval runs.

    python scripts/milestones_report.py out/eval_m1/samples.jsonl out/eval_m3/samples.jsonl --budget 512 \
        --out docs/img/milestones_vs_length.png

Each row's solution length is the gold solution's token count (its problem is regenerated from the row id);
rows are binned by length, and for every policy at `--budget` (and dense) the plot shows the share of solutions
with every step right ("steps_right": the eval's strict accuracy also needs the final answer line). Prints
the table it plots.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("samples", nargs="+", help="samples.jsonl files of `raas-jax eval --dataset milestones:D`")
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--bin", type=int, default=400, help="bin width in solution tokens (default 400)")
    p.add_argument("--metric", default="steps_right", choices=["steps_right", "correct"])
    p.add_argument("--out", default="milestones_vs_length.png")
    args = p.parse_args(argv)

    from raas_jax.eval.datasets import milestones_problem
    from raas_jax.plots import line_plot
    from raas_jax.tasks import milestones as M

    cells: dict[str, dict[int, list[bool]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in args.samples:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if "steps_right" not in row and "first_wrong_step" in row:  # rows written before the field existed
                wrong = row["first_wrong_step"]
                row["steps_right"] = wrong is None or wrong > int(row["gold"].split()[0][1:])
            if row.get("skipped") or row["budget"] not in (None, args.budget) or args.metric not in row:
                continue
            length = M.token_lengths(milestones_problem(row["id"]))[1]
            label = row["policy"] if row.get("page_size", 16) == 16 else f"{row['policy']} p{row['page_size']}"
            cells[label][length // args.bin * args.bin + args.bin // 2].append(bool(row[args.metric]))
    if not cells:
        raise SystemExit(f"no rows at budget {args.budget} (or dense) with {args.metric!r} in {args.samples}")
    print(f"| policy (budget {args.budget}) | " + " | ".join(f"~{x} tok" for x in sorted(cells["dense"])) + " |")
    for label, bins in cells.items():
        print(f"| {label} | " + " | ".join(f"{sum(v) / len(v):.2f} (n={len(v)})" if (v := bins.get(x)) else "-"
                                         for x in sorted(cells["dense"])) + " |")
    series = {label: [(x, sum(v) / len(v)) for x, v in sorted(bins.items())] for label, bins in cells.items()}
    line_plot(series, Path(args.out), "gold solution length (tokens, bin centre)",
              f"share of solutions with {'every step right' if args.metric == 'steps_right' else 'the exact answer'}",
              f"milestones: {args.metric} vs length, budget {args.budget} (dense: no budget)", log_x=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
