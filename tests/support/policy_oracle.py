"""An independent oracle for the KV-cache policies: plain numpy, one token at a time.

Written from docs/policies.md (the papers' rules), not from raas_jax: nothing here imports
raas_jax.policies, raas_jax.decode.cache or raas_jax.kernels. One `PagePool` per (sequence, KV head) keeps its own
slots (start, fill, keys, values, stamps / masses, pinned); the policy classes below decide what the pool
keeps. `BatchOracle` runs one pool per (sequence, KV head) of a batch.

Floating point: the oracle computes in float64 from the (float32) inputs. Where two candidates' scores are
within a relative ~1e-5 of each other (a near-tie that float32 may order either way), the oracle accepts the
other side's choice if it is given one (a `Hint`) and the choice is among the near-tied ones, adopts it (so
the two states stay the same) and records the near-tie in `StepResult.ties`. Exact ties (stamps, starts)
are never near-ties: they follow the rules.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

TIE_RTOL = 1e-5  # relative gap under which two float scores are a near-tie
MASS_ATOL = 1e-30  # probabilities below this may underflow in float32
MAX_ALTERNATIVES = 64  # Quest: most alternative selections enumerated for a near-tie


def near(a: float, b: float, atol: float = 0.0) -> bool:
    return abs(a - b) <= TIE_RTOL * max(abs(a), abs(b)) + atol


@dataclasses.dataclass
class Hint:
    """The other side's choices at this step, used only to settle near-ties."""

    evicted_start: int | None = None  # start of the page it evicted (None: nothing evicted)
    refreshed_starts: set[int] | None = None  # RaaS: starts of the pages it stamped with t (written page aside)


@dataclasses.dataclass
class StepResult:
    slot: int  # slot that received the token
    opened: bool  # a new page was opened in `slot`
    victim: int | None  # slot whose page was evicted (== slot) or None
    evicted_start: int | None  # start of the evicted page
    refreshed: set[int]  # RaaS: slots whose stamp was set to t at this step (the written page included)
    resident: set[int]  # starts of the resident pages after the step
    out: np.ndarray  # [G, D] attention output of the group's query heads
    alt_outs: list[np.ndarray]  # Quest: outputs of the other selections a near-tie allows
    selected: list[int] | None  # Quest: slots attended
    ties: list[str]  # near-ties settled by the hint


# ----------------------------------------------------------------------------------------- pool

class PagePool:
    """S slots of up to P tokens for one (sequence, KV head)."""

    def __init__(self, num_slots: int, page_size: int, head_dim: int):
        self.S, self.P, self.D = num_slots, page_size, head_dim
        self.start = np.zeros(num_slots, np.int64)
        self.fill = np.zeros(num_slots, np.int64)
        self.k = np.zeros((num_slots, page_size, head_dim))
        self.v = np.zeros((num_slots, page_size, head_dim))
        self.pinned = np.zeros(num_slots, bool)
        self.stamp = np.zeros(num_slots, np.int64)
        self.mass = np.zeros(num_slots)
        self.cur = 0

    def resident(self) -> np.ndarray:
        return np.flatnonzero(self.fill > 0)

    def starts(self) -> set[int]:
        return {int(self.start[s]) for s in self.resident()}

    def slot_of_start(self) -> dict[int, int]:
        return {int(self.start[s]): int(s) for s in self.resident()}

    def full_unpinned_not_cur(self) -> list[int]:
        return [int(s) for s in self.resident() if self.fill[s] == self.P and not self.pinned[s] and s != self.cur]

    def permute(self, order: np.ndarray) -> None:
        """Slot i gets what slot order[i] held (relabelling only: slot order means nothing to attention)."""
        for name in ("start", "fill", "k", "v", "pinned", "stamp", "mass"):
            setattr(self, name, getattr(self, name)[order].copy())
        self.cur = int(np.flatnonzero(order == self.cur)[0])

    def bounds(self, q: np.ndarray) -> np.ndarray:
        """Quest bound U = sum_d max(q_d kmax_d, q_d kmin_d), max over the group: q [G, D] -> [S], -inf if empty."""
        valid = (np.arange(self.P)[None, :] < self.fill[:, None])[..., None]  # [S, P, 1]
        kmin = np.where(valid, self.k, np.inf).min(axis=1)  # [S, D] (inf on empty slots)
        kmax = np.where(valid, self.k, -np.inf).max(axis=1)
        resident = self.fill > 0
        kmin, kmax = np.where(resident[:, None], kmin, 0.0), np.where(resident[:, None], kmax, 0.0)
        u = np.maximum(q[:, None] * kmax[None], q[:, None] * kmin[None]).sum(-1).max(0)  # [S]
        return np.where(resident, u, -np.inf)

    def attend(self, q: np.ndarray, slots=None) -> tuple[np.ndarray, np.ndarray]:
        """Softmax attention of q [G, D] over the tokens of `slots` (default: all resident).

        Returns out [G, D] and the per-slot mass [S] (probability summed over the page, max over the group)."""
        attended = self.fill > 0
        if slots is not None:
            attended = np.zeros(self.S, bool)
            attended[list(slots)] = True
        token = (np.arange(self.P)[None, :] < self.fill[:, None]) & attended[:, None]  # [S, P]
        logits = np.einsum("gd,spd->gsp", q, self.k) / math.sqrt(self.D)  # [G, S, P]
        logits = np.where(token[None], logits, -np.inf)
        p = np.exp(logits - logits.max(axis=(1, 2), keepdims=True))
        p /= p.sum(axis=(1, 2), keepdims=True)
        out = np.einsum("gsp,spd->gd", p, self.v)
        return out, p.sum(axis=2).max(axis=0)


