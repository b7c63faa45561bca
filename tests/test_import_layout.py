"""The repository's top-level kernels/ and models/ folders never shadow installed packages of those names.

transformers imports the `kernels` package (when installed); `python -m ...`, `python -c` and child processes
started in the repository root put it first on sys.path, so a regular package there would win.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_in_repo_root(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_installed_kernels_and_models_win_from_the_repository_root(tmp_path):
    for name in ("kernels", "models"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    code = textwrap.dedent("""
        import kernels, models
        print(kernels.WHO, '|', models.WHO)
        from raas_jax.kernels import dispatch
        from raas_jax.models.config import ModelConfig
        print(dispatch.__file__)
    """)
    done = _run_in_repo_root(code, extra_path=str(tmp_path))
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first == "installed kernels | installed models"
    assert Path(second).resolve() == REPO / "kernels" / "dispatch.py"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_imports_from_the_repository_root():
    done = _run_in_repo_root("import transformers; transformers.LlamaConfig(); print('ok')")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
