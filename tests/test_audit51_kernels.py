"""Stop 51: non-array arguments of the scans and of the sparse tile counters are refused by
name and type (they were reported as "got shape ()", or accepted by the counters although the
kernels refuse them)."""
import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import hash_tile_count, qk_sparse_tile_count

scan_ref = importlib.import_module("pallas_kernels.selective_scan.reference")
ssd_ref = importlib.import_module("pallas_kernels.ssd.reference")


def _scan_args():
    b, l, d, n = 1, 4, 3, 2
    return dict(x=jnp.zeros((b, l, d)), dt=jnp.zeros((b, l, d)), A=-jnp.ones((d, n)),
                B=jnp.zeros((b, l, n)), C=jnp.zeros((b, l, n)), D=jnp.ones((d,)), z=jnp.zeros((b, l, d)),
                dt_bias=jnp.zeros((d,)), initial_state=jnp.zeros((b, d, n)))


def _ssd_args():
    b, l, h, p, g, n = 1, 4, 2, 3, 1, 2
    return dict(x=jnp.zeros((b, l, h, p)), dt=jnp.zeros((b, l, h)), A=-jnp.ones((h,)),
                B=jnp.zeros((b, l, g, n)), C=jnp.zeros((b, l, g, n)), D=jnp.ones((h,)),
                z=jnp.zeros((b, l, h, p)), dt_bias=jnp.zeros((h,)), initial_state=jnp.zeros((b, h, p, n)))


@pytest.mark.parametrize("family", ["selective_scan", "ssd"])
@pytest.mark.parametrize("name", ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"])
def test_scan_names_a_list_argument(family, name):
    mod, args = (scan_ref, _scan_args()) if family == "selective_scan" else (ssd_ref, _ssd_args())
    mod.validate(**args)  # the arrays themselves pass
    args[name] = np.asarray(args[name]).tolist()
    with pytest.raises(ValueError, match=rf"^{name} must be an array \(jax or numpy\), got list"):
        mod.validate(**args)


@pytest.mark.parametrize("family", ["selective_scan", "ssd"])
def test_state_update_names_a_list_argument(family):
    if family == "selective_scan":
        b, d, n = 2, 3, 4
        args = dict(state=jnp.zeros((b, d, n)), x=jnp.zeros((b, d)), dt=jnp.zeros((b, d)), A=-jnp.ones((d, n)),
                    B=jnp.zeros((b, n)), C=jnp.zeros((b, n)))
        fn = scan_ref.selective_state_update
    else:
        b, h, p, g, n = 2, 2, 3, 1, 4
        args = dict(state=jnp.zeros((b, h, p, n)), x=jnp.zeros((b, h, p)), dt=jnp.zeros((b, h)),
                    A=-jnp.ones((h,)), B=jnp.zeros((b, g, n)), C=jnp.zeros((b, g, n)))
        fn = ssd_ref.ssd_state_update
    fn(**args)
    for name in ("state", "dt", "B"):
        bad = dict(args, **{name: np.asarray(args[name]).tolist()})
        with pytest.raises(ValueError, match=rf"^{name} must be an array \(jax or numpy\), got list"):
            fn(**bad)
    with pytest.raises(ValueError, match=r"^dt must be an array \(jax or numpy\), got float"):
        fn(**dict(args, dt=0.5))


def test_tile_counters_refuse_lists_like_the_kernels():
    buckets = np.zeros((1, 8, 2), np.int32)
    keep = np.ones((1, 8, 2), bool)
    assert hash_tile_count(buckets, buckets, block_q=16, block_k=16).shape == (1, 2)
    assert qk_sparse_tile_count(keep, keep, block_q=16, block_k=16).shape == (1, 2)
    with pytest.raises(ValueError, match=r"^q_buckets must be an array \(jax or numpy\), got list"):
        hash_tile_count(buckets.tolist(), buckets, block_q=16, block_k=16)
    with pytest.raises(ValueError, match=r"^k_keep must be an array \(jax or numpy\), got list"):
        qk_sparse_tile_count(keep, keep.tolist(), block_q=16, block_k=16)
