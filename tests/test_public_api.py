"""The names a user imports from the top of the package, and the module paths that stay valid."""

import dataclasses

import raas_jax
from raas_jax import H2O, Dense, Quest, RaaS, StreamingLLM, load
from raas_jax import policies


def test_top_level_names_are_the_policy_classes_and_load():
    assert (RaaS, Quest, H2O, StreamingLLM, Dense) == (policies.RaaS, policies.Quest, policies.H2O,
                                                       policies.StreamingLLM, policies.Dense)
    assert load is raas_jax.api.load
    for name in raas_jax.__all__:
        assert hasattr(raas_jax, name), name


def test_policies_are_frozen_configs():
    raas = RaaS(budget=256)
    assert dataclasses.is_dataclass(raas) and hash(raas) == hash(RaaS(budget=256))
    assert raas_jax.make_policy("raas", budget=256) == raas


def test_generate_refuses_what_the_cli_refuses(tiny_llama_converted):
    import math

    import pytest

    model = load(tiny_llama_converted, dtype="f32")
    for bad in ({"seed": 2**40}, {"seed": -1}, {"seed": 2**70}, {"seed": 1.5}, {"temperature": math.nan},
                {"temperature": math.inf}, {"temperature": -1}, {"top_p": math.nan}, {"top_p": 0},
                {"top_k": -1}, {"top_k": 2.5}):
        (name,) = bad
        with pytest.raises(ValueError, match=f"^{name} must be"):  # the message names the parameter, as the CLI's
            model.generate([[5, 6, 7]], max_new_tokens=2, chat=False, **bad)
    assert len(model.generate([[5, 6, 7]], max_new_tokens=2, chat=False, seed=2**32 - 1)[0].token_ids) >= 1
