"""The paper's observation as a picture: per-page attention mass over decode steps, with RaaS's choices on top.

A generation is replayed token by token (teacher forcing) under a policy wrapped by `MassTrace`, which records
the attention mass each resident page receives at every step (the same mass the kernels return: the softmax
probability of the page's tokens summed, max over the query heads of a KV group). Under Dense this is the
full attention; under RaaS the replay also yields which pages were evicted and which were refreshed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from raas_jax.kernels import dispatch as kernels
from raas_jax.models.transformer import Transformer
from raas_jax.policies import Policy


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TracedState:
    """`MassTrace`'s `PagePool.policy_state`: the traced policy's own state, wrapped, and the recorded mass."""

    policy_state: Any  # the traced policy's (H2O: HeavyHitterMass), None for the others
    mass: jax.Array  # [L, B, Hkv, S] float32 the mass each slot received at the last decode step


@dataclasses.dataclass(frozen=True)
class MassTrace:
    """Any policy, recording the mass each slot received at the last decode step (`TracedState.mass`). The
    traced policy sees the pool with its own state in place, as without the trace."""

    policy: Policy

    def __getattr__(self, name: str) -> Any:  # page_size, num_slots, check_prompts, ...
        if name == "policy" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.policy, name)

    @staticmethod
    def _untraced(cache):
        """The pool as the traced policy keeps it (its own state in place)."""
        return cache.replace(policy_state=cache.policy_state.policy_state)

    @staticmethod
    def _traced(cache, mass=None):
        """The traced policy's pool back under the trace, with `mass` [L, B, Hkv, S] (None: zeros, none yet)."""
        mass = jnp.zeros(cache.fill.shape, jnp.float32) if mass is None else mass
        return cache.replace(policy_state=TracedState(cache.policy_state, mass))

    def init(self, cfg, batch, num_slots, dtype):
        return self._traced(self.policy.init(cfg, batch, num_slots, dtype))

    def prefill(self, cache, layer, q, k, v, positions):
        mass = cache.policy_state.mass
        return self._traced(self.policy.prefill(self._untraced(cache), layer, q, k, v, positions), mass)

    def begin_chunked_prefill(self, cfg, cache):
        return self._traced(self.policy.begin_chunked_prefill(cfg, self._untraced(cache)), cache.policy_state.mass)

    def prefill_chunk(self, cache, layer, q, k, v, positions):
        mass = cache.policy_state.mass
        out, cache = self.policy.prefill_chunk(self._untraced(cache), layer, q, k, v, positions)
        return out, self._traced(cache, mass)

    def end_chunked_prefill(self, cache):
        return self._traced(self.policy.end_chunked_prefill(self._untraced(cache)))  # may shrink the pool: new zeros

    def decode(self, cache, layer, q, k, v, positions):
        mass = cache.policy_state.mass
        out, cache = self.policy.decode(self._untraced(cache), layer, q, k, v, positions)
        _, step_mass = kernels.decode_attention(q, cache.k, cache.v, cache.fill[layer], layer=layer,
                                                backend="reference")  # [B, Hkv, S] over every resident page
        return out, self._traced(cache, mass.at[layer].set(step_mass))


