"""Dense Hadamard matrices and the float32 reference transform.

``hadamard_matrix(n)`` is ``H_m (x) H_{2^k}`` for ``n = m * 2^k``: ``H_{2^k}`` the Sylvester
matrix (``H_2 = [[1, 1], [1, -1]]``, ``H_{2a} = H_2 (x) H_a``, symmetric) and ``H_m`` (m > 1,
not a power of two) a Paley matrix:

* Paley I, ``m = q + 1`` for a prime ``q = 3 (mod 4)``:  ``H = I + [[0, 1^T], [-1, Q]]``,
* Paley II, ``m = 2 (q + 1)`` for a prime ``q = 1 (mod 4)``: ``S = [[0, 1^T], [1, Q]]`` with
  every 0 replaced by ``[[1, -1], [-1, -1]]`` and every +-1 by ``+-[[1, 1], [1, -1]]``,

with ``Q[i, j] = chi(j - i)`` the Jacobsthal matrix (``chi`` the quadratic character mod q),
or, for the orders no Paley construction reaches (52, 92, 100, 116, 156, 172, 244), a
Goethals-Seidel array of four circulants (:mod:`.goethals_seidel`; 172 gives LLaMA-2-7B's
``11008 = 172 * 64``).  Every entry is +-1 and ``H H^T = n I``.  ``H_m`` is not symmetric, so
neither is ``H_n`` then.  Factors up to 256 except 188 and 236 (and their multiples by
powers of two) are covered.

Deviation from the authors' code (spcl/QuaRot ``hadamard_utils.py``): they store fixed
tables for 12, 20, 28, 36, 40, 52, 60, 108, 140, 156 and 172 and pick the factor from the
size; we *construct* the Paley factors and store only the four first rows of each
Goethals-Seidel factor, found by our own search (:func:`.goethals_seidel.find_sequences`),
so our matrices are Hadamard but not the same ones.  Any Hadamard matrix gives the same
computational invariance; only the incoherence constants differ.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import goethals_seidel

MAX_FACTOR = 256  # largest non-power-of-two factor m searched


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)])
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley_kind(m: int):
    if m % 4 or m & (m - 1) == 0:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2
    return None


@functools.lru_cache(maxsize=None)
def _paley(m: int) -> np.ndarray:
    kind = _paley_kind(m)
    if kind == 1:
        q = m - 1
        s = np.zeros((m, m), np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        h = np.eye(m, dtype=np.int64) + s
    else:
        q = m // 2 - 1
        s = np.zeros((q + 1, q + 1), np.int64)
        s[0, 1:] = 1
        s[1:, 0] = 1
        s[1:, 1:] = _jacobsthal(q)
        zero = np.array([[1, -1], [-1, -1]])
        one = np.array([[1, 1], [1, -1]])
        h = np.block([[zero if v == 0 else v * one for v in row] for row in s])
    assert np.array_equal(h @ h.T, m * np.eye(m, dtype=np.int64)), m
    return h


def factor_sizes():
    """The non-power-of-two factors ``m`` (<= :data:`MAX_FACTOR`) we can build."""
    tabled = set(goethals_seidel.sizes())
    return [m for m in range(4, MAX_FACTOR + 1, 4) if _paley_kind(m) or m in tabled]


def split_size(n: int):
    """``n -> (m, 2^k)`` with ``n = m * 2^k`` (``m = 1`` for powers of two); ``ValueError``
    when ``n`` has no supported factorisation."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the transformed size must be a positive int, got {n!r}")
    n = int(n)
    if n & (n - 1) == 0:
        return 1, n
    for m in factor_sizes():  # the smallest factor: most of the work in the fast 2^k part
        p = n // m
        if n % m == 0 and p & (p - 1) == 0:
            return m, p
    raise ValueError(
        f"no Hadamard matrix of size {n}: the size must be m * 2^k with m = 1 or a supported "
        f"factor m in {factor_sizes()} (with the powers of two: every multiple of 4 up to "
        f"{MAX_FACTOR} except 188 and 236)")


@functools.lru_cache(maxsize=None)
def sylvester(n: int) -> np.ndarray:
    """``H_n`` (n a power of two), +-1 entries, symmetric."""
    h = np.ones((1, 1), np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def factor_matrix(m: int) -> np.ndarray:
    """``H_m`` for a supported non-power-of-two ``m`` (+-1 entries, int64): Paley where a
    Paley construction exists, else the Goethals-Seidel table."""
    if m == 1:
        return np.ones((1, 1), np.int64)
    return _paley(m) if _paley_kind(m) else goethals_seidel.matrix(m)


def hadamard_matrix(n: int) -> np.ndarray:
    """Unnormalised ``H_n = H_m (x) H_{2^k}`` (int64 +-1, ``H H^T = n I``)."""
    m, p = split_size(n)
    return np.kron(factor_matrix(m), sylvester(p))


def hadamard_reference(x, *, scale=None):
    """``scale * x @ H_n`` over the last axis in float32 (``scale`` defaults to ``n ** -0.5``,
    the orthonormal transform).  x ``[..., n]`` -> float32 ``[..., n]``.  Checked as
    :func:`~.kernel.hadamard_transform` checks its arguments (a floating ``x``; a concrete
    ``scale`` a finite real number, else ``ValueError``); a traced ``scale`` is used unchecked (the
    oracle is plain JAX and may be differentiated in it)."""
    from .kernel import _static_scale

    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or getattr(x, "ndim", 0) < 1:
        raise ValueError(f"x must be a floating-point array [..., n], got dtype {dtype} and "
                         f"shape {getattr(x, 'shape', None)}")
    n = x.shape[-1]
    h = jnp.asarray(hadamard_matrix(n), jnp.float32)
    if isinstance(scale, jax.core.Tracer):
        s = scale
    else:
        s = n ** -0.5 if scale is None else _static_scale(scale)
    return jnp.matmul(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST) * s


def hadamard_factored(x):
    """``x @ H_n / sqrt(n)`` over the last axis in plain XLA, float32 inside, ``x``'s dtype out,
    without forming ``H_n`` (``[11008, 11008]`` would be 484 MB): ``H_n = H_m (x) H_p``
    (:func:`hadamard_matrix`) applied as ``log2 p`` butterflies on the power-of-two part and
    one ``[m, m]`` matmul for the factor, ``O(n (m + log n))`` a row.  x ``[..., n]``.  (QuaRot's
    online Hadamard off GPU / TPU; :func:`hadamard_reference` is the dense oracle.)"""
    n = x.shape[-1]
    m, p = split_size(n)
    y = x.astype(jnp.float32).reshape(-1, m, p)
    h = 1
    while h < p:  # H_2 on bit log2(h) of the column index: Sylvester's H_p after all of them
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:  # y[a, :] = sum_i H_m[i, a] y[i, :]
        y = jnp.einsum("rip,ia->rap", y, jnp.asarray(factor_matrix(m), jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (y * n ** -0.5).reshape(x.shape).astype(x.dtype)
