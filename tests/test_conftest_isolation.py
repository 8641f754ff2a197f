"""The suite's own isolation (tests/conftest.py): what one test turns on process-wide does not
reach the next, and a test module's compiled programs are dropped when it ends."""
import jax
import jax.numpy as jnp

import conftest
from experiments import common

_seen = {}


def test_a_cli_run_enables_the_persistent_compile_cache(tmp_path, monkeypatch):
    _seen["dir"] = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.25)
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    common.enable_compile_cache()  # what experiments do unless --no-compile-cache
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")


def test_the_next_test_finds_the_cache_as_it_was():
    assert "dir" in _seen, "runs after the test above"
    assert jax.config.jax_compilation_cache_dir == _seen["dir"]
    assert jax.config.jax_persistent_cache_min_compile_time_secs != 0.25


def test_memory_maps_are_counted_and_freed_with_the_compiled_programs():
    count = conftest._map_count()
    if count is None:
        return  # not Linux: nothing to count
    fns = [jax.jit(lambda x, i=i: jnp.sin(x) * i + jnp.cos(x) ** i) for i in range(40)]
    for f in fns:
        f(jnp.ones(3)).block_until_ready()
    grown = conftest._map_count()
    assert grown > count + 40  # at least a region per compiled program
    jax.clear_caches()
    del fns, f
    import gc
    gc.collect()
    assert conftest._map_count() < grown - 40
