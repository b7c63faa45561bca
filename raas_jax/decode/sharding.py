"""Multi-device decode with JAX's SPMD machinery: a (data, model) mesh, parameter and cache shardings.

* Parameters: attention heads and the MLP hidden dimension split over `model` (Megatron-style: q/k/v and
  gate/up by output columns, o/down by input rows; the fused qkv kernel by KV head, so each device keeps its
  query heads with their KV head); embeddings and the LM head split over the vocabulary
  when it divides, else replicated; norms replicated.
* Cache `[L, B, Hkv, S, ...]`: batch over `data`, KV heads over `model`.
* The cache policies run per shard under `shard_map`: every decision is per (sequence, KV head), so a shard
  evicts and attends on its own, with no communication.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from raas_jax.decode.cache import PagePool
from raas_jax.models.config import ModelConfig

if TYPE_CHECKING:
    from raas_jax.policies import Policy

AXES = ("data", "model")


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when a multi-host launcher set its variables (JAX's own, SLURM,
    Open MPI, TPU pods); JAX reads the coordinator, process count and id from them."""
    keys = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
    if not any(os.environ.get(k) for k in keys):
        return False
    try:
        jax.distributed.initialize()
    except RuntimeError as e:  # already initialised by the caller
        if "already" not in str(e).lower():
            raise
    return True


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,model=4" -> {"data": 2, "model": 4}."""
    shape: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if name not in AXES or not size.isdigit() or int(size) < 1:
            raise ValueError(f"bad --mesh entry {part!r}: use e.g. --mesh data=2,model=4 (axes: data, model)")
        shape[name] = int(size)
    return shape


def make_mesh(cfg: ModelConfig, shape: dict[str, int] | str | None = None, devices: list | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all). Default shape: as many devices on `model` as
    divide the KV-head count, the rest on `data`."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if isinstance(shape, str):
        shape = parse_mesh(shape)
    shape = dict(shape or {})
    if not shape:
        model = max(m for m in range(1, n + 1) if n % m == 0 and cfg.num_kv_heads % m == 0)
        shape = {"data": n // model, "model": model}
    given = ",".join(f"{k}={v}" for k, v in shape.items())
    if shape.get("model", 1) > n or shape.get("data", 1) > n or ("data" not in shape and n % shape["model"]):
        raise ValueError(f"--mesh {given} does not fit the {n} devices available: the axes' sizes must multiply to "
                         f"{n} (e.g. --mesh data={n // _largest_divisor(cfg, n)},model={_largest_divisor(cfg, n)})")
    shape.setdefault("model", 1)
    shape.setdefault("data", n // shape["model"])
    data, model = shape["data"], shape["model"]
    if data * model != n:
        raise ValueError(f"--mesh {given} uses {data * model} devices but {n} are available (data={data} x "
                         f"model={model}); the product must be {n}")
    for what, count in (("KV heads", cfg.num_kv_heads), ("query heads", cfg.num_heads)):
        if count % model:
            raise ValueError(f"mesh model={model} does not divide the model's {count} {what}; use a model axis "
                             f"that divides {cfg.num_kv_heads} (e.g. --mesh data={n // _largest_divisor(cfg, n)},"
                             f"model={_largest_divisor(cfg, n)})")
    return Mesh(np.asarray(devices).reshape(data, model), AXES)


def _largest_divisor(cfg: ModelConfig, n: int) -> int:
    return max(m for m in range(1, n + 1) if n % m == 0 and cfg.num_kv_heads % m == 0)


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], model: int) -> P:
    """PartitionSpec of one parameter from its path in the tree (layers have a leading layer axis)."""
    name = "/".join(path)

    def split(axis: int) -> P:
        if shape[axis] % model:
            return P()
        spec = [None] * len(shape)
        spec[axis] = "model"
        return P(*spec)

    if name.endswith("embed_tokens/embedding"):
        return split(0)  # [V, H]
    if name.endswith("lm_head/kernel"):
        return split(1)  # [H, V]
    if "/qkv_proj/" in f"/{name}":  # fused: kernel [L, H, Hkv, G + 2, D] / bias [L, Hkv, G + 2, D]: KV heads
        return split(len(shape) - 3)
    if any(f"/{m}/" in f"/{name}" for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "gate_up_proj")):
        return split(len(shape) - 1)  # kernel [L, H, out] / bias [L, out]: output columns
    if any(f"/{m}/kernel" in f"/{name}" for m in ("o_proj", "down_proj")):
        return split(1)  # [L, in, H]: input rows
    return P()  # norms, o/down biases


