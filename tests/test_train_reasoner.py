"""scripts/train_reasoner.py on CPU with the tiny config: the loss falls, the checkpoint loads, a rerun resumes."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

import raas_jax
from raas_jax.eval.tasks import milestones as M

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_reasoner.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_reasoner", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(out: Path, steps: int, capsys, *extra: str) -> str:
    """Run the script's main in this process; the attention it swaps in for training is put back after."""
    import raas_jax.models.transformer as transformer

    original = transformer.causal_attention
    try:
        assert _script().main(["--out-dir", str(out), "--tiny", "--steps", str(steps), "--eval-every", "100", *extra]) == 0
    finally:
        transformer.causal_attention = original
    return capsys.readouterr().out


def test_tiny_training_learns_saves_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    first = _train(out, 8, capsys)
    rows = [r for r in csv.DictReader(open(out / "log.csv")) if r["split"] == "train"]
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) - 0.5
    assert (out / "loss.png").stat().st_size > 1000 and "done: step 8" in first

    ckpt = out / "checkpoint"
    info = json.loads((ckpt / "training.json").read_text())
    assert info["steps"] == 8 and info["train_seed_min"] == M.TRAIN_SEED_MIN and info["seed"] == 0
    model = raas_jax.load(ckpt, dtype="f32")
    problem = M.make_problem(0, 0, n_steps=4)
    ids = model.encode(problem.prompt, chat=False)
    assert model.decode_text(ids) == problem.prompt and model.eos_ids == (2,)
    assert np.isfinite(model.logits([ids])).all()
    assert len(model.generate(ids, max_new_tokens=4)[0].token_ids) <= 4

    second = _train(out, 10, capsys)
    assert "resuming from step 8" in second and "done: step 10" in second
    rows = [r for r in csv.DictReader(open(out / "log.csv")) if r["split"] == "train"]
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert json.loads((out / "train_state.json").read_text())["step"] == 10


def test_training_attention_matches_the_reference():
    """The training attention (jax.nn.dot_product_attention, causal) equals the model's default path."""
    import jax
    import jax.numpy as jnp

    from raas_jax.kernels import reference

    train = _script()
    swapped = train.training_attention("xla")
    assert swapped.kind == "xla" and train.training_attention("reference") is None
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 24, 4, 16))
    k, v = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 24, 2, 16))
    pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
    np.testing.assert_allclose(swapped(q, k, v, pos, pos), reference.causal_attention(q, k, v, pos, pos),
                               atol=2e-5)


def test_batches_mask_the_prompt_and_weight_the_answer():
    train = _script()
    ids = M.Ids()
    buckets = train.resolve_buckets(tiny=False)
    assert [b[0] for b in buckets] == [1024, 2048, 4096] and buckets[-1][3] == M.DIFFICULTIES[4][1]
    problems = [M.make_problem(M.TRAIN_SEED_MIN, i, n_steps=n) for i, n in enumerate((3, 7))]
    tokens, mask, keep = train.make_batch(problems, 192, ids, answer_weight=4.0)
    assert keep.shape == (2, 12) and keep.all()
    for row, p in enumerate(problems):
        prompt, solution = ids.problem(p)
        assert tokens[row, :len(prompt) + len(solution)].tolist() == prompt + solution
        weights = mask[row]
        assert weights[:len(prompt) - 1].sum() == 0 and weights[len(prompt) + len(solution) - 1:].sum() == 0
        (answer_at,) = np.nonzero(weights == 4.0)[0]
        assert ids.words[tokens[row, answer_at + 1]] == "answer"
        assert (weights > 0).sum() == len(solution)
    a, b = train.train_batch(3, 5, buckets, ids), train.train_batch(3, 5, buckets, ids)
    assert (a[0] == b[0]).all() and a[0].shape[1] in (1025, 2049, 4097)


