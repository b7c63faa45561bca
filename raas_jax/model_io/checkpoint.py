"""Checkpoint I/O: HF safetensors and GGUF in, orbax out, one tensor at a time.

A converted model directory holds:
    config.json               the HF config (what `ModelConfig.from_json` reads)
    generation_config.json    EOS ids and sampling defaults, when the source has them
    tokenizer files           tokenizer.json, tokenizer_config.json, ...
    params/                   the parameter tree as an orbax checkpoint
    raas_jax.json             what produced it (source, dtype, version)
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from raas_jax import signals
from raas_jax.models.config import ModelConfig
from raas_jax.models.transformer import Transformer

DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f32": jnp.float32, "float32": jnp.float32,
          "fp32": jnp.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or inconsistent with its config."""


def resolve_dtype(dtype: Any) -> Any:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, f32")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


# ----------------------------------------------------------------------------------- safetensors

def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) from one .safetensors file, one tensor at a time (the `safetensors` package, numpy
    arrays; bf16 arrives as ml_dtypes.bfloat16). A missing, truncated or garbled file is a CheckpointError
    naming the shard."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint shard {path}")
    try:
        handle = safe_open(str(path), framework="numpy")
    except SafetensorError as e:
        raise CheckpointError(f"corrupt checkpoint shard {path} ({path.stat().st_size} bytes; truncated "
                              f"download?): {e}") from None
    with handle as f:
        for name in f.keys():
            try:
                array = f.get_tensor(name)
            except (SafetensorError, TypeError, ValueError) as e:
                raise CheckpointError(f"corrupt checkpoint shard {path}: cannot read tensor {name}: {e}") from None
            yield name, array


def hf_shards(src: Path) -> list[Path]:
    """The safetensors shards of an HF directory, in index order."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"corrupt shard index {index}") from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (src / shard).is_file():
                raise CheckpointError(f"missing checkpoint shard {src / shard} (listed in {index.name})")
        return [src / s for s in shards]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    if list(src.glob("*.bin")):
        raise CheckpointError(f"{src} holds only PyTorch .bin weights; re-save them as safetensors "
                              "(model.save_pretrained(dir, safe_serialization=True))")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {src}")


def iter_hf_tensors(src: Path) -> Iterator[tuple[str, np.ndarray]]:
    for shard in hf_shards(src):
        yield from iter_safetensors(shard)


# --------------------------------------------------------------------------- HF names -> params

_LAYER_MODULES = {
    "self_attn.q_proj": ("self_attn", "q_proj"), "self_attn.k_proj": ("self_attn", "k_proj"),
    "self_attn.v_proj": ("self_attn", "v_proj"), "self_attn.o_proj": ("self_attn", "o_proj"),
    "mlp.gate_proj": ("mlp", "gate_proj"), "mlp.up_proj": ("mlp", "up_proj"),
    "mlp.down_proj": ("mlp", "down_proj"),
}
_LAYER_NORMS = {"input_layernorm": ("input_layernorm",), "post_attention_layernorm": ("post_attention_layernorm",),
                "self_attn.q_norm": ("self_attn", "q_norm"), "self_attn.k_norm": ("self_attn", "k_norm")}


def param_shapes(cfg: ModelConfig, dtype: Any) -> dict:
    """The parameter tree's shapes, without allocating anything."""
    model = Transformer(cfg, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)["params"]


def _route(name: str) -> tuple[tuple[str, ...], int | None, bool] | None:
    """HF tensor name -> (path in our tree, layer index or None, transpose?); None = not a parameter."""
    if name == "model.embed_tokens.weight":
        return ("embed_tokens", "embedding"), None, False
    if name == "model.norm.weight":
        return ("norm", "weight"), None, False
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), None, True
    if name.startswith("model.layers."):
        rest = name[len("model.layers."):]
        layer_str, _, sub = rest.partition(".")
        module, _, leaf = sub.rpartition(".")
        if module in _LAYER_MODULES and leaf in ("weight", "bias"):
            path = ("layers",) + _LAYER_MODULES[module] + ("kernel" if leaf == "weight" else "bias",)
            return path, int(layer_str), leaf == "weight"
        if module in _LAYER_NORMS and leaf == "weight":
            return ("layers",) + _LAYER_NORMS[module] + ("weight",), int(layer_str), False
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint: does config.json match the weights?")


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def build_params(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], dtype: Any,
                 total: int | None = None, progress: bool = True) -> dict:
    """Fill a numpy parameter tree (target dtype) from a stream of HF-named tensors."""
    shapes = param_shapes(cfg, dtype)
    params = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), shapes)
    seen: dict[tuple[str, ...], set] = {}
    bar = tqdm(tensors, total=total, desc="converting", unit="tensor", disable=not progress)
    for name, array in bar:
        signals.checkpoint("convert tensor")
        route = _route(name)
        if route is None:
            continue
        path, layer, transpose = route
        if layer is not None and layer >= cfg.num_layers:
            raise CheckpointError(f"tensor {name!r} is for layer {layer}, but config.json has num_hidden_layers="
                                  f"{cfg.num_layers}")
        if path == ("lm_head", "kernel") and cfg.tie_word_embeddings:
            continue  # tied: the embedding is the head
        try:
            target = _get(params, path)
        except KeyError:
            raise CheckpointError(f"tensor {name!r} has no place in a {cfg.model_type} model with this "
                                  "config.json (e.g. a bias the config does not declare)") from None
        value = array.T if transpose else array
        slot = target if layer is None else target[layer]
        if value.shape != slot.shape:
            raise CheckpointError(f"tensor {name!r} has shape {array.shape}; config.json implies "
                                  f"{slot.shape[::-1] if transpose else slot.shape}")
        slot[...] = value.astype(target.dtype)
        seen.setdefault(path, set()).add(layer)
    missing = []
    for path, leaf in _flatten(params):
        layers = seen.get(path, set())
        want = {None} if path[0] != "layers" else set(range(cfg.num_layers))
        if layers != want:
            absent = sorted(want - layers, key=lambda x: -1 if x is None else x)
            missing.append(f"{'.'.join(path)} (layers {absent})" if path[0] == "layers" else ".".join(path))
    if missing:
        raise CheckpointError("the checkpoint lacks tensors: " + ", ".join(missing[:8])
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return params


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


# ----------------------------------------------------------------------------------- sources

def read_source(src: str | os.PathLike, dtype: Any = jnp.bfloat16, progress: bool = True):
    """Read an HF directory or a .gguf file -> (hf_config dict, numpy params)."""
    src = Path(src)
    if src.suffix == ".gguf":
        from raas_jax.model_io import gguf_reader

        hf_config = gguf_reader.read_gguf_config(src)
        cfg = ModelConfig.from_hf_dict(hf_config)
        tensors = gguf_reader.iter_gguf_tensors(src)
        return hf_config, build_params(cfg, tensors, dtype, progress=progress)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is neither a model directory nor a .gguf file")
    try:
        hf_config = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no config.json in {src}: is this a Hugging Face model directory?") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{src / 'config.json'} is not valid JSON ({e})") from None
    cfg = ModelConfig.from_hf_dict(hf_config)
    return hf_config, build_params(cfg, iter_hf_tensors(src), dtype, progress=progress)


