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


def test_inner_the_suite_runs_with_its_shared_compile_cache():
    """Run by the test below in a pytest of its own (skipped otherwise)."""
    import os
    import tempfile

    import pytest

    if os.environ.get("JAXFORMERS_TEST_INNER_CACHE") != "1":
        pytest.skip("run by test_the_shared_compile_cache_is_made_and_removed")
    path = os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert os.path.isdir(path) and os.path.basename(path).startswith("jaxformers-test-xla-")
    assert os.path.dirname(path) == tempfile.gettempdir()
    assert jax.config.jax_compilation_cache_dir == path
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    jax.jit(lambda x: x * 3 + 1)(jnp.ones(5)).block_until_ready()
    assert os.listdir(path), "the program was written to the cache"


def test_the_shared_compile_cache_is_made_and_removed(tmp_path):
    """conftest: one persistent compilation cache for the whole run, in a fresh folder under the
    temporary directory, deleted when pytest ends; ``JAXFORMERS_TEST_COMPILE_CACHE=0`` turns it off."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                        "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER", "JAXFORMERS_TEST_COMPILE_CACHE")}
    env.update(TMPDIR=str(tmp_path), JAXFORMERS_TEST_INNER_CACHE="1")
    test = f"{__file__}::test_inner_the_suite_runs_with_its_shared_compile_cache"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly", test]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("jaxformers-test-xla-")]
    # a folder left by a killed run: deleted once a day old, a recent one (a run going on) kept
    old, recent = tmp_path / "jaxformers-test-xla-old", tmp_path / "jaxformers-test-xla-recent"
    old.mkdir(), recent.mkdir()
    os.utime(old, (0, time.time() - 25 * 3600))
    conftest._remove_stale_caches(str(tmp_path), time.time())
    assert not old.exists() and recent.exists()
    res = subprocess.run(cmd, env=dict(env, JAXFORMERS_TEST_COMPILE_CACHE="0"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1 and "KeyError: 'JAX_COMPILATION_CACHE_DIR'" in res.stdout, res.stdout[-3000:]


def test_fast_compile_flags_add_the_legacy_emitter_only_where_jaxlib_has_it():
    """conftest: ``--xla_cpu_use_fusion_emitters=false`` (compiles in ~40% of the time on jaxlib
    0.10) only for the jaxlib versions that know it: an unknown XLA flag aborts the process
    (jaxlib 0.12.1).  Flags already given win; the ones this process runs with are the installed
    jaxlib's."""
    import os

    base = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
    assert conftest.fast_compile_flags((0, 10, 2)) == base + ("--xla_cpu_use_fusion_emitters=false",)
    for version in ((0, 9, 0), (0, 11, 2), (0, 12, 1), (1, 0)):
        assert conftest.fast_compile_flags(version) == base
    assert conftest.with_fast_compile_flags("--xla_cpu_use_fusion_emitters=true --x=1", (0, 10, 2)).split() == \
        ["--xla_cpu_use_fusion_emitters=true", "--x=1", *base]
    if os.environ.get("JAXFORMERS_TEST_XLA_DEFAULTS") != "1":
        have = {f.split("=")[0] for f in os.environ["XLA_FLAGS"].split()}
        assert {f.split("=")[0] for f in conftest.fast_compile_flags()} <= have
