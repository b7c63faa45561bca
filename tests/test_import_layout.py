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


def test_gpu_tests_name_only_attributes_that_exist():
    """tests/test_gpu.py is skipped without a GPU, so a stale name there (a function that moved to another
    module) would only show on the GPU machine. Every `alias.name` it reads from an imported module must exist."""
    import ast

    tree = ast.parse((REPO / "tests" / "test_gpu.py").read_text())
    modules = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                try:
                    modules[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    pass  # a class or function, not a module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name] = importlib.import_module(alias.name)
    read = {(node.value.id, node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
            and isinstance(node.ctx, ast.Load)}
    missing = sorted(f"{alias}.{attr}" for alias, attr in read if not hasattr(modules[alias], attr))
    assert {"kernels", "pallas_gpu", "mosaic_gpu", "bench"} <= modules.keys()
    assert not missing, f"tests/test_gpu.py reads names its modules lack: {missing}"