def param_shardings(params: Any, mesh: Mesh) -> Any:
    model = mesh.shape["model"]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(tuple(k.key for k in path), tuple(x.shape), model)), params)


def cache_spec(ndim: int) -> P:
    """[L, B, Hkv, ...] -> batch over data, KV heads over model; per-layer values ([L]: FP8 scales) replicated."""
    return P(None, "data", "model", *([None] * (ndim - 3))) if ndim >= 3 else P()


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda x: NamedSharding(mesh, cache_spec(x.ndim)), cache)


@dataclasses.dataclass(frozen=True)
class ShardedPolicy:
    """A policy run per shard of a (data, model) mesh: prefill and decode under `shard_map`; its configuration
    (page size, budget, sizing, prompt checks, the chunked-prefill hooks) is the wrapped policy's, forwarded
    explicitly below."""

    policy: Policy
    mesh: Mesh

    # ------------------------------------------------------------------ the wrapped policy's configuration
    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def page_size(self) -> int:
        return self.policy.page_size

    @property
    def budget(self) -> int | None:
        return getattr(self.policy, "budget", None)

    @property
    def kv_dtype(self) -> str:
        return self.policy.kv_dtype

    @property
    def kv_absmax(self) -> Any:
        return self.policy.kv_absmax

    @property
    def backend(self) -> str:
        return self.policy.backend

    @property
    def fixed_budget(self) -> bool:
        return self.policy.fixed_budget

    def num_slots(self, longest_prompt: int, max_new_tokens: int) -> int:
        return self.policy.num_slots(longest_prompt, max_new_tokens)

    def check_prompts(self, lengths: list[int]) -> None:
        self.policy.check_prompts(lengths)

    def prefill_slots(self, longest_prompt: int, num_slots: int) -> int:
        return self.policy.prefill_slots(longest_prompt, num_slots)

    def begin_chunked_prefill(self, cfg: ModelConfig, cache: PagePool) -> PagePool:
        return self.policy.begin_chunked_prefill(cfg, cache)

    def end_chunked_prefill(self, cache: PagePool) -> PagePool:
        return self.policy.end_chunked_prefill(cache)

    # --------------------------------------------------------------------------------- per shard

    def init(self, cfg: ModelConfig, batch: int, num_slots: int, dtype: Any) -> PagePool:
        cache = self.policy.init(cfg, batch, num_slots, dtype)
        return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, self.mesh))

    def _cache_specs(self, cache: PagePool) -> PagePool:
        return jax.tree.map(lambda x: cache_spec(x.ndim), cache)

    def prefill(self, cache, layer, q, k, v, positions):
        heads = P("data", None, "model", None)  # [B, T, H, D]
        run = jax.shard_map(self.policy.prefill, mesh=self.mesh,
                            in_specs=(self._cache_specs(cache), P(), heads, heads, heads, P("data", None)),
                            out_specs=self._cache_specs(cache), check_vma=False)
        return run(cache, layer, q, k, v, positions)

    def prefill_chunk(self, cache, layer, q, k, v, positions):
        heads = P("data", None, "model", None)  # [B, C, H, D]
        run = jax.shard_map(self.policy.prefill_chunk, mesh=self.mesh,
                            in_specs=(self._cache_specs(cache), P(), heads, heads, heads, P("data", None)),
                            out_specs=(heads, self._cache_specs(cache)), check_vma=False)
        return run(cache, layer, q, k, v, positions)

    def decode(self, cache, layer, q, k, v, positions):
        heads = P("data", "model", None)  # [B, H, D]
        run = jax.shard_map(self.policy.decode, mesh=self.mesh,
                            in_specs=(self._cache_specs(cache), P(), heads, heads, heads, P("data")),
                            out_specs=(heads, self._cache_specs(cache)), check_vma=False)
        return run(cache, layer, q, k, v, positions)
