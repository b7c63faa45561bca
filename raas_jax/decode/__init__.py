"""The decode core: the page pool (cache), the jitted prefill/decode loop (generate), sampling, sharding and
memory sizing. The eviction rules themselves are in raas_jax/policies.py."""
