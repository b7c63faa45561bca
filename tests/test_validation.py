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
                            ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("^", r"\^")):
            model.generate([[1, 2]], **kwargs)
