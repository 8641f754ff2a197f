"""Helpers shared by the experiment and benchmark entry points."""
import os
import statistics
import time


def enable_compile_cache():
    """Persistent XLA compilation cache in ``<jaxformers cache>/xla`` (unless the user set one)."""
    import jax
    from jaxformers.data import cache_dir

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def median_ms(fn, args, warmup: int, iters: int) -> float:
    """Median wall time in ms of ``fn(*args)`` (compiled; block_until_ready)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
