import os

# Tests run on the CPU; keep XLA from grabbing every thread so parallel jobs behave.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# The suite's programs are tiny: compiling them is most of its time.  XLA's CPU backend compiles
# with LLVM at -O0 and without its expensive passes here (about a sixth less wall time; the HLO
# passes, fusion and numerics are XLA's own either way).  jaxlib 0.10 also keeps its older fusion
# code generator (the elemental IR emitter; --xla_cpu_use_fusion_emitters=false): the same HLO
# passes and fusions, each fusion emitted as LLVM IR directly rather than through the MLIR fusion
# emitters, whose pipeline the -O0 flag does not shorten: with it a program compiles in about 40%
# of the time (stop 51: 7 of leg 1's slowest test files, 506 CPU s -> 294).  An XLA flag a jaxlib
# does not know aborts the process, and jaxlib 0.12.1 has no such flag (only the MLIR emitters):
# it is added for jaxlib 0.10.x only (:data:`LEGACY_EMITTER_JAXLIB`).  Options already in
# XLA_FLAGS win; JAXFORMERS_TEST_XLA_DEFAULTS=1 keeps XLA's defaults.  Set before jax starts its
# backend, and inherited by the subprocesses the tests launch with os.environ.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
LEGACY_EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
LEGACY_EMITTER_JAXLIB = ((0, 10), (0, 11))  # [from, to): the jaxlib versions it is added for


def jaxlib_version() -> tuple | None:
    """The installed jaxlib's version as ints (``(0, 10, 2)``), read without importing jax."""
    import re
    from importlib.metadata import PackageNotFoundError, version
    try:
        return tuple(int(x) for x in re.findall(r"\d+", version("jaxlib"))[:3])
    except PackageNotFoundError:
        return None


def fast_compile_flags(jaxlib: tuple | None = None) -> tuple:
    """:data:`FAST_COMPILE_FLAGS`, plus :data:`LEGACY_EMITTER_FLAG` for a jaxlib (default: the
    installed one) in :data:`LEGACY_EMITTER_JAXLIB`."""
    jaxlib = jaxlib_version() if jaxlib is None else jaxlib
    lo, hi = LEGACY_EMITTER_JAXLIB
    return FAST_COMPILE_FLAGS + ((LEGACY_EMITTER_FLAG,) if jaxlib is not None and lo <= jaxlib < hi else ())


def with_fast_compile_flags(flags: str, jaxlib: tuple | None = None) -> str:
    """``flags`` (an XLA_FLAGS value) plus each of :func:`fast_compile_flags` it does not set."""
    have = {f.split("=")[0] for f in flags.split()}
    return " ".join(flags.split() + [f for f in fast_compile_flags(jaxlib) if f.split("=")[0] not in have])


if os.environ.get("JAXFORMERS_TEST_XLA_DEFAULTS") != "1":
    os.environ["XLA_FLAGS"] = with_fast_compile_flags(os.environ.get("XLA_FLAGS", ""))

# Many test modules compile the same programs (a tiny model's train step, a kernel at the same
# shapes), and each module's are dropped when it ends (below).  So the suite shares one persistent
# compilation cache, a fresh temporary folder: the first process to load this file (pytest-xdist's
# controller, or pytest alone) makes it, the workers and every subprocess a test launches inherit
# it through JAX_COMPILATION_CACHE_DIR, and that process deletes it when it exits.  Every program is
# cached (min compile time 0).  A later module then loads a program instead of compiling it: about
# a fifth less wall time on 2 cores (stop 49).  JAXFORMERS_TEST_COMPILE_CACHE=0 turns it off; a
# JAX_COMPILATION_CACHE_DIR already set is used as it is (and kept).
# A run killed by a signal cannot delete its folder: folders of this prefix untouched for a day
# (a run adds entries all along) are deleted when the next run starts.
CACHE_PREFIX = "jaxformers-test-xla-"
STALE_CACHE_S = 24 * 3600
_CREATED_CACHE_DIR = None


def _remove_stale_caches(root: str, now: float) -> None:
    import shutil
    for name in os.listdir(root):
        path = os.path.join(root, name)
        try:
            if name.startswith(CACHE_PREFIX) and now - os.path.getmtime(path) > STALE_CACHE_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


if os.environ.get("JAXFORMERS_TEST_COMPILE_CACHE", "1") != "0" and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    import atexit
    import shutil
    import tempfile
    import time

    _remove_stale_caches(tempfile.gettempdir(), time.time())
    _CREATED_CACHE_DIR = tempfile.mkdtemp(prefix=CACHE_PREFIX)
    atexit.register(shutil.rmtree, _CREATED_CACHE_DIR, True)  # at the end, also when pytest stops early
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CREATED_CACHE_DIR
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import gc  # noqa: E402

import pytest  # noqa: E402

# XLA's CPU backend maps three memory regions per compiled kernel and keeps them as long as jax's
# caches hold the executable.  One process running half the suite reached 47,000 of the kernel's
# limit, vm.max_map_count (65,530 by default): past it mmap fails and XLA dies of a segfault
# (stop 41's CI, in the persistent cache's serialisation of the distillation experiment's
# decoder).  So each test module's compiled programs are dropped when it ends (a module reuses
# its own; ~600 regions stay), and a module that still leaves more than half the limit fails
# by name rather than crashing a later one.
MAX_MAP_COUNT_SHARE = 0.5


def _map_count() -> int | None:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return None


def _max_map_count() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs(request):
    yield
    jax.clear_caches()
    gc.collect()
    count, limit = _map_count(), _max_map_count()
    if count is not None and limit and count > MAX_MAP_COUNT_SHARE * limit:
        pytest.fail(f"{request.module.__name__} leaves {count} memory maps after jax.clear_caches() "
                    f"(vm.max_map_count {limit}): compiled programs outlive the module (held in a "
                    f"global?); XLA segfaults when the limit is reached")


# The persistent compilation cache is process-wide jax config: a test that changes it (an
# experiment's CLI run in-process without --no-compile-cache when the suite's shared cache is off,
# a test of enable_compile_cache) would change it for every later test of its worker.  Restored
# after each test.
_COMPILE_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture(autouse=True)
def _restore_compile_cache():
    before = [getattr(jax.config, name) for name in _COMPILE_CACHE_OPTIONS]
    yield
    if [getattr(jax.config, name) for name in _COMPILE_CACHE_OPTIONS] != before:
        for name, value in zip(_COMPILE_CACHE_OPTIONS, before):
            jax.config.update(name, value)
        from jax._src import compilation_cache
        compilation_cache.reset_cache()  # it keeps the first folder it was given otherwise
