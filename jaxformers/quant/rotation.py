"""QuaRot's offline rotations of a Llama parameter tree (computational invariance).

With ``Q [D, D]`` orthogonal on the residual stream (``x -> x Q``) and RMSNorm scales
``s`` folded into the following linears, every block computes the same function
(RMSNorm(x Q) = RMSNorm(x) Q since ``||x Q|| = ||x||``)::

    embedding        E      -> E Q
    q, k, v, gate, up W     -> Q^T diag(s) W          (the norm before them; s -> 1)
    v (per kv head)  W_v[h] -> W_v[h] H_dh            (exact Hadamard, cancelled below)
    o                W_o    -> (H_heads (x) H_dh)^T W_o Q   (online H_heads before it)
    down             W_down -> H_ff^T W_down Q              (online H_ff before it)
    head             W_head -> Q^T diag(s_final) W_head     (s_final -> 1)

``Q = diag(+-1) H_D / sqrt(D)``: a random orthogonal Hadamard (random signs, seeded), as the
authors' ``random_hadamard_matrix``; ``D`` with no Hadamard factorisation falls back to a
random orthogonal matrix (their ``rotate_mode="random"``).  ``H_n`` are the normalised
matrices of :func:`pallas_kernels.hadamard.hadamard_matrix` (``x -> x H_n`` is what the
online :func:`hadamard_transform` computes).  q/k get an online ``H_dh`` after RoPE and need
no weight change (``q H (k H)^T = q k^T``).  A tied embedding is untied first (the head
gets its own rotated copy).  All in float64 numpy; the result is cast back to each
parameter's dtype.

Every Hadamard product is applied through the Kronecker factors of the matrix
(``H_n = H_m (x) H_64 (x) ... (x) H_{2^r}``), ``O(n (m + 64 log n) d)`` instead of the dense
``O(n^2 d)``: LLaMA-2-7B's ``H_11008`` (= ``H_172 (x) H_64``) takes ~47x fewer flops than the
dense product (7x less time measured, BENCHMARKS.md), and no dense ``[11008, 11008]`` float64
matrix (0.97 GB) is formed.
"""
from __future__ import annotations

import numpy as np

from pallas_kernels.hadamard import hadamard_matrix, split_size
from pallas_kernels.hadamard.reference import factor_matrix, sylvester

_SYLVESTER_CHUNK = 64   # the power-of-two part is applied as H_64 (x) H_64 (x) ... (x) H_rest


def normalized_hadamard(n: int) -> np.ndarray:
    return hadamard_matrix(n).astype(np.float64) / np.sqrt(n)


def hadamard_factors(n: int) -> list:
    """Float64 matrices whose Kronecker product is ``hadamard_matrix(n) / sqrt(n)``."""
    m, p = split_size(n)
    mats = [factor_matrix(m)] if m > 1 else []
    while p > 1:
        c = min(p, _SYLVESTER_CHUNK)
        mats.append(sylvester(c))
        p //= c
    return [a.astype(np.float64) / np.sqrt(a.shape[0]) for a in mats] or [np.ones((1, 1))]


def kron_left(mats, w: np.ndarray) -> np.ndarray:
    """``(M_1 (x) M_2 (x) ...)^T @ w`` for ``w [n, ...]`` (n = the product of the sizes)
    without forming the Kronecker product."""
    sizes = [a.shape[0] for a in mats]
    x = w.reshape(*sizes, -1)
    for axis, a in enumerate(mats):  # contract axis i with M_i[i, a] -> output index a
        x = np.moveaxis(np.tensordot(a, x, axes=([0], [axis])), 0, axis)
    return x.reshape(w.shape)


def kron_right(w: np.ndarray, mats) -> np.ndarray:
    """``w @ (M_1 (x) M_2 (x) ...)`` for ``w [..., n]``."""
    lead = w.shape[:-1]
    flat = w.reshape(-1, w.shape[-1])
    return kron_left(mats, flat.T).T.reshape(*lead, w.shape[-1])


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
    """``diag(+-1) H_n / sqrt(n)`` (random signs); a random orthogonal matrix (QR of a Gaussian)
    when ``n`` has no supported Hadamard factorisation."""
    try:
        split_size(n)
    except ValueError:
        q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
        return q * np.sign(np.diag(r))[None, :]
    return _signs(n, seed)[:, None] * normalized_hadamard(n)


def _signs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=n)


def _np(tree):
    if isinstance(tree, dict):
        return {k: _np(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def rotate_params(config, params, seed: int = 0):
    """Rotated, norm-folded copy of a ``llama`` params tree (numpy float64) and the residual
    rotation ``Q``.  ``config``: the llama ``TransformerConfig`` the params belong to."""
    if config.norm != "rmsnorm" or config.mlp != "swiglu":
        raise ValueError(f"QuaRot rotation needs a llama-style model (norm='rmsnorm', "
                         f"mlp='swiglu'), got norm={config.norm!r}, mlp={config.mlp!r}")
    if config.scan_layers:
        raise ValueError("scan_layers must be False for quantization (per-layer parameter trees)")
    if config.skip_gains:
        raise ValueError("skip_gains must be False for QuaRot (the gains break the invariance "
                         "of the folded norms)")
    p = _np(params)
    d, h, dh, f = config.d_model, config.n_head, config.dim_head, config.ff_dim
    Q = random_hadamard(d, seed)
    try:        # Q = diag(signs) H_d / sqrt(d): applied through the factors of H_d
        q_mats, signs = hadamard_factors(d), _signs(d, seed)
    except ValueError:
        q_mats = signs = None  # no Hadamard of size d: Q is a dense random orthogonal matrix

    def q_left(w):   # Q^T w,  w [d, ...]
        if q_mats is None:
            return np.tensordot(Q, w, axes=([0], [0]))
        return kron_left(q_mats, signs.reshape(-1, *([1] * (w.ndim - 1))) * w)

    def q_right(w):  # w Q,  w [..., d]
        return w @ Q if q_mats is None else kron_right(w * signs, q_mats)

    if config.tie_embeddings:
        p["lm_head"] = {"kernel": p["embed"]["embedding"].T.copy()}
    p["embed"]["embedding"] = q_right(p["embed"]["embedding"])
    dh_mats, ff_mats = hadamard_factors(dh), hadamard_factors(f)
    o_mats = hadamard_factors(h) + dh_mats                       # H_heads (x) H_dh
    for i in range(config.n_layer):
        blk = p[f"blocks_{i}"]
        att, mlp = blk["attn"], blk["mlp"]
        s = blk["attn_norm"]["scale"]
        for name in ("q", "k", "v"):
            w = att[name]["kernel"]
            att[name]["kernel"] = q_left(s[:, None] * w.reshape(d, -1)).reshape(w.shape)
        att["v"]["kernel"] = kron_right(att["v"]["kernel"], dh_mats)
        wo = att["o"]["kernel"]
        att["o"]["kernel"] = q_right(kron_left(o_mats, wo.reshape(h * dh, d))).reshape(wo.shape)
        blk["attn_norm"]["scale"] = np.ones_like(s)
        s = blk["mlp_norm"]["scale"]
        for name in ("gate", "up"):
            mlp[name]["kernel"] = q_left(s[:, None] * mlp[name]["kernel"])
        mlp["down"]["kernel"] = q_right(kron_left(ff_mats, mlp["down"]["kernel"]))
        blk["mlp_norm"]["scale"] = np.ones_like(s)
    s = p["final_norm"]["scale"]
    p["lm_head"]["kernel"] = q_left(s[:, None] * p["lm_head"]["kernel"])
    p["final_norm"]["scale"] = np.ones_like(s)
    return p, Q
