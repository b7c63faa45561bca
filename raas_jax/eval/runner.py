"""The accuracy eval: a grid of (policy, budget) cells over a math dataset, resumable, with fidelity.

Output directory:
    config.json     the run's settings (a resumed run must match them)
    samples.jsonl   one line per (cell, sample), appended as soon as the sample is done
    summary.csv / summary.md, accuracy_vs_budget.png, agreement_vs_budget.png
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from raas_jax import signals
from raas_jax.api import Model, teacher_forced_logits
from raas_jax.eval.answers import extract_answer, is_equivalent
from raas_jax.eval.datasets import INSTRUCTION, Sample, is_milestones, milestones_problem
from raas_jax.eval.fidelity import compare
from raas_jax.policies import Dense, Policy, make_policy, parse_policy_spec, policy_key

SAMPLES_FILE = "samples.jsonl"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    dataset: str
    policies: tuple[str, ...] = ("dense", "raas", "quest", "h2o", "streaming")
    budgets: tuple[int, ...] = (256, 512, 1024)
    page_size: int = 16  # every policy's page size unless `policy_page_sizes` names others
    max_new_tokens: int = 1024
    batch_size: int = 8
    limit: int | None = None
    fidelity: bool = False
    model: str | None = None
    policy_page_sizes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # e.g. (("h2o", (1, 16)),)
    kv_dtype: str = "auto"  # every policy's page storage dtype (cache.KV_DTYPES)

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size", "page_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.limit is not None and (not _is_int(self.limit) or self.limit < 1):
            raise ValueError(f"limit must be None or an integer >= 1, got {self.limit!r}")
        if not all(_is_int(b) and b >= 1 for b in self.budgets):
            raise ValueError(f"budgets must be integers >= 1, got {self.budgets!r}")
        if isinstance(self.policies, str):
            raise ValueError(f"policies is a tuple of policy specs, e.g. ('dense', 'raas'); got the string "
                             f"{self.policies!r}")

    def page_sizes(self, policy_name: str) -> tuple[int, ...]:
        return dict(self.policy_page_sizes).get(policy_name, (self.page_size,))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def parse_page_sizes(text: str) -> tuple[int, tuple[tuple[str, tuple[int, ...]], ...]]:
    """'16' or '16,h2o=1/16,streaming=1' -> (default page size, per-policy page sizes)."""
    from raas_jax.policies import POLICIES

    default, per_policy = 16, {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, _, sizes = item.rpartition("=")
        try:
            values = tuple(int(v) for v in sizes.split("/"))
        except ValueError:
            raise ValueError(f"--page-size takes N or POLICY=N[/M...] items, e.g. 16,h2o=1/16; got {item!r}") from None
        if any(v < 1 for v in values):
            raise ValueError(f"page sizes must be >= 1, got {item!r}")
        if not name:
            if len(values) != 1:
                raise ValueError(f"the default page size is one number, got {item!r}")
            default = values[0]
        elif policy_key(name) not in POLICIES:
            raise ValueError(f"--page-size names unknown policy {name!r}; choose from {', '.join(POLICIES)}")
        else:
            per_policy[policy_key(name)] = values
    return default, tuple(sorted(per_policy.items()))


@dataclasses.dataclass(frozen=True)
class Cell:
    policy_name: str  # the spec as given, canonical: 'raas' or 'raas:score=estimate'
    budget: int | None  # None for dense
    policy: Policy
    default_page_size: int = 16

    @property
    def key(self) -> str:
        key = self.policy_name if self.budget is None else f"{self.policy_name}@{self.budget}"
        if self.policy.page_size != self.default_page_size:
            key += f"/p{self.policy.page_size}"
        return key


def canonical_spec(spec: str) -> tuple[str, str, dict]:
    """'RaaS:score=estimate' -> ('raas:score=estimate', 'raas', {'score': 'estimate'}); an option at its default value is
    dropped ('raas:score=exact' is the cell 'raas')."""
    from raas_jax.policies import POLICIES, policy_options

    name, options = parse_policy_spec(spec)
    defaults = {f.name: f.default for f in policy_options(POLICIES[name])}
    options = {k: v for k, v in options.items() if v != defaults[k]}
    items = [f"{k}={v}" for k, v in options.items()]
    return ":".join([name, *items]), name, options


def grid(config: EvalConfig) -> list[Cell]:
    """Dense once (it has no budget), then every other policy (variants such as raas:score=estimate are cells of
    their own) at every budget and each of its page sizes."""
    cells = []
    specs, seen = [], set()
    for text in (n for n in config.policies if n.strip()):
        label, name, options = canonical_spec(text)
        if label not in seen:
            seen.add(label)
            specs.append((label, name, options))
        else:
            warnings.warn(f"policy {text.strip()!r} is the same cell as {label!r} (an option at its default value "
                          "or a repeated name): it runs once", stacklevel=2)
    named = {name for _, name, _ in specs}
    for name, sizes in config.policy_page_sizes:
        if name == "dense":
            raise ValueError("--page-size dense=N: dense runs once, at the default page size; give it as the plain N "
                             "(e.g. --page-size 16)")
        if name not in named:
            raise ValueError(f"--page-size {name}={'/'.join(map(str, sizes))} names a policy that is not among the "
                             f"policies ({', '.join(config.policies)}): add it or drop the page size")
    if any(name == "dense" for _, name, _ in specs) or config.fidelity:
        cells.append(Cell("dense", None, Dense(page_size=config.page_size, kv_dtype=config.kv_dtype),
                          config.page_size))
    for label, name, options in specs:
        if name == "dense":
            continue
        for budget in config.budgets:
            for page_size in config.page_sizes(name):
                cells.append(Cell(label, budget, make_policy(name, budget=budget, page_size=page_size,
                                                              kv_dtype=config.kv_dtype, **options),
                                  config.page_size))
    return cells


def build_prompt(model: Model, question: str, dataset: str | None = None) -> list[int]:
    if dataset is not None and is_milestones(dataset):  # a raw LM: the prompt as is, no template or instruction
        return model.encode(question, chat=False)
    return model.encode(f"{question}\n{INSTRUCTION}", chat=True)


def grade(dataset: str, sample: Sample, text: str) -> dict:
    """predicted / correct (and, for milestones, where the solution first goes wrong) for one generated text."""
    if is_milestones(dataset):
        from raas_jax.eval.tasks import milestones as M

        predicted = M.parse_answer(text)
        wrong = M.first_wrong_step(milestones_problem(sample.id), text)
        n_steps = int(sample.gold.split()[0][1:])  # gold "m{N} = VV"
        return {"predicted": predicted, "correct": predicted == sample.gold,
                "first_wrong_step": None if wrong is None else wrong.step,
                "first_wrong_role": None if wrong is None else wrong.role,
                # every one of the N steps right, whether or not the model then stopped with the answer line
                "steps_right": wrong is None or wrong.step > n_steps}
    predicted = extract_answer(text)
    return {"predicted": predicted, "correct": bool(is_equivalent(predicted, sample.gold))}


def read_done(path: Path) -> dict[tuple[str, str], dict]:
    """Finished (cell key, sample id) -> row, skipping a torn last line (`repair_torn_line` drops it)."""
    done: dict[tuple[str, str], dict] = {}
    if not path.is_file():
        return done
    text = path.read_text()
    lines = text.splitlines()
    if not text.endswith("\n"):
        lines = lines[:-1]  # the line an interrupted run was writing
    for line_no, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "cell" not in row or "id" not in row:
            if line.strip():
                warnings.warn(f"{path}:{line_no} is not a sample row; skipped", stacklevel=2)
            continue
        done[(row["cell"], row["id"])] = row
    return done


def repair_torn_line(path: Path) -> bool:
    """Drop a torn last line (no newline at its end: the row an interrupted run was writing) by truncating the file
    to the end of the last whole line; every other byte stays. Returns whether a line was dropped."""
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
    return True


class _Appender:
    """Appends JSON lines and flushes each one (an interrupted run loses at most the line being written, which the
    next run drops and writes again)."""

    def __init__(self, path: Path):
        repair_torn_line(path)
        self.file = open(path, "a")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def check_config(out: Path, config: EvalConfig, **recorded: Any) -> None:
    """Write config.json, or check that a resumed run uses the same settings: dataset, page sizes, max tokens,
    fidelity on/off, the model path resolved, and whatever the caller records beside the config (`recorded`;
    the CLI gives dtype, question/answer fields and the data file's sha256). Keys recorded by an earlier call
    are kept when a later one does not give them."""
    path = out / "config.json"
    current = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as saved
    current["model_resolved"] = _resolved_model(config.model)
    current.update(json.loads(json.dumps(recorded)))
    saved: dict[str, Any] = {}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}): use another --out-dir") from None
        saved.setdefault("policy_page_sizes", [])
        saved.setdefault("kv_dtype", "auto")  # runs from before the option stored pages in the model's dtype
        fixed = ["dataset", "page_size", "policy_page_sizes", "max_new_tokens", "fidelity", "kv_dtype"]
        fixed += ["model_resolved" if "model_resolved" in saved else "model"]  # the same model by another path
        fixed += [k for k in recorded if k in saved]  # runs from before a key was recorded do not have it
        changed = [k for k in fixed if saved.get(k) != current.get(k)]
        if changed:
            raise ValueError(f"{out} holds a run with different {', '.join(changed)} "
                             f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}): use another --out-dir")
    path.write_text(json.dumps({**saved, **current}, indent=2))


def _resolved_model(model: str | None) -> str:
    if model is None:
        from raas_jax.model_io.default_model import DEFAULT_NAME, cache_dir

        return str((cache_dir() / DEFAULT_NAME).resolve())
    return str(Path(model).expanduser().resolve())


def run_eval(model: Model, samples: Sequence[Sample], config: EvalConfig, out: str | Path,
             progress: bool = True) -> list[dict]:
    """Run every (cell, sample) not yet in out/samples.jsonl; return all rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # FP8 cells store pages with the model's calibrated scales when it has them: a resume must use the same ones
    check_config(out, config, kv_absmax=model.kv_absmax if config.kv_dtype.startswith("fp8") else None)
    cells = grid(config)
    done = read_done(out / SAMPLES_FILE)
    prompts = {s.id: build_prompt(model, s.question, config.dataset) for s in samples}
    todo = sum((c.key, s.id) not in done for c in cells for s in samples)
    bar = tqdm(total=len(cells) * len(samples), initial=len(cells) * len(samples) - todo, desc="eval",
               unit="sample", disable=not progress)
    appender = _Appender(out / SAMPLES_FILE)
    try:
        for start in range(0, len(samples), config.batch_size):
            batch = list(samples[start:start + config.batch_size])
            dense_logits: dict[str, np.ndarray] = {}
            for cell in cells:
                pending = [s for s in batch if (cell.key, s.id) not in done]
                if not pending:
                    continue
                signals.checkpoint("cell")
                rows = _run_cell(model, cell, pending, prompts, done, dense_logits, config)
                for row in rows:
                    appender.write(row)
                    done[(cell.key, row["id"])] = row
                    bar.update(1)
                    signals.checkpoint("row written")
    finally:
        appender.close()
        bar.close()
    return [done[(c.key, s.id)] for c in cells for s in samples if (c.key, s.id) in done]


def _run_cell(model: Model, cell: Cell, pending: list[Sample], prompts: dict[str, list[int]],
              done: dict, dense_logits: dict[str, np.ndarray], config: EvalConfig) -> list[dict]:
    base = {"cell": cell.key, "policy": cell.policy_name, "budget": cell.budget,
            "page_size": cell.policy.page_size}
    rows, runnable = [], []
    for sample in pending:
        try:
            cell.policy.check_prompts([len(prompts[sample.id])])
            runnable.append(sample)
        except ValueError as e:
            rows.append({**base, "id": sample.id, "gold": sample.gold, "skipped": True, "reason": str(e)})
    if not runnable:
        return rows
    results = model.generate([prompts[s.id] for s in runnable], max_new_tokens=config.max_new_tokens,
                             policy=cell.policy)
    batch_tokens = sum(r.stats["new_tokens"] for r in results)
    fidelity = {}
    if config.fidelity and cell.budget is not None:
        fidelity = _fidelity(model, cell, runnable, results, prompts, done, dense_logits)
    for sample, result in zip(runnable, results):
        share = result.stats["new_tokens"] / max(batch_tokens, 1)
        rows.append({**base, "id": sample.id, "gold": sample.gold, "skipped": False,
                     **grade(config.dataset, sample, result.text), "text": result.text,
                     "token_ids": result.token_ids, "new_tokens": result.stats["new_tokens"],
                     "seconds": result.stats["seconds"] * share, "cache_bytes": result.stats["cache_bytes"],
                     **fidelity.get(sample.id, {})})
    return rows


def _fidelity(model: Model, cell: Cell, runnable: list[Sample], results, prompts, done, dense_logits) -> dict:
    """Teacher-forced agreement, KL and first divergence against the dense rows of these samples."""
    dense_rows = [done.get(("dense", s.id)) for s in runnable]
    if any(r is None or r.get("skipped") or not r["token_ids"] for r in dense_rows):
        return {}
    missing = [s for s in runnable if s.id not in dense_logits]
    if missing:
        logits = teacher_forced_logits(model, [prompts[s.id] for s in missing],
                                       [done[("dense", s.id)]["token_ids"] for s in missing],
                                       Dense(kv_dtype=cell.policy.kv_dtype))  # the dense rows' own cache dtype
        dense_logits.update({s.id: lg for s, lg in zip(missing, logits)})
    forced = teacher_forced_logits(model, [prompts[s.id] for s in runnable], [r["token_ids"] for r in dense_rows],
                                   cell.policy)
    metrics = {}
    for sample, row, logits, result in zip(runnable, dense_rows, forced, results):
        f = compare(row["token_ids"], dense_logits[sample.id], logits, result.token_ids)
        metrics[sample.id] = {"agreement": f.agreement, "kl": f.kl, "first_divergence": f.first_divergence}
    return metrics


# ------------------------------------------------------------------------------------ summary

def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | tuple[None, None]:
    """95% Wilson score interval of a proportion (sound at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return None, None
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, center - half)), float(min(1.0, center + half))


def summarize(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per cell: accuracy (with a 95% interval), fidelity, tokens and speed."""
    table = []
    for key in dict.fromkeys(r["cell"] for r in rows):
        cell_rows = [r for r in rows if r["cell"] == key]
        ran = [r for r in cell_rows if not r["skipped"]]
        seconds = sum(r["seconds"] for r in ran)
        tokens = sum(r["new_tokens"] for r in ran)

        def mean(field: str) -> float | None:
            values = [r[field] for r in ran if field in r]
            return float(np.mean(values)) if values else None

        low, high = wilson_interval(sum(bool(r["correct"]) for r in ran), len(ran))
        table.append({
            "policy": cell_rows[0]["policy"], "budget": cell_rows[0]["budget"],
            "page_size": cell_rows[0].get("page_size"), "samples": len(ran),
            "skipped": len(cell_rows) - len(ran), "accuracy": mean("correct"), "accuracy_low": low,
            "accuracy_high": high, "steps_right": mean("steps_right"), "agreement": mean("agreement"),
            "kl": mean("kl"), "first_divergence": mean("first_divergence"), "new_tokens": mean("new_tokens"),
            "tokens_per_second": tokens / seconds if seconds > 0 else None,
            "cache_mib": (max(r["cache_bytes"] for r in ran) / 2**20) if ran else None,
        })
    return table


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = ("policy", "budget", "page_size", "samples", "skipped", "accuracy", "accuracy_low", "accuracy_high",
           "steps_right", "agreement", "kl", "first_divergence", "new_tokens", "tokens_per_second", "cache_mib")


def write_summary(table: list[dict], out: Path, title: str) -> None:
    lines = [",".join(COLUMNS)] + [",".join("" if r[c] is None else str(r[c]) for c in COLUMNS) for r in table]
    (out / "summary.csv").write_text("\n".join(lines) + "\n")
    md = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in table:
        md.append("| " + " | ".join(_fmt(r[c], 4 if c == "kl" else 3) for c in COLUMNS) + " |")
    skipped = [r for r in table if r["skipped"]]
    if skipped:
        md += ["", "Skipped: samples whose prompt does not fit the budget (see `reason` in samples.jsonl): "
               + ", ".join(f"{r['policy']}@{r['budget']}/p{r['page_size']}: {r['skipped']}" for r in skipped)
               + "."]
    (out / "summary.md").write_text("\n".join(md) + "\n")


def write_plots(table: list[dict], out: Path, title: str) -> list[Path]:
    from raas_jax.plots import line_plot

    written = []
    dense = next((r for r in table if r["policy"] == "dense"), None)
    for metric, label in (("accuracy", "accuracy"), ("steps_right", "all solution steps right (milestones)"),
                          ("agreement", "teacher-forced top-1 agreement with dense")):
        if all(r[metric] is None for r in table if r["budget"] is not None):
            continue
        sparse = [r for r in table if r["budget"] is not None]
        page_sizes = {r["policy"]: {x["page_size"] for x in sparse if x["policy"] == r["policy"]} for r in sparse}

        def series_name(r: dict) -> str:  # the page size is named where a policy runs at several or a non-default one
            several = len(page_sizes[r["policy"]]) > 1 or r["page_size"] != (dense or {}).get("page_size")
            return f"{r['policy']} p{r['page_size']}" if several else r["policy"]

        series = {name: [(r["budget"], r[metric]) for r in sparse if series_name(r) == name and r[metric] is not None]
                  for name in dict.fromkeys(series_name(r) for r in sparse)}
        hline = ("dense", dense[metric]) if dense is not None and dense[metric] is not None else None
        written.append(line_plot(series, out / f"{metric}_vs_budget.png", "KV budget (tokens)", label, title, hline))
    return written
