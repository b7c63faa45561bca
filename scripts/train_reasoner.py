#!/usr/bin/env python
"""Train a small Llama-architecture model on the milestones task (raas_jax/tasks/milestones.py).

The model is this library's own `Transformer` (full causal forward, no cache), so the result is an ordinary
raas-jax checkpoint that `raas_jax.load(path)` reads: config.json (HF LlamaConfig-style), generation_config.json,
the word-level tokenizer, params/ (orbax, bf16) and training.json (config, seed, the generator's training seed
range, steps, tokens, final metrics).

    python scripts/train_reasoner.py --out out/reasoner --minutes 8.5          # GPU: the full model
    python scripts/train_reasoner.py --out /tmp/tiny --tiny --steps 20          # CPU: seconds

--out DIR holds the training state (train_state.npz + .json: f32 params, AdamW state, step, schedule progress),
the loss log (log.csv), the loss curve (loss.png) and the final checkpoint (DIR/checkpoint, or --ckpt).
Re-running with the same --out continues from the saved step. The learning rate warms up, then follows a
cosine over the run's progress: the larger of step/--steps and elapsed/--minutes (after compilation), so a
wall-clock budget ends with a decayed learning rate.

Data: every step is one of a few sequence-length buckets (1K, 2K, 4K tokens; about 64K tokens per batch),
one problem per row padded to the bucket length, loss on the solution tokens only. Problems come from
seeds >= TRAIN_SEED_MIN (evaluation uses seeds below it); the batch of step s is a pure function of
(--seed, s), so a resumed run sees fresh problems. A background thread generates batches.

--phoenix-fraction F: each row is a problem of the decode-phoenix variant (recall steps, `phoenix:D` in the eval)
with probability F, drawn per row as a pure function of (--seed, step, row); the other rows are the plain task. With
F > 0 the bucket step ranges are clipped to what fits for the (longer) variant, and a second held-out batch of the
variant is logged (split heldout_phoenix). --context-dropout applies to plain rows only: a phoenix row attends
causally to everything, since hiding the page of a recalled value would train on a target that cannot be predicted.

Attention: the model's default prefill attention (kernels/reference.py) materialises T x T scores in f32;
the training model takes `jax.nn.dot_product_attention(is_causal=True)` (cuDNN flash attention on a GPU, XLA
elsewhere) as its prompt attention through `Transformer(attention_fn=...)` (`--attention reference` keeps the
default). Parameters and the
forward are otherwise the library's.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import queue
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

FULL = dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
            intermediate_size=1024)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128)
# (sequence length, rows, fewest steps, most steps, weight); the step ranges are clipped to what fits
FULL_BUCKETS = ((1024, 64, 20, None, 0.3), (2048, 32, None, None, 0.3), (4096, 16, None, 300, 0.4))
TINY_BUCKETS = ((192, 8, 3, None, 1.0),)
PAGE = 16  # --context-dropout hides whole pages of this many positions (the eval's page size)
MAX_FILE_BYTES = 8 << 20  # orbax data files of the saved checkpoint (the repo keeps files under 16 MB)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", "--out", required=True,
                   help="folder of the training state, logs, plot and (by default) the checkpoint (--out: older name)")
    p.add_argument("--ckpt", default=None, help="where to write the final checkpoint (default OUT/checkpoint)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and short problems (CPU, seconds)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (schedule and stop)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget of this run, start to finish")
    p.add_argument("--seed", type=int, default=0, help="init and data seed (problems: seed 1,000,000 + this)")
    p.add_argument("--init-from", default=None,
                   help="start from this converted checkpoint's weights (a fresh optimizer and schedule; use another "
                        "--seed so the problems are new)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; tiny 3e-3)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 200; tiny 5)")
    p.add_argument("--final-lr-fraction", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--answer-weight", type=float, default=1.0,
                   help="loss weight of the 'answer' token (stopping at step N: one target per problem)")
    p.add_argument("--context-dropout", type=float, default=0.0,
                   help="share of training rows whose solution pages outside the recent window are hidden at random "
                        "(each such row draws a keep probability in [0, 1)); 0: plain causal attention")
    p.add_argument("--phoenix-fraction", type=float, default=0.0,
                   help="share of training rows drawn from the decode-phoenix variant (recall steps); 0: plain task "
                        "only. Those rows never get context dropout")
    p.add_argument("--dropout-recent", type=int, default=64,
                   help="with --context-dropout: every query always sees the keys this many positions back or nearer")
    p.add_argument("--attention", default="auto", choices=["auto", "cudnn", "xla", "reference"],
                   help="training attention (auto: cudnn on GPU, xla elsewhere)")
    p.add_argument("--log-every", type=int, default=None, help="steps between log lines (default 25; tiny 1)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evals (default 500)")
    p.add_argument("--save-every", type=float, default=300.0, help="seconds between training-state saves")
    p.add_argument("--reserve", type=float, default=20.0, help="seconds of --minutes kept for the final save")
    args = p.parse_args(argv)
    if args.steps is None and args.minutes is None:
        p.error("give --steps and/or --minutes")
    if not 0.0 <= args.phoenix_fraction <= 1.0:
        p.error("--phoenix-fraction must lie in [0, 1]")
    args.lr = args.lr or (3e-3 if args.tiny else 1e-3)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.tiny else 200)
    args.log_every = args.log_every or (1 if args.tiny else 25)
    args.eval_every = args.eval_every or (10 if args.tiny else 500)
    return args


# ---------------------------------------------------------------------------------------- config

def hf_config(arch: dict, vocab_size: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
            **arch, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": False, "attention_bias": False,
            "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "initializer_range": 0.02, "torch_dtype": "bfloat16"}


def solution_length(n_steps: int, recall: bool = False) -> int:
    """Tokens of the solution of an n-step problem, with the answer line and <eos> (independent of values)."""
    from raas_jax.eval.tasks import milestones as M

    return sum(len(M.step_roles(i, recall)) for i in range(1, n_steps + 1)) + 5


def resolve_buckets(tiny: bool, phoenix: bool = False) -> list[tuple[int, int, int, int, float]]:
    """Buckets with step ranges: a row is <bos> + prompt + solution, at most seq_len + 1 tokens (`phoenix`: also
    for the longer decode-phoenix variant)."""
    from raas_jax.eval.tasks import milestones as M

    def row_length(n: int) -> int:
        variants = (False, True) if phoenix else (False,)
        return max(1 + len(M.make_problem(0, 0, n_steps=1, recall=r).prompt_words()) + solution_length(n, r)
                   for r in variants)

    out, prev_max = [], 0
    for seq_len, rows, lo, hi, weight in (TINY_BUCKETS if tiny else FULL_BUCKETS):
        fits = max(n for n in range(1, M.MAX_STEPS + 1) if row_length(n) <= seq_len + 1)
        hi = min(hi or fits, fits)
        lo = lo or prev_max + 1
        out.append((seq_len, rows, lo, hi, weight))
        prev_max = hi
    return out


# ------------------------------------------------------------------------------------------ data

def make_batch(problems, seq_len: int, ids, answer_weight: float = 1.0, dropout_rng: random.Random | None = None,
               context_dropout: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens [B, T+1] int32 (pad after <eos>), mask [B, T] float32: the loss weight of each target, 1 on
    solution tokens (`answer_weight` on the `answer` token that ends the steps), 0 elsewhere; page_keep
    [B, T / PAGE] bool: which PAGE-token pages of each row stay visible beyond the recent window (see
    `context_mask`). A share `context_dropout` of the plain-task rows hides each page that holds no prompt token
    with probability 1 - q, q drawn uniformly per row; the other rows (decode-phoenix rows always: their recalled
    values sit on old solution pages) and every prompt page stay visible."""
    tokens = np.full((len(problems), seq_len + 1), ids.pad, np.int32)
    mask = np.zeros((len(problems), seq_len), np.float32)
    page_keep = np.ones((len(problems), -(-seq_len // PAGE)), bool)
    for r, problem in enumerate(problems):
        prompt, solution = ids.problem(problem)
        row = prompt + solution
        assert len(row) <= seq_len + 1, (len(row), seq_len)
        tokens[r, :len(row)] = row
        mask[r, len(prompt) - 1:len(row) - 1] = 1.0
        mask[r, len(row) - 6] = answer_weight  # the target 'answer' (then m{N} = VV <eos>)
        if dropout_rng is not None and not problem.recall and dropout_rng.random() < context_dropout:
            q = dropout_rng.random()
            first_solution_page = -(-len(prompt) // PAGE)  # pages before it hold prompt tokens
            for page in range(first_solution_page, page_keep.shape[1]):
                page_keep[r, page] = dropout_rng.random() < q
    return tokens, mask, page_keep


def train_batch(seed: int, step: int, buckets, ids, answer_weight: float = 1.0, context_dropout: float = 0.0,
                phoenix_fraction: float = 0.0):
    """The batch of training step `step`: a pure function of (seed, step, context_dropout, phoenix_fraction). Each
    row is a decode-phoenix problem with probability `phoenix_fraction` (its own random stream, so the plain
    rows' lengths and the batch with fraction 0 are what they were without the option)."""
    from raas_jax.eval.tasks import milestones as M

    rng = random.Random(f"train-batch:{seed}:{step}")
    phoenix_rng = random.Random(f"phoenix-rows:{seed}:{step}")
    seq_len, rows, lo, hi, _ = rng.choices(buckets, weights=[b[4] for b in buckets])[0]
    problems = [M.make_problem(M.TRAIN_SEED_MIN + seed, step * 1024 + r, n_steps=rng.randint(lo, hi),
                               recall=phoenix_fraction > 0 and phoenix_rng.random() < phoenix_fraction)
                for r in range(rows)]
    dropout_rng = random.Random(f"context-dropout:{seed}:{step}") if context_dropout > 0 else None
    return make_batch(problems, seq_len, ids, answer_weight, dropout_rng, context_dropout)


def heldout_batch(buckets, ids, tiny: bool, recall: bool = False):
    """A fixed held-out batch (eval seed 1, never trained on): the longest bucket, difficulty 3 lengths
    (`recall`: problems of the decode-phoenix variant)."""
    from raas_jax.eval.tasks import milestones as M

    seq_len, rows, lo, hi, _ = buckets[-1]
    lo3, hi3 = M.DIFFICULTIES[3]
    lo, hi = (lo, hi) if tiny else (max(lo3, 1), min(hi3, hi))
    rng = random.Random("heldout")
    problems = [M.make_problem(1, i, n_steps=rng.randint(lo, hi), recall=recall) for i in range(rows)]
    return make_batch(problems, seq_len, ids)


class Prefetcher:
    """Generates training batches for steps start, start+1, ... in a background thread."""

    def __init__(self, seed: int, start: int, buckets, ids, answer_weight: float = 1.0, context_dropout: float = 0.0,
                 phoenix_fraction: float = 0.0, depth: int = 8):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()

        def work():
            step = start
            while not self.stop.is_set():
                batch = train_batch(seed, step, buckets, ids, answer_weight, context_dropout, phoenix_fraction)
                while not self.stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def next(self):
        return self.queue.get()

    def close(self):
        self.stop.set()


# ----------------------------------------------------------------------------------------- model

def context_mask(page_keep, q_positions, k_positions, recent: int):
    """[B, 1, T, S] bool: causal, and a key more than `recent` positions back is visible only if its page is kept.

    page_keep [B, S / PAGE] bool; positions [B, T] / [B, S] (training rows: 0..T-1, no padding inside)."""
    import jax.numpy as jnp

    kept = jnp.take_along_axis(page_keep, k_positions // PAGE, axis=1)  # [B, S]
    back = q_positions[:, :, None] - k_positions[:, None, :]  # [B, T, S]
    visible = (back >= 0) & ((back < recent) | kept[:, None, :])
    return visible[:, None]  # [B, 1, T, S]


class TrainingAttention:
    """The attention swapped into the model for training: jax.nn.dot_product_attention (cuDNN flash attention on
    a GPU), causal, plus the context-dropout mask of the batch being traced (`page_keep`, set by the loss)."""

    def __init__(self, kind: str, recent: int):
        self.kind, self.recent, self.page_keep = kind, recent, None

    def __call__(self, q, k, v, q_positions, k_positions, *, scale=None, return_key_mass=False):
        import jax
        import jax.numpy as jnp

        # training rows use positions 0..T-1 with no padding inside the attended prefix, so causal == position mask
        assert not return_key_mass
        impl = self.kind if q.dtype in (jnp.bfloat16, jnp.float16) or self.kind != "cudnn" else None  # cuDNN: 16-bit
        mask = None if self.page_keep is None else context_mask(self.page_keep, q_positions, k_positions, self.recent)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, implementation=impl)


def training_attention(kind: str, recent: int = 64) -> TrainingAttention | None:
    """The `TrainingAttention` that the training model uses as its prompt attention (`Transformer.attention_fn`);
    None keeps the library's reference attention (`--attention reference`, no context dropout)."""
    import jax

    if kind == "auto":
        kind = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if kind == "reference":
        return None
    return TrainingAttention(kind, recent)


def init_params(cfg, seed: int):
    import jax
    import jax.numpy as jnp

    from raas_jax.models.transformer import Transformer

    tokens = jnp.zeros((1, 8), jnp.int32)
    positions = jnp.arange(8, dtype=jnp.int32)[None]
    params = Transformer(cfg, jnp.float32).init(jax.random.PRNGKey(seed), tokens, positions)["params"]
    # GPT-2 style: residual output projections scaled by 1/sqrt(2 * layers); embeddings std 0.02
    scale = 1.0 / math.sqrt(2 * cfg.num_layers)
    layers = params["layers"]
    layers["self_attn"]["o_proj"]["kernel"] = layers["self_attn"]["o_proj"]["kernel"] * scale
    layers["mlp"]["down_proj"]["kernel"] = layers["mlp"]["down_proj"]["kernel"] * scale
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 0.02
    return params


def make_optimizer(weight_decay: float, clip: float):
    import jax
    import optax

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)

    return optax.chain(optax.clip_by_global_norm(clip), optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
                       optax.add_decayed_weights(weight_decay, mask=decay_mask))


def make_step(cfg, optimizer, compute_dtype, attention: TrainingAttention | None = None, masked: bool = False):
    import jax
    import jax.numpy as jnp
    import optax

    from raas_jax.models.transformer import Transformer

    model = Transformer(cfg, compute_dtype, attention_fn=attention)

    def loss_fn(params, tokens, mask, page_keep):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T]
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
        cparams = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        if masked:  # the model's attention reads the mask of the rows being traced
            attention.page_keep = page_keep
        try:
            logits = model.apply({"params": cparams}, inputs, positions)[0]  # [B, T, V] f32
        finally:
            if masked:
                attention.page_keep = None
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        objective = (ce * mask).sum() / jnp.maximum(mask.sum(), 1e-6)  # mask holds loss weights
        binary = (mask > 0).astype(jnp.float32)
        count = jnp.maximum(binary.sum(), 1.0)
        loss = (ce * binary).sum() / count  # reported: unweighted mean over solution tokens
        correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
        tok_acc = (correct * binary).sum() / count
        has = binary.sum(-1) > 0
        row_ok = jnp.all((correct > 0) | (binary == 0), axis=-1) & has
        row_exact = row_ok.sum() / jnp.maximum(has.sum(), 1)
        return objective, {"loss": loss, "tok_acc": tok_acc, "row_exact": row_exact, "tokens": binary.sum()}

    def step(params, opt_state, tokens, mask, page_keep, lr):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, tokens, mask, page_keep)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return params, opt_state, metrics

    def evaluate(params, tokens, mask, page_keep):
        return loss_fn(params, tokens, mask, page_keep)[1]

    return jax.jit(step, donate_argnums=(0, 1)), jax.jit(evaluate)


# ------------------------------------------------------------------------------------ state I/O

def save_state(out: Path, params, opt_state, meta: dict) -> None:
    import jax

    leaves = jax.tree.leaves((params, opt_state))
    tmp = out / "train_state.tmp.npz"
    np.savez(tmp, **{f"a{i}": np.asarray(x) for i, x in enumerate(leaves)})
    os.replace(tmp, out / "train_state.npz")
    (out / "train_state.json").write_text(json.dumps(meta, indent=2))


def load_state(out: Path, params, opt_state):
    import jax

    meta = json.loads((out / "train_state.json").read_text())
    data = np.load(out / "train_state.npz")
    leaves, treedef = jax.tree.flatten((params, opt_state))
    if len(data.files) != len(leaves):
        raise ValueError(f"{out / 'train_state.npz'} holds {len(data.files)} arrays, this model needs {len(leaves)}: "
                         "was it written with another config (--tiny)?")
    loaded = []
    for i, leaf in enumerate(leaves):
        array = data[f"a{i}"]
        if array.shape != np.shape(leaf):
            raise ValueError(f"{out / 'train_state.npz'}: array {i} has shape {array.shape}, expected {np.shape(leaf)}")
        loaded.append(jax.numpy.asarray(array, dtype=np.asarray(leaf).dtype))
    params, opt_state = jax.tree.unflatten(treedef, loaded)
    return params, opt_state, meta


def save_checkpoint(path: Path, params, hf: dict, info: dict) -> Path:
    """A raas-jax model directory (what raas_jax.load reads), bf16 params, written atomically."""
    import jax
    import ml_dtypes

    from raas_jax.model_io.checkpoint import atomic_directory, save_params
    from raas_jax.eval.tasks import milestones as M

    with atomic_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"],
             "pad_token_id": hf["pad_token_id"], "do_sample": False}, indent=2) + "\n")
        M.save_tokenizer(tmp)
        bf16 = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
        save_params(tmp / "params", bf16, max_file_bytes=MAX_FILE_BYTES)
        (tmp / "raas_jax.json").write_text(json.dumps(
            {"source": "scripts/train_reasoner.py", "dtype": "bfloat16", "format": 1}, indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def plot_log(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(log_path)))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("heldout", "o-"), ("heldout_phoenix", "^-")):
        sel = [r for r in rows if r["split"] == split]
        if sel:
            ax.plot([float(r["tokens"]) / 1e6 for r in sel], [float(r["loss"]) for r in sel], style, label=f"{split} loss",
                    markersize=3)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (M, solution tokens with loss)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax2 = ax.twinx()
    sel = [r for r in rows if r["split"] == "heldout"]
    if sel:
        ax2.plot([float(r["tokens"]) / 1e6 for r in sel], [float(r["row_exact"]) for r in sel], "s--", color="C2",
                 markersize=3, label="held-out rows all correct (teacher-forced)")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("fraction of held-out rows exact")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title("milestones reasoner training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main

LOG_FIELDS = ("split", "step", "progress", "lr", "loss", "tok_acc", "row_exact", "grad_norm", "tokens", "seconds",
              "tokens_per_s")


def main(argv=None) -> int:
    script_start = time.time()
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from raas_jax.models.config import ModelConfig
    from raas_jax.eval.tasks import milestones as M

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = M.Ids()
    vocab = -(-len(ids) // 64) * 64
    hf = hf_config(TINY if args.tiny else FULL, vocab)
    cfg = ModelConfig.from_hf_dict(hf)
    phoenix = args.phoenix_fraction > 0
    buckets = resolve_buckets(args.tiny, phoenix)
    attention = training_attention(args.attention, args.dropout_recent)
    attention_name = attention.kind if attention else "reference"
    masked = args.context_dropout > 0
    if masked and attention is None:
        raise ValueError("--context-dropout needs --attention auto, cudnn or xla (the reference attention has no mask)")
    compute_dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32

    params = init_params(cfg, args.seed)
    if args.init_from:
        from raas_jax.model_io.checkpoint import restore_params

        loaded = restore_params(Path(args.init_from), cfg, jnp.float32)
        if jax.tree.structure(loaded) != jax.tree.structure(params):
            raise ValueError(f"{args.init_from} does not hold this script's model ({cfg})")
        params = loaded
        print(f"initialised from {args.init_from}", flush=True)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    optimizer = make_optimizer(args.weight_decay, args.clip)
    opt_state = optimizer.init(params)
    meta = {"step": 0, "progress": 0.0, "tokens": 0.0, "seconds": 0.0}
    if (out / "train_state.json").is_file():
        params, opt_state, meta = load_state(out, params, opt_state)
        print(f"resuming from step {meta['step']} (progress {meta['progress']:.3f})", flush=True)
    step_fn, eval_fn = make_step(cfg, optimizer, compute_dtype, attention, masked)
    print(f"model: {n_params / 1e6:.2f}M params, {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads "
          f"{cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size}; backend {jax.default_backend()}, "
          f"compute {jnp.dtype(compute_dtype).name}, attention {attention_name}"
          f"{f', context dropout {args.context_dropout} (recent {args.dropout_recent})' if masked else ''}"
          f"{f', phoenix fraction {args.phoenix_fraction}' if phoenix else ''}; buckets {buckets}", flush=True)

    # compile every bucket shape before the clock of the schedule starts
    t = time.time()
    compiled = {}
    for seq_len, rows, *_ in buckets:
        tok = jax.ShapeDtypeStruct((rows, seq_len + 1), jnp.int32)
        msk = jax.ShapeDtypeStruct((rows, seq_len), jnp.float32)
        keep = jax.ShapeDtypeStruct((rows, -(-seq_len // PAGE)), jnp.bool_)
        compiled[tok.shape] = step_fn.lower(params, opt_state, tok, msk, keep, jnp.float32(0)).compile()
    held_tokens, held_mask, held_keep = heldout_batch(buckets, ids, args.tiny)  # every page visible
    held_phoenix = heldout_batch(buckets, ids, args.tiny, recall=True) if phoenix else None  # same shapes
    eval_compiled = eval_fn.lower(params, held_tokens, held_mask, held_keep).compile()
    print(f"compiled {len(buckets)} bucket shapes in {time.time() - t:.1f}s", flush=True)

    log_path = out / "log.csv"
    new_log = not log_path.is_file()
    log_file = open(log_path, "a", newline="")
    log = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
    if new_log:
        log.writeheader()

    step, progress0, tokens_seen, seconds0 = meta["step"], meta["progress"], meta["tokens"], meta["seconds"]
    deadline = script_start + args.minutes * 60 - args.reserve if args.minutes else None
    t0 = time.time()
    window = (deadline - t0) if deadline else None
    if window is not None and window <= 0:
        raise ValueError(f"--minutes {args.minutes} leaves no time to train after compiling")

    def progress_at(now: float, step: int) -> float:
        p = 0.0
        if args.steps:
            p = step / args.steps
        if window:
            p = max(p, progress0 + (1 - progress0) * (now - t0) / window)
        return min(p, 1.0)

    def lr_at(step: int, progress: float) -> float:
        warm = min(1.0, (step + 1) / max(args.warmup, 1))
        frac = args.final_lr_fraction
        return args.lr * warm * (frac + (1 - frac) * 0.5 * (1 + math.cos(math.pi * progress)))

    def heldout(step, progress, lr):
        rows = {}
        for split, batch in (("heldout", (held_tokens, held_mask, held_keep)), ("heldout_phoenix", held_phoenix)):
            if batch is None:
                continue
            m = jax.device_get(eval_compiled(params, *batch))
            row = {"split": split, "step": step, "progress": round(progress, 4), "lr": lr,
                   "loss": float(m["loss"]), "tok_acc": float(m["tok_acc"]), "row_exact": float(m["row_exact"]),
                   "grad_norm": "", "tokens": tokens_seen, "seconds": round(seconds0 + time.time() - t0, 1),
                   "tokens_per_s": ""}
            log.writerow(row)
            print(f"  {split.replace('_', ' ').replace('heldout', 'held-out')} (seed 1, {held_tokens.shape[0]} rows): "
                  f"loss {row['loss']:.5f} tok_acc {row['tok_acc']:.5f} rows exact {row['row_exact']:.3f}", flush=True)
            rows[split] = row
        log_file.flush()
        return rows["heldout"] | {"phoenix": rows.get("heldout_phoenix")}

    prefetch = Prefetcher(args.seed, step, buckets, ids, args.answer_weight, args.context_dropout,
                          args.phoenix_fraction)
    pending, last_log, last_save, tokens_at_log = [], time.time(), time.time(), tokens_seen
    last_heldout = None
    progress = progress_at(time.time(), step)
    lr = lr_at(step, progress)
    try:
        while progress < 1.0 and (args.steps is None or step < args.steps):
            tokens, mask, page_keep = prefetch.next()
            lr = lr_at(step, progress)
            params, opt_state, metrics = compiled[tokens.shape](params, opt_state, tokens, mask, page_keep,
                                                                 jnp.float32(lr))
            pending.append(metrics)
            step += 1
            tokens_seen += float((mask > 0).sum())
            now = time.time()
            progress = progress_at(now, step)
            if step % args.log_every == 0 or progress >= 1.0:
                ms = jax.device_get(pending)
                pending = []
                mean = {k: float(np.mean([m[k] for m in ms])) for k in ("loss", "tok_acc", "row_exact", "grad_norm")}
                rate = (tokens_seen - tokens_at_log) / max(now - last_log, 1e-9)
                tokens_at_log, last_log = tokens_seen, now
                log.writerow({"split": "train", "step": step, "progress": round(progress, 4), "lr": lr, **mean,
                              "tokens": tokens_seen, "seconds": round(seconds0 + now - t0, 1),
                              "tokens_per_s": round(rate)})
                log_file.flush()
                print(f"step {step} | {100 * progress:5.1f}% | lr {lr:.2e} | loss {mean['loss']:.5f} | tok_acc "
                      f"{mean['tok_acc']:.5f} | rows exact {mean['row_exact']:.3f} | gnorm {mean['grad_norm']:.3f} | "
                      f"{rate / 1e3:.0f}K loss-tok/s | {(now - script_start) / 60:.2f} min", flush=True)
            if step % args.eval_every == 0:
                last_heldout = heldout(step, progress, lr)
            if time.time() - last_save > args.save_every:
                save_state(out, params, opt_state, {"step": step, "progress": progress, "tokens": tokens_seen,
                                                     "seconds": seconds0 + time.time() - t0})
                last_save = time.time()
    finally:
        prefetch.close()
    final = last_heldout if last_heldout and last_heldout["step"] == step else heldout(step, progress, lr)
    seconds = seconds0 + time.time() - t0
    save_state(out, params, opt_state, {"step": step, "progress": progress, "tokens": tokens_seen, "seconds": seconds})
    log_file.close()
    plot_log(log_path, out / "loss.png")
    train_rows = [r for r in csv.DictReader(open(log_path)) if r["split"] == "train"]
    info = {"script": "scripts/train_reasoner.py", "argv": sys.argv[1:] if argv is None else list(argv),
            "seed": args.seed, "train_problem_seeds": f"{M.TRAIN_SEED_MIN + args.seed} (indices step * 1024 + row)",
            "train_seed_min": M.TRAIN_SEED_MIN, "eval_seeds": f"< {M.TRAIN_SEED_MIN} (eval: {M.EVAL_SEED}; "
            "held-out monitor during training: 1)",
            "buckets": [{"seq_len": b[0], "rows": b[1], "steps_min": b[2], "steps_max": b[3], "weight": b[4]}
                        for b in buckets],
            "params": n_params, "steps": step, "loss_tokens": tokens_seen, "train_seconds": round(seconds, 1),
            "lr": args.lr, "warmup": args.warmup, "final_lr_fraction": args.final_lr_fraction,
            "weight_decay": args.weight_decay, "clip": args.clip, "answer_weight": args.answer_weight,
            "attention": attention_name, "context_dropout": args.context_dropout,
            "phoenix_fraction": args.phoenix_fraction,
            "dropout_recent": args.dropout_recent if masked else None,
            "compute_dtype": jnp.dtype(compute_dtype).name, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind),
            "final_train_loss": float(train_rows[-1]["loss"]) if train_rows else None,
            "heldout": {k: final[k] for k in ("loss", "tok_acc", "row_exact")}}
    if final["phoenix"] is not None:
        info["heldout_phoenix"] = {k: final["phoenix"][k] for k in ("loss", "tok_acc", "row_exact")}
    try:
        info["peak_device_bytes"] = int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
    except Exception:  # CPU devices have no memory stats
        pass
    ckpt = save_checkpoint(Path(args.ckpt) if args.ckpt else out / "checkpoint", params, hf, info)
    print(f"done: step {step}, {tokens_seen / 1e6:.1f}M loss tokens in {seconds / 60:.2f} min; checkpoint {ckpt}; "
          f"total {(time.time() - script_start) / 60:.2f} min", flush=True)
    if "peak_device_bytes" in info:
        print(f"peak device memory {info['peak_device_bytes'] / 2**30:.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