@dataclasses.dataclass
class Trace:
    """Per decode step (host arrays, one sequence): `mass`, `start`, `fill`, `stamp` [steps, L, Hkv, S]."""

    mass: np.ndarray
    start: np.ndarray
    fill: np.ndarray
    stamp: np.ndarray
    prompt_length: int
    page_size: int

    def page_mass(self, layer: int) -> np.ndarray:
        """Mass per (step, KV head, page index = position // P): [steps, Hkv, pages], NaN where not resident."""
        steps, _, hkv, _ = self.mass.shape
        pages = (self.prompt_length + steps) // self.page_size + 1
        grid = np.full((steps, hkv, pages), np.nan, np.float32)
        for t in range(steps):
            for h in range(hkv):
                resident = self.fill[t, layer, h] > 0
                grid[t, h, self.start[t, layer, h][resident] // self.page_size] = self.mass[t, layer, h][resident]
        return grid

    def events(self, layer: int, head: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(evicted, refreshed): (step, page index) pairs of one KV head. Refreshed = stamp set to the step's
        position on a page other than the one written at that step."""
        evicted, refreshed = [], []
        for t in range(self.mass.shape[0]):
            pos = self.prompt_length + t
            fill, start, stamp = self.fill[t, layer, head], self.start[t, layer, head], self.stamp[t, layer, head]
            resident = {int(s) // self.page_size for s in start[fill > 0]}
            if t:
                before = self.start[t - 1, layer, head][self.fill[t - 1, layer, head] > 0]
                evicted += [(t, int(s) // self.page_size) for s in before if int(s) // self.page_size not in resident]
            written = pos // self.page_size
            refreshed += [(t, int(s) // self.page_size) for s in start[(fill > 0) & (stamp == pos)]
                          if int(s) // self.page_size != written]
        return evicted, refreshed


def trace(model, prompt: Sequence[int], continuation: Sequence[int], policy: Policy, progress: bool = True) -> Trace:
    """Replay `continuation` after `prompt` under `policy` (batch 1), recording every decode step."""
    policy = model.with_kv_scales(policy)  # the model's calibrated FP8 scales, as its generation uses them
    policy.check_prompts([len(prompt)])
    traced = MassTrace(policy)
    module = Transformer(model.cfg, model.dtype, traced)
    steps = len(continuation)
    num_slots = policy.num_slots(len(prompt), steps + 1)
    cache = traced.init(model.cfg, 1, num_slots, model.dtype)
    tokens = jnp.asarray([list(prompt)], jnp.int32)
    positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
    _, cache = jax.jit(module.apply)({"params": model.params}, tokens, positions, cache)

    @jax.jit
    def step(params, cache, token, pos):
        _, cache = module.apply({"params": params}, token[None, None], pos[None, None], cache, decode=True,
                                logits_index=jnp.zeros((1,), jnp.int32))
        return cache

    rows = []  # per step: mass, start, fill, stamp [L, Hkv, S] of the one sequence
    for t in tqdm(range(steps), desc=f"trace {policy.name}", unit="tok", disable=not progress):
        cache = step(model.params, cache, jnp.int32(continuation[t]), jnp.int32(len(prompt) + t))
        rows.append([np.asarray(x[:, 0]) for x in (cache.policy_state.mass, cache.start, cache.fill, cache.stamp)])
    mass, start, fill, stamp = (np.stack(column) for column in zip(*rows))  # [steps, L, Hkv, S] each
    return Trace(mass, start, fill, stamp, len(prompt), policy.page_size)


def plot(dense: Trace, raas: Trace | None, layer: int, head: int, path: Path, title: str) -> Path:
    """Two heatmaps (pages x decode steps): one KV head of `layer`, and the max over its KV heads; RaaS's
    evictions (x) and refreshes (dots) of that head on the first."""
    from matplotlib.colors import LogNorm

    from raas_jax.plots import _pyplot

    plt = _pyplot()
    grid = dense.page_mass(layer)  # [steps, Hkv, pages]
    panels = ((grid[:, head], f"layer {layer}, KV head {head}"),
              (np.fmax.reduce(grid, axis=1), f"layer {layer}, max over KV heads"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    prompt_pages = -(-dense.prompt_length // dense.page_size)
    for ax, (values, label) in zip(axes, panels):
        image = ax.imshow(np.nan_to_num(values.T, nan=1e-6), aspect="auto", origin="lower", cmap="magma",
                          norm=LogNorm(vmin=1e-4, vmax=1.0), interpolation="nearest")
        ax.axhline(prompt_pages - 0.5, color="cyan", linewidth=0.8, linestyle="--")
        ax.set_xlabel("decode step")
        ax.set_title(label, fontsize=9)
    axes[0].set_ylabel(f"page (position // {dense.page_size}); prompt below the dashed line")
    if raas is not None:
        evicted, refreshed = raas.events(layer, head)
        if refreshed:
            axes[0].scatter(*zip(*refreshed), s=0.3, c="deepskyblue", alpha=0.35, label="RaaS refresh", linewidths=0)
        if evicted:
            axes[0].scatter(*zip(*evicted), s=14, c="lime", marker="x", label="RaaS eviction", linewidths=0.8)
        axes[0].legend(loc="upper left", fontsize=7, markerscale=2)
    fig.colorbar(image, ax=axes, label="attention mass of the page (dense)", shrink=0.85)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def regretted_evictions(dense: Trace, raas: Trace, threshold: float = 0.05) -> dict[str, Any]:
    """RaaS evictions (every layer and KV head) of pages that dense attends with mass > `threshold` later on."""
    steps, layers, hkv, _ = dense.mass.shape
    total, regretted, examples = 0, 0, []
    for layer in range(layers):
        grid = dense.page_mass(layer)  # [steps, Hkv, pages]
        for head in range(hkv):
            for t, page in raas.events(layer, head)[0]:
                total += 1
                later = np.nan_to_num(grid[t:, head, page], nan=0.0)
                if later.size and later.max() > threshold:
                    regretted += 1
                    if len(examples) < 10:
                        examples.append({"layer": layer, "head": head, "step": t, "page": page,
                                         "later_mass": float(later.max()), "at_step": t + int(later.argmax())})
    return {"evictions": total, "regretted": regretted, "threshold": threshold, "examples": examples}


def lost_mass(dense: Trace, other: Trace) -> float:
    """Mean share of dense attention mass (per step, layer and KV head) that falls on pages `other` has evicted
    by that step: how much of what dense reads a fixed-budget policy no longer holds. Both traces must use the
    same page size."""
    if dense.page_size != other.page_size:
        raise ValueError(f"lost_mass compares pages of one size: dense has {dense.page_size}, the policy "
                         f"{other.page_size}")
    steps, layers, hkv, _ = dense.mass.shape
    lost = np.zeros((steps, layers, hkv))
    for t in range(steps):
        for layer in range(layers):
            for head in range(hkv):
                kept = set(other.start[t, layer, head][other.fill[t, layer, head] > 0].tolist())
                resident = dense.fill[t, layer, head] > 0
                starts, mass = dense.start[t, layer, head][resident], dense.mass[t, layer, head][resident]
                lost[t, layer, head] = mass[[s not in kept for s in starts.tolist()]].sum() / max(mass.sum(), 1e-30)
    return float(lost.mean())
