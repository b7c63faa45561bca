"""One validation layer: `raas-jax generate`'s flags and `Model.generate` refuse the same values with the same
message, naming the parameter."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raas_jax import validation
from raas_jax.cli import build_parser

# (parameter, CLI flag, refused value, what the message says)
REFUSED = [
    ("max_new_tokens", "--max-new-tokens", 0, "max_new_tokens must be an integer >= 1, got 0"),
    ("temperature", "--temperature", -0.5, "temperature must be a finite number >= 0, got -0.5"),
    ("temperature", "--temperature", math.inf, "temperature must be a finite number >= 0, got inf"),
    ("temperature", "--temperature", math.nan, "temperature must be a finite number >= 0, got nan"),
    ("top_p", "--top-p", 0.0, "top_p must be a finite number in (0, 1], got 0.0"),
    ("top_p", "--top-p", 1.5, "top_p must be a finite number in (0, 1], got 1.5"),
    ("top_k", "--top-k", -1, "top_k must be an integer >= 0, got -1"),
    ("seed", "--seed", -1, "seed must be an integer in [0, 2^32), got -1"),
    ("seed", "--seed", 2**32, "seed must be an integer in [0, 2^32), got 4294967296"),
]


@pytest.mark.parametrize(("name", "flag_name", "value", "message"), REFUSED)
def test_the_cli_and_the_api_refuse_alike(name, flag_name, value, message, capsys):
    with pytest.raises(ValueError) as api:
        getattr(validation, name)(value)
    assert str(api.value) == message
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", flag_name, str(value), "prompt"])
    assert message in capsys.readouterr().err


def test_checks_return_what_they_accept_and_refuse_non_numbers():
    assert validation.sampling(0.7, 1.0, 5, 2**32 - 1) == (0.7, 1.0, 5, 2**32 - 1)
    assert validation.seed(np.int64(3)) == 3 and validation.top_p(np.float32(0.5)) == 0.5
    for bad in (True, 2.0, "3", None):
        with pytest.raises(ValueError, match="seed must be an integer"):
            validation.seed(bad)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        validation.temperature("0.5")


def test_model_generate_uses_the_shared_checks():
    """Model.generate raises before touching its model (so a stand-in without weights will do)."""
    from raas_jax.api import Model

    model = Model.__new__(Model)
    for kwargs, message in (({"seed": 2**40}, "seed must be an integer in [0, 2^32)"),
                            ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
                            ({"top_k": 2.5}, "top_k must be an integer >= 0"),
                            ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
                            ({"decode_steps": -5}, "decode_steps must be an integer >= 1")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("^", r"\^")):
            model.generate([[1, 2]], **kwargs)


# every numeric flag of every subcommand ----------------------------------------------------------------------

def test_no_numeric_flag_is_parsed_by_a_bare_int_or_float():
    """A flag typed `int` or `float` takes -5, nan or inf unchecked: every numeric flag in the package uses one of
    the checked types of raas_jax.validation (or another function that checks)."""
    import ast
    from pathlib import Path

    import raas_jax

    bare = []
    for path in sorted(Path(raas_jax.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                for keyword in node.keywords:
                    if keyword.arg == "type" and isinstance(keyword.value, ast.Name) \
                            and keyword.value.id in ("int", "float"):
                        bare.append(f"{path.name}:{node.lineno}")
    assert not bare, f"flags typed by a bare int/float: {bare}"


BAD_FLAGS = [  # (argv, the flag the message names, what it says)
    (["eval", "--limit", "0"], "--limit", "must be an integer >= 1, got 0"),
    (["generate", "x", "--memory-fraction", "1.5"], "--memory-fraction", "a fraction in (0, 1], e.g. 0.92; got '1.5'"),
    (["serve", "--max-rows", "0"], "--max-rows", "must be an integer >= 1"),
    (["bench", "e2e", "--steps", "0"], "--steps", "must be an integer >= 1"),
    (["bench", "e2e", "--positions", "1024,-2"], "--positions", "must be an integer >= 1, got -2"),
    (["bench", "e2e", "--batches", "1,x"], "--batches", "expected an integer, got 'x'"),
    (["bench", "e2e", "--real-tokens", "-1"], "--real-tokens", "must be an integer >= 0"),
    (["bench", "kernels", "--calls", "0"], "--calls", "must be an integer >= 1"),
    (["bench", "serve", "--num-prompts", "0"], "--num-prompts", "must be an integer >= 1"),
    (["bench", "serve", "--request-rate", "nan"], "--request-rate", "must be a finite number >= 0"),
    (["bench", "prefill", "--out", "x.json", "--chunk", "8"], "--chunk", "must be an integer >= 16"),
    (["bench", "prefill", "--out", "x.json", "--time-limit", "inf"], "--time-limit", "finite number >= 1"),
    (["bench", "memory", "--batches", "64,0"], "--batches", "must be an integer >= 1, got 0"),
    (["bench", "memory", "--memory-fraction", "0"], "--memory-fraction", "a fraction in (0, 1], e.g. 0.92; got '0'"),
    (["bench", "profile", "--steps", "-1"], "--steps", "must be an integer >= 1"),
    (["bench", "hlo", "--batch", "0"], "--batch", "must be an integer >= 1"),
]


@pytest.mark.parametrize("argv, flag_name, message", BAD_FLAGS, ids=[" ".join(a[:2]) + " " + f for a, f, _ in BAD_FLAGS])
def test_bad_numeric_flags_are_refused_at_parse_time(argv, flag_name, message, capsys):
    from raas_jax.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag_name}: {message}" in err or (f"argument {flag_name}:" in err and message in err), err


@pytest.mark.parametrize("module", ["raas_jax.bench.hf_decode", "raas_jax.bench.torch_decode"])
def test_reference_children_check_their_flags(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--positions", "2048,0"])
    assert exit_.value.code == 2 and "argument --positions: must be an integer >= 1, got 0" in capsys.readouterr().err
