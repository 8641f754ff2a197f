import os

# Tests run on the CPU; keep XLA from grabbing every thread so parallel jobs behave.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# The suite's programs are tiny: compiling them is most of its time.  XLA's CPU backend compiles
# with LLVM at -O0 and without its expensive passes here (about a sixth less wall time; the HLO
# passes, fusion and numerics are XLA's own either way).  Options already in XLA_FLAGS win;
# JAXFORMERS_TEST_XLA_DEFAULTS=1 keeps XLA's defaults.  Set before jax starts its backend, and
# inherited by the subprocesses the tests launch with os.environ.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def with_fast_compile_flags(flags: str) -> str:
    """``flags`` (an XLA_FLAGS value) plus each of :data:`FAST_COMPILE_FLAGS` it does not set."""
    have = {f.split("=")[0] for f in flags.split()}
    return " ".join(flags.split() + [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in have])


if os.environ.get("JAXFORMERS_TEST_XLA_DEFAULTS") != "1":
    os.environ["XLA_FLAGS"] = with_fast_compile_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