def test_context_dropout_batches_hide_only_solution_pages():
    """Rows chosen for dropout hide solution pages at random; prompt pages and the other rows stay visible; the
    choice is a pure function of (seed, step)."""
    import random

    train = _script()
    ids = M.Ids()
    problems = [M.make_problem(M.TRAIN_SEED_MIN, i, n_steps=60) for i in range(64)]
    prompt_pages = -(-len(ids.problem(problems[0])[0]) // train.PAGE)
    _, _, keep = train.make_batch(problems, 1024, ids, dropout_rng=random.Random(0), context_dropout=0.5)
    assert keep[:, :prompt_pages].all()
    hidden_rows = (~keep).any(axis=1).sum()
    assert 20 <= hidden_rows <= 44  # about half of 64 rows
    assert 0.2 < (~keep[:, prompt_pages:]).mean() / (hidden_rows / 64) < 0.8  # keep probability ~ U(0, 1) per row
    _, _, none = train.make_batch(problems, 1024, ids, dropout_rng=random.Random(0), context_dropout=0.0)
    assert none.all()
    buckets = train.resolve_buckets(tiny=False)
    a, b = (train.train_batch(3, 5, buckets, ids, context_dropout=0.5) for _ in range(2))
    assert (a[2] == b[2]).all() and not a[2].all()


def test_context_mask_matches_brute_force():
    import jax.numpy as jnp

    train = _script()
    rng = np.random.default_rng(0)
    B, T, page, recent = 2, 70, train.PAGE, 20
    keep = rng.random((B, -(-T // page))) < 0.5
    pos = np.broadcast_to(np.arange(T), (B, T))
    got = np.asarray(train.context_mask(jnp.asarray(keep), jnp.asarray(pos), jnp.asarray(pos), recent))
    want = np.zeros((B, 1, T, T), bool)
    for b in range(B):
        for q in range(T):
            for k in range(q + 1):
                want[b, 0, q, k] = q - k < recent or keep[b, k // page]
    assert (got == want).all() and not got.all()


def test_masked_training_attention_equals_masked_reference():
    """With page_keep set, the training attention equals a plain softmax over the visible keys only."""
    import jax
    import jax.numpy as jnp

    train = _script()
    attention = train.training_attention("xla", recent=8)
    B, T, Hq, Hk, D = 2, 48, 4, 2, 16
    q = jax.random.normal(jax.random.PRNGKey(0), (B, T, Hq, D))
    k, v = jax.random.normal(jax.random.PRNGKey(1), (2, B, T, Hk, D))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    keep = jnp.asarray([[True, False, True], [False, False, True]])
    attention.page_keep = keep
    got = attention(q, k, v, pos, pos)
    visible = np.asarray(train.context_mask(keep, pos, pos, 8))[:, 0]  # [B, T, S]
    kk, vv = (np.repeat(np.asarray(x), Hq // Hk, axis=2) for x in (k, v))
    scores = np.einsum("bthd,bshd->bhts", np.asarray(q), kk) / np.sqrt(D)
    scores = np.where(visible[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", probs, vv)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    attention.page_keep = None
    assert not np.allclose(np.asarray(attention(q, k, v, pos, pos)), want, atol=1e-3)


@pytest.fixture(scope="module")
def phoenix_run(tmp_path_factory):
    """A tiny run with --context-dropout and --phoenix-fraction: (out dir, its stdout)."""
    import raas_jax.models.transformer as transformer

    out = tmp_path_factory.mktemp("phoenix") / "drop"
    original = transformer.causal_attention
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            assert _script().main(["--out-dir", str(out), "--tiny", "--steps", "4", "--eval-every", "100",
                                   "--context-dropout", "1.0", "--dropout-recent", "16",
                                   "--phoenix-fraction", "0.5"]) == 0
    finally:
        transformer.causal_attention = original
    return out, buffer.getvalue()


def test_tiny_training_with_context_dropout_and_phoenix_rows(phoenix_run):
    """--context-dropout with --phoenix-fraction: the run logs both held-out batches and its checkpoint's tokenizer
    has `recall`."""
    out, text = phoenix_run
    assert "context dropout 1.0 (recent 16), phoenix fraction 0.5" in text and "done: step 4" in text
    assert "held-out phoenix" in text
    info = json.loads((out / "checkpoint" / "training.json").read_text())
    assert info["context_dropout"] == 1.0 and info["dropout_recent"] == 16 and info["phoenix_fraction"] == 0.5
    assert set(info["heldout_phoenix"]) == {"loss", "tok_acc", "row_exact"}
    splits = {r["split"] for r in csv.DictReader(open(out / "log.csv"))}
    assert splits == {"train", "heldout", "heldout_phoenix"}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "checkpoint" / "tokenizer.json"))
    problem = M.make_problem(0, 0, difficulty=3, recall=True)
    assert tok.encode(problem.prompt).ids == M.Ids().problem(problem)[0]  # `recall` is id 639, no <unk>


@pytest.mark.slow  # compiles a decode: the eval CLI on `phoenix:3` with the tiny phoenix checkpoint, end to end
def test_eval_cli_on_phoenix_dataset(phoenix_run, tmp_path):
    from raas_jax.cli import main

    out, _ = phoenix_run
    problem = M.make_problem(0, 0, difficulty=3, recall=True)
    assert main(["eval", "--dataset", "phoenix:3", "--limit", "1", "--model", str(out / "checkpoint"),
                 "--policies", "dense", "--max-new-tokens", "8", "--dtype", "f32",
                 "--out-dir", str(tmp_path / "eval"), "--quiet"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["phoenix:3:0:0"] and rows[0]["gold"] == problem.gold
    assert rows[0]["first_wrong_step"] == 1 and rows[0]["correct"] is False  # 8 tokens: cut short at step 1


def test_phoenix_rows_in_batches():
    """--phoenix-fraction: a share of the rows are decode-phoenix problems (a pure function of (seed, step)), they
    never get context dropout, they fit their bucket, and fraction 0 leaves the batches as they were."""
    train = _script()
    ids = M.Ids()
    plain_buckets, buckets = train.resolve_buckets(tiny=False), train.resolve_buckets(tiny=False, phoenix=True)
    assert buckets[-1][3] == M.DIFFICULTIES[4][1] and buckets[1][3] <= plain_buckets[1][3]
    for seq_len, _, _, hi, _ in buckets:  # the longest problem of each bucket fits, in either variant
        for recall in (False, True):
            assert sum(M.token_lengths(M.make_problem(0, 0, n_steps=hi, recall=recall))) <= seq_len + 1
    old = train.train_batch(3, 7, plain_buckets, ids, context_dropout=0.5)
    same = train.train_batch(3, 7, plain_buckets, ids, context_dropout=0.5, phoenix_fraction=0.0)
    recall_id = ids.id["recall"]
    assert all((a == b).all() for a, b in zip(old, same)) and not (old[0] == recall_id).any()
    for step in range(4):
        tokens, _, keep = train.train_batch(3, step, buckets, ids, context_dropout=1.0, phoenix_fraction=0.5)
        again = train.train_batch(3, step, buckets, ids, context_dropout=1.0, phoenix_fraction=0.5)
        assert (tokens == again[0]).all() and (keep == again[2]).all()
        phoenix = (tokens == recall_id).any(axis=1)  # `recall` is in the prompt of phoenix rows only
        assert 0 < phoenix.sum() < len(phoenix)
        assert keep[phoenix].all() and not keep[~phoenix].all(axis=1).any()


def test_context_dropout_reaches_the_model_loss():
    """The training attention is what the model's forward calls (Transformer.attention_fn): hiding pages changes the loss, keeping every page
    gives the unmasked loss."""
    import jax.numpy as jnp

    from raas_jax.models.config import ModelConfig

    train = _script()
    ids = M.Ids()
    cfg = ModelConfig.from_hf_dict(train.hf_config(train.TINY, -(-len(ids) // 64) * 64))
    params = train.init_params(cfg, 0)
    optimizer = train.make_optimizer(0.1, 1.0)
    problems = [M.make_problem(M.TRAIN_SEED_MIN, i, n_steps=8) for i in range(2)]
    tokens, mask, keep = train.make_batch(problems, 192, ids)
    hidden = keep.copy()
    hidden[:, 7:] = False  # solution pages past position 112
    attention = train.training_attention("xla", recent=16)
    _, masked_eval = train.make_step(cfg, optimizer, jnp.float32, attention, masked=True)
    _, plain_eval = train.make_step(cfg, optimizer, jnp.float32)
    full, dropped = (float(masked_eval(params, tokens, mask, k)["loss"]) for k in (keep, hidden))
    plain = float(plain_eval(params, tokens, mask, keep)["loss"])
    assert abs(full - plain) < 1e-5 and abs(dropped - full) > 1e-4
