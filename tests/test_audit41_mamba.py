"""Audit 41 (selective scan / SSD kernels and the Mamba layers): regression tests."""
import jax.numpy as jnp
import pytest

from pallas_kernels.selective_scan import selective_state_update, tpu_vmem_bytes


def test_selective_state_update_zero_groups_is_a_value_error():
    """``B``/``C`` ``[B, G=0, N]``: a ValueError naming the groups (was a ZeroDivisionError from
    ``D % G``), as the scan's own validation says."""
    z = jnp.zeros
    with pytest.raises(ValueError, match="number of groups G=0 of B"):
        selective_state_update(z((1, 4, 3)), z((1, 4)), z((1, 4)), z((4, 3)), z((1, 0, 3)), z((1, 0, 3)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=jnp.int32), "dtype must be a floating dtype"),   # was a VMEM figure for int inputs
    (dict(z="yes"), "z must be a bool"),                         # were TypeErrors from arithmetic
    (dict(initial_state=None), "initial_state must be a bool"),
    (dict(segments="no"), "segments must be a bool"),
])
def test_selective_scan_tpu_vmem_bytes_checks_dtype_and_flags(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tpu_vmem_bytes(2, 64, 128, 16, **kwargs)