# ------------------------------------------------------------------------------------- policies

class Oracle:
    """Shared pool mechanics: prefill, append (lowest free slot, else the policy's victim), attend, update."""

    pin_prefill = False

    def __init__(self, num_slots: int, page_size: int, head_dim: int):
        self.pool = PagePool(num_slots, page_size, head_dim)

    # prefill ---------------------------------------------------------------------------------
    def check_prompt(self, num_pages: int) -> None:
        """Raise ValueError if the policy refuses a prompt of `num_pages` pages."""

    def kept_prompt_pages(self, num_pages: int, page_mass: np.ndarray | None) -> list[int]:
        """Indices of the prompt pages kept after prefill (default: all; the pool must hold them)."""
        return list(range(num_pages))

    def prefill(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """q [L, G, D], k/v [L, D]: the prompt at positions 0..L-1."""
        pool = self.pool
        length, P = len(k), pool.P
        num_pages = -(-length // P)
        self.check_prompt(num_pages)
        page_mass = self.prompt_page_mass(q, k) if self.needs_prompt_mass else None
        kept = sorted(self.kept_prompt_pages(num_pages, page_mass))
        assert len(kept) <= pool.S and num_pages - 1 in kept
        for slot, j in enumerate(kept):  # the kept pages in order of position, from slot 0
            n = min(P, length - j * P)
            pool.start[slot], pool.fill[slot] = j * P, n
            pool.k[slot, :n], pool.v[slot, :n] = k[j * P:j * P + n], v[j * P:j * P + n]
            pool.pinned[slot] = self.pin_prefill
            pool.stamp[slot] = length - 1
            pool.mass[slot] = page_mass[j] if page_mass is not None else 0.0
        pool.cur = len(kept) - 1

    needs_prompt_mass = False

    def prompt_page_mass(self, q: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Per prompt page: for each key its probability summed over the prompt queries, max over the group,
        summed over the page's tokens (dense causal attention)."""
        length, group, d = q.shape
        logits = np.einsum("tgd,sd->gts", q, k) / math.sqrt(d)  # [G, T, T]
        logits = np.where(np.tril(np.ones((length, length), bool))[None], logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=-1, keepdims=True)
        key_mass = p.sum(axis=1).max(axis=0)  # [T]
        P = self.pool.P
        num_pages = -(-length // P)
        return np.array([key_mass[j * P:(j + 1) * P].sum() for j in range(num_pages)])

    # decode ----------------------------------------------------------------------------------
    def victim(self, hint: Hint | None, ties: list[str]) -> int:
        raise AssertionError(f"{type(self).__name__} never evicts, but its pool of {self.pool.S} slots is full")

    def on_write(self, slot: int, t: int, opened: bool) -> None:
        """Statistics of the page that received the token at position t."""

    def attend(self, q: np.ndarray, ties: list[str]):
        out, mass = self.pool.attend(q)
        return out, mass, [], None

    def update(self, q, mass, t: int, slot: int, hint: Hint | None, ties: list[str]) -> set[int]:
        return set()

    def step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, t: int, hint: Hint | None = None) -> StepResult:
        """One decode step at position t: q [G, D], k/v [D]."""
        pool, ties = self.pool, []
        victim = evicted_start = None
        if pool.fill[pool.cur] < pool.P:
            slot, opened = pool.cur, False
        else:
            opened = True
            free = np.flatnonzero(pool.fill == 0)
            if free.size:
                slot = int(free[0])
            else:  # chosen from the state before this step
                slot = victim = self.victim(hint, ties)
                assert victim != pool.cur and pool.fill[victim] == pool.P and not pool.pinned[victim]
                evicted_start = int(pool.start[victim])
        if opened:
            pool.start[slot], pool.fill[slot], pool.pinned[slot] = t, 0, False
            pool.k[slot], pool.v[slot] = 0.0, 0.0
            pool.mass[slot], pool.stamp[slot] = 0.0, t
        pool.k[slot, pool.fill[slot]], pool.v[slot, pool.fill[slot]] = k, v
        pool.fill[slot] += 1
        pool.cur = slot
        self.on_write(slot, t, opened)
        out, mass, alt_outs, selected = self.attend(q, ties)
        refreshed = self.update(q, mass, t, slot, hint, ties)
        return StepResult(slot=int(slot), opened=opened, victim=victim, evicted_start=evicted_start,
                          refreshed=refreshed, resident=pool.starts(), out=out, alt_outs=alt_outs,
                          selected=selected, ties=ties)


class DenseOracle(Oracle):
    """Keep and attend everything."""


class RaaSOracle(Oracle):
    """Pinned prompt; novice protection; refresh the important evictable pages; evict the oldest stamp."""

    pin_prefill = True

    def __init__(self, num_slots, page_size, head_dim, refresh="top_half", score="exact"):
        super().__init__(num_slots, page_size, head_dim)
        self.refresh, self.score = refresh, score

    def check_prompt(self, num_pages):
        if num_pages + 2 > self.pool.S:
            raise ValueError(f"RaaS: a prompt of {num_pages} pages does not fit {self.pool.S} slots")

    def victim(self, hint, ties):
        pool = self.pool
        candidates = pool.full_unpinned_not_cur()
        return min(candidates, key=lambda s: (pool.stamp[s], pool.start[s]))  # oldest stamp, then oldest page

    def on_write(self, slot, t, opened):
        self.pool.stamp[slot] = t  # novice protection, new page or page being filled

    def update(self, q, mass, t, slot, hint, ties):
        pool = self.pool
        resident = pool.resident()
        candidates = [int(s) for s in resident if pool.fill[s] == pool.P and not pool.pinned[s] and s != slot]
        if self.score == "exact":
            scores, atol = mass, MASS_ATOL
        else:
            scores = pool.bounds(q)
            atol = TIE_RTOL * float(np.max(np.abs(scores[resident])))  # float32 sums of products: scale-relative
        wanted = None
        if hint is not None and hint.refreshed_starts is not None:
            by_start = pool.slot_of_start()
            wanted = {by_start.get(s, -1) for s in hint.refreshed_starts}
        if self.refresh == "top_half":
            keep = -(-len(candidates) // 2)
            ranked = sorted(candidates, key=lambda s: (-scores[s], s))
            chosen = set(ranked[:keep])
            if wanted is not None and wanted != chosen and len(wanted) == keep and wanted <= set(candidates):
                # acceptable iff no page left out scores clearly above a page taken
                if all(not (scores[y] > scores[x] and not near(scores[x], scores[y], atol))
                       for x in wanted for y in candidates if y not in wanted):
                    ties.append(f"top_half boundary {sorted(chosen ^ wanted)}")
                    chosen = wanted
        else:
            alpha = float(self.refresh)
            if self.score == "exact":
                normalised = mass
            else:
                z = np.where(pool.fill > 0, scores / math.sqrt(pool.D), -np.inf)
                z = np.exp(z - z[resident].max())
                normalised = z / z.sum()
            chosen = {s for s in candidates if normalised[s] > alpha}
            if wanted is not None and wanted != chosen and wanted <= set(candidates):
                if all(near(normalised[s], alpha, MASS_ATOL) for s in chosen ^ wanted):
                    ties.append(f"alpha threshold {sorted(chosen ^ wanted)}")
                    chosen = wanted
        for s in chosen:
            pool.stamp[s] = t
        return chosen | {slot}


class StreamingLLMOracle(Oracle):
    """Sink pages (holding any of the first `sink_tokens` positions) plus the newest pages."""

    def __init__(self, num_slots, page_size, head_dim, sink_tokens=4):
        super().__init__(num_slots, page_size, head_dim)
        self.sink_tokens = sink_tokens

    def sink_pages(self) -> int:
        return -(-self.sink_tokens // self.pool.P)

    def kept_prompt_pages(self, num_pages, page_mass):
        if num_pages <= self.pool.S:
            return list(range(num_pages))
        sinks = list(range(self.sink_pages()))
        return sinks + list(range(num_pages - (self.pool.S - len(sinks)), num_pages))

    def victim(self, hint, ties):
        pool = self.pool
        candidates = [s for s in pool.full_unpinned_not_cur() if pool.start[s] >= self.sink_tokens]
        return min(candidates, key=lambda s: pool.start[s])


class H2OOracle(Oracle):
    """Accumulated attention mass per page; a recent window of R pages; evict the lightest outside it."""

    needs_prompt_mass = True

    def __init__(self, num_slots, page_size, head_dim, recent_fraction=0.5):
        super().__init__(num_slots, page_size, head_dim)
        self.R = math.ceil(recent_fraction * num_slots)

    def kept_prompt_pages(self, num_pages, page_mass):
        S = self.pool.S
        if num_pages <= S:
            return list(range(num_pages))
        recent = list(range(num_pages - self.R, num_pages))
        rest = sorted(range(num_pages - self.R), key=lambda j: (-page_mass[j], j))  # most mass; ties: older
        return recent + rest[:S - self.R]

    def victim(self, hint, ties):
        pool = self.pool
        newest = sorted(pool.resident(), key=lambda s: -pool.start[s])[:max(self.R - 1, 0)]  # the new page completes R
        candidates = [s for s in pool.full_unpinned_not_cur() if s not in newest]
        choice = min(candidates, key=lambda s: (pool.mass[s], pool.start[s]))
        if hint is not None and hint.evicted_start is not None:
            other = pool.slot_of_start().get(hint.evicted_start)
            if other is not None and other != choice and other in candidates and \
                    near(pool.mass[other], pool.mass[choice], MASS_ATOL):
                ties.append(f"lightest page: start {pool.start[choice]} vs {pool.start[other]}")
                return other
        return choice

    def update(self, q, mass, t, slot, hint, ties):
        self.pool.mass += mass  # the new page started from 0 in step()
        return set()


class QuestOracle(Oracle):
    """Keep everything; attend the top K = max(3, budget // P) pages by the Quest bound, the current page always."""

    def __init__(self, num_slots, page_size, head_dim, budget, dense_layers=2, layer=0):
        super().__init__(num_slots, page_size, head_dim)
        self.K = max(3, budget // page_size)
        self.dense = layer < dense_layers

    def attend(self, q, ties):
        pool = self.pool
        resident = [int(s) for s in pool.resident()]
        if self.dense or len(resident) <= self.K:
            out, mass = pool.attend(q)
            return out, mass, [], resident
        u = pool.bounds(q)
        atol = TIE_RTOL * float(np.max(np.abs(u[resident])))
        others = sorted((s for s in resident if s != pool.cur), key=lambda s: (-u[s], s))  # ties: lower slot
        m = self.K - 1
        selected = [pool.cur] + others[:m]
        out, mass = pool.attend(q, selected)
        alt_outs = []
        boundary_in, boundary_out = u[others[m - 1]], u[others[m]]
        if near(boundary_in, boundary_out, atol):  # near-tie at the edge of the selection: list the alternatives
            band = [s for s in others if near(u[s], boundary_in, atol) or near(u[s], boundary_out, atol)]
            sure = [s for s in others[:m] if s not in band]
            for combo in itertools.islice(itertools.combinations(band, m - len(sure)), MAX_ALTERNATIVES):
                alt = [pool.cur] + sure + list(combo)
                if set(alt) != set(selected):
                    alt_outs.append(pool.attend(q, alt)[0])
        return out, mass, alt_outs, sorted(selected)


# ------------------------------------------------------------------------------------- batches

class BatchOracle:
    """One oracle per (sequence, KV head); query head j belongs to KV head j // G."""

    def __init__(self, make, batch: int, num_kv_heads: int):
        self.B, self.H = batch, num_kv_heads
        self.cells = [[make() for _ in range(num_kv_heads)] for _ in range(batch)]

    def prefill(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths) -> None:
        """q [B, T, Hq, D], k/v [B, T, Hkv, D]; sequence b's prompt is its first lengths[b] tokens."""
        q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
        G = q.shape[2] // self.H
        for b in range(self.B):
            n = lengths[b]
            for h in range(self.H):
                self.cells[b][h].prefill(q[b, :n, h * G:(h + 1) * G], k[b, :n, h], v[b, :n, h])

    def step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions, hints=None) -> list[list[StepResult]]:
        """q [B, Hq, D], k/v [B, Hkv, D], positions [B]; hints[b][h] (optional) settles near-ties."""
        q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
        G = q.shape[1] // self.H
        return [[self.cells[b][h].step(q[b, h * G:(h + 1) * G], k[b, h], v[b, h], int(positions[b]),
                                       None if hints is None else hints[b][h])
                 for h in range(self.H)] for b in range(self.B)]
