"""The milestones task: generator structure, seeds, tokenizer, checker, and the eval path on the committed model."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from raas_jax.eval.tasks import milestones as M

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "milestones-13m"


def _lines(problem):
    words = problem.solution_words()
    lines, cur = [], []
    for w in words:
        cur.append(w)
        if w == ";":
            lines.append(cur)
            cur = []
    return lines, cur


def test_structure_lemmas_constants_and_answer_by_recomputation():
    for index in range(20):
        p = M.make_problem(0, index, difficulty=1 + index % 4)
        lo, hi = M.DIFFICULTIES[p.difficulty]
        assert lo <= p.n_steps <= hi
        prompt = p.prompt_words()
        consts = {prompt[4 * j]: int(prompt[4 * j + 2]) for j in range(16)}
        assert list(consts) == [f"K{j}" for j in range(16)] and prompt[-3:] == ["steps", f"m{p.n_steps}", ":"]
        values = {"m0": int(prompt[prompt.index("m0") + 2])}
        lines, answer = _lines(p)
        assert len(lines) == p.n_steps
        for i, line in enumerate(lines, 1):
            assert line[0] == f"m{i}" and line[1] == "="
            names = line[2:line.index("=", 2)][::2]  # operands between the first two '='
            lemma = f"m{16 * ((i - 1) // 16)}"
            expect = [f"m{i - 1}"] + ([lemma] if lemma != f"m{i - 1}" else []) + \
                     ([f"K{(i // 4) % 16}"] if i % 4 == 0 else [])
            assert names == expect
            nums = [int(w) for w in line[line.index("=", 2):] if w.isdigit()]
            operands = [values[n] if n.startswith("m") else consts[n] for n in names]
            assert [nums[0]] + nums[1::2] == operands  # each operand value written once, in order
            acc = operands[0]
            for v, partial in zip(operands[1:], nums[2::2]):  # every partial sum is one mod-100 addition
                acc = (acc + v) % 100
                assert partial == acc
            values[f"m{i}"] = acc
        assert answer == ["answer", f"m{p.n_steps}", "=", f"{values[f'm{p.n_steps}']:02d}"]
        assert p.gold == f"m{p.n_steps} = {values[f'm{p.n_steps}']:02d}" and M.check_answer(p.solution, p.gold)


def test_lemma_used_for_16_steps_then_never():
    p = M.make_problem(0, 3, n_steps=100)
    lines, _ = _lines(p)
    for b in range(100 // 16):
        lemma = f"m{16 * b}"
        users = [i for i, line in enumerate(lines, 1) if lemma in line[2:]]
        assert users == list(range(16 * b + 1, min(16 * b + 17, 101)))


def test_lengths_grow_with_difficulty_and_fit_4k():
    medians = []
    for d in sorted(M.DIFFICULTIES):
        lengths = [sum(M.token_lengths(M.make_problem(0, i, difficulty=d))) for i in range(30)]
        medians.append(statistics.median(lengths))
        assert max(lengths) <= 4096
    assert medians == sorted(medians) and medians[0] < 800 and medians[-1] > 3000


def test_seeds_are_deterministic_and_disjoint():
    assert M.make_problem(5, 7, difficulty=2) == M.make_problem(5, 7, difficulty=2)
    train = [p for _, p in zip(range(40), M.train_problems(0))]
    assert all(p.seed >= M.TRAIN_SEED_MIN for p in train)
    evals = M.eval_problems(2, 40)
    assert all(p.seed < M.TRAIN_SEED_MIN for p in evals)
    assert not {(p.prompt, p.n_steps) for p in train} & {(p.prompt, p.n_steps) for p in evals}
    with pytest.raises(ValueError, match="evaluation seeds"):
        M.eval_problems(1, 2, seed=M.TRAIN_SEED_MIN)
    from raas_jax.eval.datasets import load_samples

    samples = load_samples("milestones:3", limit=3)
    assert [s.id for s in samples] == [f"milestones:3:{M.EVAL_SEED}:{i}" for i in range(3)]
    assert len(load_samples("milestones")) == 32


def test_checker_and_first_wrong_step():
    p = M.make_problem(0, 1, difficulty=1)
    assert M.first_wrong_step(p, p.solution) is None
    assert M.parse_answer("... ; answer m45 = 07 <eos>") == "m45 = 07"
    assert M.parse_answer("answer m45 = 7") is None and M.parse_answer("no answer here") is None
    assert not M.check_answer(p.solution.replace(f"answer m{p.n_steps}", f"answer m{p.n_steps + 1}"), p.gold)
    words = p.solution.split()
    start = sum(len(p.step_words(i)) for i in range(1, 20))  # step 20 has a constant: wrong its value
    line = p.step_words(20)
    j = M.step_roles(20).index("const_value")  # '... = a + b = c + [K value] = d ;'
    assert line[j] == f"{p.constants[(20 // 4) % 16]:02d}"
    bad = words.copy()
    bad[start + j] = "00" if bad[start + j] != "00" else "01"
    err = M.first_wrong_step(p, " ".join(bad))
    assert (err.step, err.role) == (20, "const_value") and err.expected == " ".join(line)
    cut = M.first_wrong_step(p, " ".join(words[:start + 3]))
    assert (cut.step, cut.role) == (20, "missing")
    assert M.first_wrong_step(p, " ".join(words[:-4])).step == p.n_steps + 1  # no answer line


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    M.save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == len(M.vocabulary()) == 639 and tok.chat_template is None
    p = M.make_problem(0, 2, difficulty=1)
    ids = tok.encode(p.prompt + " " + p.solution)
    ids_fast, sol = M.Ids().problem(p)
    assert ids == ids_fast + sol[:-1] and ids[0] == tok.bos_token_id and sol[-1] == tok.eos_token_id
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == p.prompt + " " + p.solution


@pytest.fixture(scope="module")
def model():
    import raas_jax

    return raas_jax.load(CKPT, dtype="f32")


def test_committed_checkpoint_encodes_the_task(model):
    p = M.make_problem(0, 0, difficulty=1)
    ids = model.encode(p.prompt, chat=False)
    assert len(ids) == 72 and model.decode_text(ids) == p.prompt
    assert model.cfg.vocab_size == 640 and model.eos_ids == (model.tokenizer.eos_token_id,)


def test_eval_end_to_end_on_committed_checkpoint(model, tmp_path):
    """CI's run of the whole path: held-out problems, raw prompt, dense and RaaS, exact checker, rows written."""
    from raas_jax.eval.datasets import load_samples
    from raas_jax.eval.runner import EvalConfig, run_eval, summarize

    samples = load_samples("milestones:1", limit=2)
    config = EvalConfig(dataset="milestones:1", policies=("dense", "raas"), budgets=(256,), max_new_tokens=96,
                        batch_size=2, model=str(CKPT))
    rows = run_eval(model, samples, config, tmp_path, progress=False)
    assert len(rows) == 4 and len((tmp_path / "samples.jsonl").read_text().splitlines()) == 4
    for row in rows:
        assert not row["skipped"] and row["gold"].startswith("m") and isinstance(row["correct"], bool)
        assert row["first_wrong_step"] is None or 1 <= row["first_wrong_step"] <= 61
        assert row["text"].startswith("m1 = m0 = ")  # the raw prompt: the model starts solving at once
    assert {r["cell"] for r in rows} == {"dense", "raas@256"}
    assert [r["policy"] for r in summarize(rows)] == ["dense", "raas"]
    json.dumps(rows)
