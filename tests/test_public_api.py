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