def _copy_side_files(src: Path, tmp: Path) -> None:
    if src.suffix == ".gguf":
        from raas_jax.model_io import gguf_reader

        gguf_reader.save_gguf_tokenizer(src, tmp)
        return
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)


def convert(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "bf16", overwrite: bool = False,
            progress: bool = True) -> Path:
    """Convert an HF directory or .gguf file into a raas-jax model directory at `out`.

    Everything is written to a temporary sibling directory first and renamed at the end, so a failed
    conversion leaves nothing half-written (and an existing `out` untouched unless it succeeds).
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    jdtype = resolve_dtype(dtype)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ValueError(f"OUT {out} is the source or a folder holding it: converting there would delete "
                         f"the source {src}; choose another OUT")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    with atomic_directory(out) as tmp:
        hf_config, params = read_source(src, jdtype, progress=progress)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        _copy_side_files(src, tmp)
        save_params(tmp / PARAMS_DIR, params)
        (tmp / "raas_jax.json").write_text(json.dumps(
            {"source": str(src), "dtype": jnp.dtype(jdtype).name, "format": 1}, indent=2))
    return out


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling (`.OUT.tmp-PID-*`) and rename it to `out` when the block
    succeeds: a failure or SIGTERM removes the temporary and leaves an existing `out` untouched; temporaries
    of dead processes are removed first; the result gets the umask like any new directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
    restore_sigterm = _raise_on_sigterm()
    try:
        with signals.temporary(tmp):  # a second Ctrl-C, which exits at once, removes it too
            yield tmp
            signals.checkpoint("rename into place")
        if out.exists() or out.is_symlink():
            backup = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, backup)
            os.rename(tmp, out)
            remove_path(backup)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore_sigterm()


def remove_path(path: Path) -> None:
    """Remove a directory tree, a file or a symlink (the link, never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def give_umask_mode(path: Path) -> None:
    """Give a file the mode a plain `open` would (0666 less the umask): tools that write through a private temporary
    leave 0600."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _remove_stale_temps(out: Path) -> None:
    """Remove `.OUT.tmp-*` siblings left by a conversion that was killed (its process is gone)."""
    for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        pid = stale.name[len(out.name) + 6:].split("-", 1)[0]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _raise_on_sigterm() -> Any:
    """Turn SIGTERM into SystemExit (so that the temporary directory is removed) until the returned function
    restores the previous handler (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def save_params(path: Path, params: dict, max_file_bytes: int | None = None) -> None:
    """Save the parameter tree as an orbax checkpoint; `max_file_bytes` caps the size of its data files
    (for checkpoints kept in git)."""
    import orbax.checkpoint as ocp

    if max_file_bytes is None:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path.absolute(), params)
        checkpointer.wait_until_finished()
        return
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(path.absolute(), args=ocp.args.PyTreeSave(params, ocdbt_target_data_file_size=max_file_bytes))


def is_converted(path: Path) -> bool:
    return path.is_dir() and (path / PARAMS_DIR).is_dir() and (path / "config.json").is_file()


def restore_params(path: Path, cfg: ModelConfig, dtype: Any, mesh: Any = None) -> dict:
    """Restore the orbax params of a converted directory straight into their device placement (one device,
    or the shardings of a (data, model) mesh), as `dtype`."""
    import orbax.checkpoint as ocp

    shapes = param_shapes(cfg, dtype)
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, shapes)
    else:
        from raas_jax.decode.sharding import param_shardings

        shardings = param_shardings(shapes, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    try:
        return ocp.StandardCheckpointer().restore((path / PARAMS_DIR).absolute(), target)
    except Exception as e:  # orbax raises many types; say which directory is at fault
        raise CheckpointError(f"cannot restore the parameters in {path / PARAMS_DIR}: {type(e).__name__}: "
                              f"{str(e)[:300]} (re-run `raas-jax convert` to rebuild it)") from None


def stored_dtype(path: Path) -> Any:
    try:
        return resolve_dtype(json.loads((path / "raas_jax.json").read_text())["dtype"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return jnp.bfloat16

