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
"""
from __future__ import annotations

import numpy as np

from pallas_kernels.hadamard import hadamard_matrix, split_size


def normalized_hadamard(n: int) -> np.ndarray:
    return hadamard_matrix(n).astype(np.float64) / np.sqrt(n)


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
    """``diag(+-1) H_n / sqrt(n)`` (random signs); a random orthogonal matrix (QR of a Gaussian)
    when ``n`` has no supported Hadamard factorisation."""
    rng = np.random.default_rng(seed)
    try:
        split_size(n)
    except ValueError:
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return q * np.sign(np.diag(r))[None, :]
    signs = rng.choice([-1.0, 1.0], size=n)
    return signs[:, None] * normalized_hadamard(n)


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
    d, h, hkv, dh, f = config.d_model, config.n_head, config.kv_heads, config.dim_head, config.ff_dim
    Q = random_hadamard(d, seed)
    if config.tie_embeddings:
        p["lm_head"] = {"kernel": p["embed"]["embedding"].T.copy()}
    p["embed"]["embedding"] = p["embed"]["embedding"] @ Q
    h_dh, h_ff = normalized_hadamard(dh), normalized_hadamard(f)
    h_o = np.kron(normalized_hadamard(h), h_dh)                 # [H*Dh, H*Dh]
    for i in range(config.n_layer):
        blk = p[f"blocks_{i}"]
        att, mlp = blk["attn"], blk["mlp"]
        s = blk["attn_norm"]["scale"]
        for name in ("q", "k", "v"):
            w = att[name]["kernel"]
            att[name]["kernel"] = (Q.T @ (s[:, None] * w.reshape(d, -1))).reshape(w.shape)
        att["v"]["kernel"] = np.einsum("dhk,kj->dhj", att["v"]["kernel"], h_dh)
        wo = att["o"]["kernel"]
        att["o"]["kernel"] = (h_o.T @ wo.reshape(h * dh, d) @ Q).reshape(wo.shape)
        blk["attn_norm"]["scale"] = np.ones_like(s)
        s = blk["mlp_norm"]["scale"]
        for name in ("gate", "up"):
            mlp[name]["kernel"] = Q.T @ (s[:, None] * mlp[name]["kernel"])
        mlp["down"]["kernel"] = h_ff.T @ mlp["down"]["kernel"] @ Q
        blk["mlp_norm"]["scale"] = np.ones_like(s)
    s = p["final_norm"]["scale"]
    p["lm_head"]["kernel"] = Q.T @ (s[:, None] * p["lm_head"]["kernel"])
    p["final_norm"]["scale"] = np.ones_like(s)
    del hkv
    return p, Q
