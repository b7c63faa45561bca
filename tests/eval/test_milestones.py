"""The milestones task: generator structure, seeds, tokenizer, checker, and the eval path on the committed model."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from raas_jax.eval.tasks import milestones as M

CKPT = Path(__file__).resolve().parents[2] / "checkpoints" / "milestones-13m"


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
    assert len(tok) == len(M.vocabulary()) == 640 and tok.chat_template is None
    assert tok.convert_tokens_to_ids("recall") == 639 and M.vocabulary()[:639][-1] == "answer"  # appended
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
    # the committed checkpoint keeps its own 639-word tokenizer: the plain task's ids are the same as today's
    assert len(model.tokenizer) == 639
    prompt, solution = M.Ids().problem(p)
    assert model.encode(p.prompt + " " + p.solution, chat=False) == prompt + solution[:-1]


@pytest.mark.slow  # the fast set: the runner on the tiny model (tests/eval/test_eval.py), the checker above
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


# ----------------------------------------------------------------------------------- decode-phoenix variant

# (seed, index, difficulty or n_steps) -> (N, answer, sha256 of "prompt|solution"[:16]), computed with the generator
# before the decode-phoenix variant was added: the plain task must not change
PLAIN_REGRESSION = {
    (0, 0, 1, None): (31, 69, "a9020886c8cedcd9"),
    (0, 5, 3, None): (159, 56, "207e0933d56f4eeb"),
    (1_000_007, 3, 4, None): (235, 63, "c99d2a8af288c35b"),
    (42, 1, 2, None): (100, 45, "0c4f7e4f658ffdfd"),
    (3, 2, None, 40): (40, 20, "41393bad89abf01f"),
}


def test_plain_problems_are_unchanged():
    import hashlib

    for (seed, index, difficulty, n_steps), (n, answer, digest) in PLAIN_REGRESSION.items():
        p = M.make_problem(seed, index, difficulty=difficulty, n_steps=n_steps)
        assert not p.recall and p.recall_steps() == [] and "recall" not in p.prompt_words()
        assert (p.n_steps, p.answer) == (n, answer)
        assert hashlib.sha256(f"{p.prompt}|{p.solution}".encode()).hexdigest()[:16] == digest


def _expected_operands(i):
    """Operand names of step i of the variant, written out from the specification."""
    names = [f"m{i - 1}"]
    if 16 * ((i - 1) // 16) != i - 1:
        names.append(f"m{16 * ((i - 1) // 16)}")
    if i % 4 == 0:
        names.append(f"K{(i // 4) % 16}")
    if i % 16 == 6 and i >= 102:
        names.append(f"m{i - 96}")
    return names


def test_phoenix_recall_steps_values_and_roles_by_recomputation():
    for index in range(6):
        p = M.make_problem(0, index, difficulty=3 + index % 2, recall=True)
        assert p.recall and p.prompt_words()[-4:] == ["recall", "steps", f"m{p.n_steps}", ":"]
        assert p.recall_steps() == list(range(102, p.n_steps + 1, 16))
        assert all(i % 4 == 2 for i in p.recall_steps())  # never a constant step
        prompt = p.prompt_words()
        consts = {prompt[4 * j]: int(prompt[4 * j + 2]) for j in range(16)}
        values = {"m0": int(prompt[prompt.index("m0") + 2])}
        lines, answer = _lines(p)
        assert len(lines) == p.n_steps
        for i, line in enumerate(lines, 1):
            roles = M.step_roles(i, recall=True)
            assert len(roles) == len(line) and roles == p.step_roles(i)
            names = line[2:line.index("=", 2)][::2]
            assert names == _expected_operands(i)
            operands = [values[n] if n.startswith("m") else consts[n] for n in names]
            nums = [int(w) for w in line[line.index("=", 2):] if w.isdigit()]
            assert [nums[0]] + nums[1::2] == operands
            acc = operands[0]
            for v, partial in zip(operands[1:], nums[2::2]):
                acc = (acc + v) % 100
                assert partial == acc
            values[f"m{i}"] = acc
            if i in p.recall_steps():
                assert roles == M.ROLES_RECALL and len(line) == 18
                assert line[roles.index("recall")] == f"m{i - 96}"
                assert int(line[roles.index("recall_value")]) == values[f"m{i - 96}"]
                assert (i - 96) % 16 == 6  # the recalled result is never a lemma
        assert answer == ["answer", f"m{p.n_steps}", "=", f"{values[f'm{p.n_steps}']:02d}"]
        assert tuple(values[f"m{i}"] for i in range(p.n_steps + 1)) == p.values


def test_phoenix_recalled_results_are_unread_for_over_1000_tokens():
    """Brute force over the token sequence: between step j+1 (which reads m{j} as its prev) and the recall step
    i = j + 96, no line names m{j} or reads its value (every operand value of those lines belongs to another
    operand), and at least 1000 tokens separate the end of line j+1 from the start of line i."""
    p = M.make_problem(0, 1, n_steps=300, recall=True)
    lines, _ = _lines(p)
    starts = [sum(len(line) for line in lines[:k]) for k in range(len(lines))]  # token offset of line k+1
    value_of = {"prev_value": "prev", "lemma_value": "lemma", "const_value": "const", "recall_value": "recall"}
    assert len(p.recall_steps()) == 13
    for i in p.recall_steps():
        j = i - 96
        users = [k for k, line in enumerate(lines, 1) if f"m{j}" in line]
        assert users == [j, j + 1, i]  # defined, read as prev, recalled
        for k in range(j + 2, i):
            line, roles = lines[k - 1], M.step_roles(k, recall=True)
            for role, word in zip(roles, line):
                if role in value_of:  # the operand whose value this token is
                    assert line[roles.index(value_of[role])] != f"m{j}"
        end_of_reader = starts[j] + len(lines[j]) - 1  # the ';' of line j+1
        assert starts[i - 1] - end_of_reader - 1 >= 1000


def test_phoenix_checker_finds_a_wrong_recall_value():
    p = M.make_problem(0, 2, difficulty=3, recall=True)
    assert M.first_wrong_step(p, p.solution) is None and M.check_answer(p.solution, p.gold)
    i = p.recall_steps()[0]
    start = sum(len(p.step_words(k)) for k in range(1, i))
    j = M.ROLES_RECALL.index("recall_value")
    words = p.solution.split()
    assert words[start + j] == f"{p.values[i - 96]:02d}"
    words[start + j] = "00" if words[start + j] != "00" else "01"
    err = M.first_wrong_step(p, " ".join(words))
    assert (err.step, err.role) == (i, "recall_value") and err.expected == " ".join(p.step_words(i))
    roles = M.solution_roles(p)
    assert roles[start + j] == ("recall_value", i) and len(roles) == M.token_lengths(p)[1]


def test_phoenix_seeds_difficulties_and_lengths():
    plain = M.make_problem(5, 7, difficulty=3)
    variant = M.make_problem(5, 7, difficulty=3, recall=True)
    assert variant == M.make_problem(5, 7, difficulty=3, recall=True) and variant.values != plain.values
    train = [p for _, p in zip(range(30), M.train_problems(0, recall=True))]
    assert all(p.seed >= M.TRAIN_SEED_MIN and p.recall and p.difficulty in (2, 3, 4) for p in train)
    evals = M.eval_problems(3, 30, recall=True)
    assert all(p.seed < M.TRAIN_SEED_MIN and p.recall for p in evals)
    assert not {(p.prompt, p.n_steps) for p in train} & {(p.prompt, p.n_steps) for p in evals}
    with pytest.raises(ValueError, match="evaluation seeds"):
        M.eval_problems(3, 2, seed=M.TRAIN_SEED_MIN, recall=True)
    assert M.phoenix_difficulties() == [2, 3, 4]
    with pytest.raises(ValueError, match="no recall step"):
        M.make_problem(0, 0, difficulty=1, recall=True)
    # the longest problem of the variant fits a 4096-token training row (<bos> + prompt + solution + <eos>)
    assert sum(M.token_lengths(M.make_problem(0, 0, n_steps=M.DIFFICULTIES[4][1], recall=True))) <= 4096
    assert M.token_lengths(variant)[0] == M.token_lengths(plain)[0] + 1


def test_phoenix_dataset_names():
    from raas_jax.eval.datasets import is_milestones, load_samples, milestones_problem

    assert is_milestones("phoenix:3") and is_milestones("phoenix") and not is_milestones("phoenixes.jsonl")
    samples = load_samples("phoenix:3", limit=2)
    assert [s.id for s in samples] == [f"phoenix:3:{M.EVAL_SEED}:{i}" for i in range(2)]
    problem = milestones_problem(samples[1].id)
    assert problem == M.eval_problems(3, 2, recall=True)[1] and samples[1].gold == problem.gold
    assert samples[1].question == problem.prompt and " recall steps " in samples[1].question
    assert load_samples("phoenix", limit=1)[0].id.startswith("phoenix:3:")
    assert milestones_problem(load_samples("milestones:3", limit=1)[0].id) == M.make_problem(0, 0, difficulty=3)
    with pytest.raises(ValueError, match="no recall step"):
        load_samples("phoenix:1")
