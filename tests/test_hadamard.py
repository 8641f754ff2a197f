"""Fast Walsh-Hadamard transform: Pallas kernel (interpret mode) vs the dense float32 reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.hadamard import (factor_sizes, hadamard_matrix, hadamard_reference,
                                     hadamard_transform, split_size)


@pytest.mark.parametrize("n", [2, 8, 12, 20, 28, 44, 64, 352, 768, 52, 92, 100, 116, 156, 172, 244, 688])
def test_matrix_is_hadamard(n):
    h = hadamard_matrix(n)
    assert set(np.unique(h)) == {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


def test_factorisation():
    assert split_size(352) == (44, 8) and split_size(768) == (12, 64) and split_size(1024) == (1, 1024)
    assert {12, 20, 28, 44} <= set(factor_sizes())
    # the Goethals-Seidel table: LLaMA-2-7B's d_ff 11008 = 172 * 64 (and LLaMA-2-13B's 13824 =
    # 108 * 128, a Paley factor); every multiple of 4 up to 256 but 188 and 236 is reachable
    assert split_size(11008) == (172, 64) and split_size(13824) == (108, 128)
    assert split_size(156 * 32) == (156, 32) and split_size(184) == (92, 2)
    reachable = {m * 2 ** k for m in [1] + factor_sizes() for k in range(9)}
    assert [m for m in range(4, 257, 4) if m not in reachable] == [188, 236]
    for bad in (188, 236 * 4, 6, 0, 2.0):
        with pytest.raises(ValueError):
            split_size(bad)


def test_goethals_seidel_table_is_reproduced_by_the_search():
    """The stored first rows are what our own search finds (fast entries; all of them:
    ``python -m pallas_kernels.hadamard.goethals_seidel``), and a broken row is refused."""
    from pallas_kernels.hadamard import goethals_seidel as gs
    for n in (13, 43):
        found = gs.find_sequences(n)
        assert gs._format(found) == gs.SEQUENCES[n]
    a, b, c, d = (np.array([1 if ch == "+" else -1 for ch in r]) for r in gs.SEQUENCES[43])
    a[5] = -a[5]
    with pytest.raises(ValueError, match="4 n I"):
        gs.array(a, b, c, d)
    with pytest.raises(ValueError, match="order 188"):
        gs.matrix(188)


# (leading shape, n, dtype, scale): rows not a multiple of the row block, tiny n (butterflies
# only), several 128-chunks (dots + butterflies), Paley factors (12, 44), Goethals-Seidel (172)
CASES = [
    ((3, 5), 64, jnp.float32, None),
    ((7,), 8, jnp.float32, 1.0),
    ((2, 3), 352, jnp.float32, None),
    ((37,), 512, jnp.float32, 0.5),
    ((1,), 768, jnp.float32, None),
    ((2, 1, 3), 12, jnp.float32, None),
    ((19,), 256, jnp.bfloat16, None),
    ((3,), 688, jnp.float32, None),        # 172 * 4: a Goethals-Seidel factor
    ((5,), 4096, jnp.float32, None),       # split: H_2 (x) H_2048 (kernel + the dense factor)
    ((2, 3), 8192, jnp.bfloat16, 2.0),     # H_4 (x) H_2048, bf16
]


@pytest.mark.parametrize("lead, n, dtype, scale", CASES)
def test_matches_reference_fwd_grad(lead, n, dtype, scale):
    kx, kg = jax.random.split(jax.random.PRNGKey(n))
    x = jax.random.normal(kx, lead + (n,), jnp.float32).astype(dtype)
    ct = jax.random.normal(kg, lead + (n,), jnp.float32)
    y, vjp = jax.vjp(lambda x: hadamard_transform(x, scale=scale), x)  # interpret mode on CPU
    (dx,) = vjp(ct.astype(dtype))
    want, vjp_ref = jax.vjp(lambda x: hadamard_reference(x, scale=scale), x.astype(jnp.float32))
    (dx_ref,) = vjp_ref(ct.astype(dtype).astype(jnp.float32))
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    s = 1.0 if scale is None else scale * n ** 0.5  # outputs are O(s)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=tol * s, rtol=tol)
    np.testing.assert_allclose(np.asarray(dx, np.float32), dx_ref, atol=tol * s, rtol=tol)


def test_factor_and_split_together():
    """n = 12 * 4096: the Paley factor ``H_12`` and the split ``H_2 (x) H_2048`` in one call,
    against ``H_12^T X H_4096`` in float64 (the dense ``[n, n]`` reference would be 9.7 GB)."""
    from pallas_kernels.hadamard.reference import factor_matrix, hadamard_matrix
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 12 * 4096), jnp.float32)
    y = hadamard_transform(x)
    xs = np.asarray(x, np.float64).reshape(3, 12, 4096)
    # optimize: two matrix products (einsum's default loops over all five indices: ~9 s of CPU)
    want = np.einsum("rij,ia,jb->rab", xs, factor_matrix(12).astype(np.float64),
                     hadamard_matrix(4096).astype(np.float64), optimize=True)
    want = want.reshape(3, -1) / np.sqrt(x.shape[-1])
    np.testing.assert_allclose(np.asarray(y), want, atol=2e-5, rtol=2e-5)


def test_wide_transforms_are_split():
    """The kernel transforms at most 2048 columns (wider rows spill registers on sm_90): a
    wider ``2^k`` becomes ``H_s (x) H_2048`` with ``H_s`` in the dense factor."""
    from pallas_kernels.hadamard.kernel import _outer_factor, kernel_split
    for n, (m, p) in ((128, (1, 128)), (2048, (1, 2048)), (4096, (2, 2048)), (16384, (8, 2048)),
                      (11008, (172, 64)), (12 * 4096, (24, 2048))):
        assert kernel_split(n) == (m, p)
        f = _outer_factor(n)
        assert f.shape == (m, m) and np.array_equal(f @ f.T, m * np.eye(m))


def test_orthonormal_round_trip_and_jit():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 2, 128))
    y = jax.jit(lambda x: hadamard_transform(hadamard_transform(x)))(x)
    np.testing.assert_allclose(y, x, atol=1e-5)  # (H / sqrt n)^2 = I for symmetric Sylvester H


def test_bad_inputs():
    with pytest.raises(ValueError, match="floating"):
        hadamard_transform(jnp.ones((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="size 6"):
        hadamard_transform(jnp.ones((2, 6), jnp.float32))
    with pytest.raises(ValueError, match="scale"):
        hadamard_transform(jnp.ones((2, 8)), scale="x")
