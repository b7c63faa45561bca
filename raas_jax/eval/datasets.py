"""Math datasets as (id, question, gold answer) samples: GSM8K, MATH500, AIME24, any JSONL file, or the synthetic
milestones task (`milestones[:difficulty]`) and its decode-phoenix variant (`phoenix[:difficulty]`)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from raas_jax.eval.answers import extract_answer

# name -> (file, question field, answer field)
KNOWN_DATASETS = {
    "gsm8k": ("gsm8k_test.jsonl", "question", "answer"),
    "math500": ("math500_test.jsonl", "problem", "answer"),
    "aime24": ("aime24_test.jsonl", "problem", "answer"),
}
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    question: str
    gold: str


def default_data_dir() -> Path | None:
    """$RAAS_JAX_DATA, else the first `shared/data` found beside or above the cwd or this package."""
    if os.environ.get("RAAS_JAX_DATA"):
        return Path(os.environ["RAAS_JAX_DATA"])
    for base in (Path.cwd(), Path(__file__).resolve()):
        for parent in [base, *base.parents]:
            candidate = parent / "shared" / "data"
            if (candidate / KNOWN_DATASETS["gsm8k"][0]).is_file():
                return candidate
    return None


def dataset_path(dataset: str, data_dir: str | os.PathLike | None) -> Path:
    if dataset in KNOWN_DATASETS:
        root = Path(data_dir) if data_dir else default_data_dir()
        if root is None:
            raise FileNotFoundError(f"cannot find the {dataset} data: pass --data-dir DIR (holding "
                                    f"{KNOWN_DATASETS[dataset][0]}) or set RAAS_JAX_DATA")
        path = root / KNOWN_DATASETS[dataset][0]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass --data-dir DIR holding {KNOWN_DATASETS[dataset][0]}")
        return path
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset!r} is neither one of {', '.join(KNOWN_DATASETS)} nor a JSONL file")
    return path


MILESTONES_DEFAULT_DIFFICULTY = 2
PHOENIX_DEFAULT_DIFFICULTY = 3  # phoenix:2 has a recall step in about a third of its problems only
MILESTONES_DEFAULT_LIMIT = 32
MILESTONES_TASKS = ("milestones", "phoenix")  # the plain task and its decode-phoenix variant (recall steps)


def is_milestones(dataset: str) -> bool:
    """`milestones[:D]` or `phoenix[:D]`: the synthetic task of raas_jax/eval/tasks/milestones.py or its
    decode-phoenix variant (raw LM, exact answers)."""
    return dataset.partition(":")[0] in MILESTONES_TASKS


def milestones_samples(dataset: str, limit: int | None = None) -> list[Sample]:
    """Held-out problems 0..limit-1 of the evaluation seed at the difficulty after the colon (default 2; phoenix 3).

    The question is the prompt text (no chat template, no instruction), the gold `m{N} = VV`; the id
    `TASK:D:SEED:INDEX` (TASK milestones or phoenix) regenerates the problem (`milestones_problem`)."""
    from raas_jax.eval.tasks import milestones as M

    task, _, level = dataset.partition(":")
    recall = task == "phoenix"
    allowed = M.phoenix_difficulties() if recall else sorted(M.DIFFICULTIES)
    try:
        difficulty = int(level) if level else (PHOENIX_DEFAULT_DIFFICULTY if recall else MILESTONES_DEFAULT_DIFFICULTY)
    except ValueError:
        raise ValueError(f"{task} difficulty must be an integer ({allowed}), got {level!r}") from None
    if difficulty not in allowed:
        why = " (easier ones have no recall step)" if recall else ""
        raise ValueError(f"{task} difficulty must be one of {allowed}{why}, got {difficulty}")
    problems = M.eval_problems(difficulty, MILESTONES_DEFAULT_LIMIT if limit is None else limit, recall=recall)
    return [Sample(f"{task}:{difficulty}:{p.seed}:{p.index}", p.prompt, p.gold) for p in problems]


def milestones_problem(sample_id: str):
    """The Problem behind a milestones or phoenix sample id."""
    from raas_jax.eval.tasks import milestones as M

    task, difficulty, seed, index = sample_id.split(":")
    return M.make_problem(int(seed), int(index), difficulty=int(difficulty), recall=task == "phoenix")


def load_samples(dataset: str, data_dir: str | os.PathLike | None = None, question_field: str | None = None,
                 answer_field: str | None = None, limit: int | None = None) -> list[Sample]:
    """Read up to `limit` samples; GSM8K-style golds ("... #### 18") are reduced to the final answer.

    `milestones[:D]` and `phoenix[:D]` generate held-out problems instead (32 unless `limit`)."""
    if is_milestones(dataset):
        return milestones_samples(dataset, limit)
    path = dataset_path(dataset, data_dir)
    _, default_q, default_a = KNOWN_DATASETS.get(dataset, (None, "question", "answer"))
    q_field, a_field = question_field or default_q, answer_field or default_a
    samples = []
    first_line: dict[str, int] = {}  # sample id -> the line that has it
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{line_no} is not valid JSON") from None
            if q_field not in row or a_field not in row:
                raise ValueError(f"{path}:{line_no} lacks field {q_field!r} or {a_field!r} (has {sorted(row)}); "
                                 "use --question-field / --answer-field")
            gold = str(row[a_field])
            if "####" in gold:
                gold = extract_answer(gold) or gold
            sample_id = str(row.get("id", row.get("idx", row.get("unique_id", line_no - 1))))
            if sample_id in first_line:
                raise ValueError(f"{path}:{line_no} repeats sample id {sample_id!r} of line "
                                 f"{first_line[sample_id]}: ids must be unique")
            first_line[sample_id] = line_no
            samples.append(Sample(sample_id, str(row[q_field]), gold))
            if limit is not None and len(samples) >= limit:
                break
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples
