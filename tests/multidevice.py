"""Run a script in a subprocess with fake CPU devices (``--xla_force_host_platform_device_count``
must be set before jax starts, so multi-device checks cannot run in the test process)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_on_devices(script: str, n: int = 8, timeout: int = 600, **env) -> dict:
    """``python -c script`` from the repo root on ``n`` CPU devices (conftest's compile flags kept,
    matmuls at highest precision, ``tests/`` importable, ``env`` added); the JSON the script
    prints after ``RESULT``."""
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))  # test modules
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=path,
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}", **env)
    res = subprocess.run([sys.executable, "-c", script], cwd=str(REPO), env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.split("RESULT", 1)[1])
