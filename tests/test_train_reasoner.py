"""scripts/train_reasoner.py on CPU with the tiny config: the loss falls, the checkpoint loads, a rerun resumes."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np

import raas_jax
from raas_jax.tasks import milestones as M

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_reasoner.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_reasoner", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(out: Path, steps: int, capsys) -> str:
    """Run the script's main in this process; the attention it swaps in for training is put back after."""
    import raas_jax.models.transformer as transformer

    original = transformer.causal_attention
    try:
        assert _script().main(["--out", str(out), "--tiny", "--steps", str(steps), "--eval-every", "100"]) == 0
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
    """The in-process attention swap (jax.nn.dot_product_attention, causal) equals the model's default path."""
    import jax
    import jax.numpy as jnp

    import raas_jax.models.transformer as transformer
    from raas_jax.kernels import reference

    train = _script()
    original = transformer.causal_attention
    try:
        assert train.install_attention("xla") == "xla"
        swapped = transformer.causal_attention
    finally:
        transformer.causal_attention = original
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
    tokens, mask = train.make_batch(problems, 192, ids, answer_weight=4.0)
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
