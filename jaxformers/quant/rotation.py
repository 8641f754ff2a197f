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
no weight change (``q H (k H)^T = q k^T``).

``qkv_bias`` / ``qk_norm`` (Qwen2 / Qwen3) are supported: ``Q`` only changes the projections'
inputs (``x Q`` times ``Q^T W``), not their outputs, so the q/k biases and the per-head q/k
RMSNorm scales (applied to those outputs, before RoPE and the online ``H_dh``) stay as they
are; v's outputs are rotated per head by ``H_dh`` (cancelled in ``W_o``), so its bias
``b_v [Hkv, Dh]`` becomes ``b_v H_dh``.  A tied embedding is untied first (the head
gets its own rotated copy).

Deviation from the authors' code (spcl/QuaRot ``rotation_utils.py``): they fold the exact
``H_{H dh}`` of the whole attention width into ``W_o`` (``had_dim=-1``) while the online
transform runs across the heads only; that product equals ``H_heads (x) H_dh`` (the ``H_dh``
in ``W_v`` and the online ``H_heads``) only for Sylvester (power-of-two) sizes.  Here ``W_o``
gets ``H_heads (x) H_dh`` itself, which is exact for any supported sizes; non-power-of-two
head dims are supported too (their q/k rotation asserts a power of two).

All in float64 (the authors' precision), one block at a time (:class:`Rotation`), as jitted
XLA computations on the default device (the accelerator when there is one; the host CPU
where the default backend has no float64, i.e. TPU), under a scoped ``jax.enable_x64``: the
user's x64 setting is left alone.  The caller casts the result back to each parameter's
dtype.

Every Hadamard product is applied through the Kronecker factors of the matrix
(``H_n = H_m (x) H_64 (x) ... (x) H_{2^r}``), ``O(n (m + 64 log n) d)`` instead of the dense
``O(n^2 d)``: LLaMA-2-7B's ``H_11008`` (= ``H_172 (x) H_64``) takes ~47x fewer flops than the
dense product (7x less time measured, BENCHMARKS.md), and no dense ``[11008, 11008]`` float64
matrix (0.97 GB) is formed.  Jitted, a LLaMA-2-7B block takes half the time the same
products took in numpy float64 on 2 CPU cores (a third without the copies in and out;
BENCHMARKS.md).
"""
from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.hadamard import hadamard_matrix, split_size
from pallas_kernels.hadamard.reference import factor_matrix, sylvester

from ..utils import is_int

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


def kron_left(mats, w):
    """``(M_1 (x) M_2 (x) ...)^T @ w`` for ``w [n, ...]`` (n = the product of the sizes)
    without forming the Kronecker product (jax.numpy: traceable)."""
    sizes = [a.shape[0] for a in mats]
    x = w.reshape(*sizes, -1)
    for axis, a in enumerate(mats):  # contract axis i with M_i[i, a] -> output index a
        x = jnp.moveaxis(jnp.tensordot(a, x, axes=([0], [axis])), 0, axis)
    return x.reshape(w.shape)


def kron_right(w, mats):
    """``w @ (M_1 (x) M_2 (x) ...)`` for ``w [..., n]``."""
    lead = w.shape[:-1]
    flat = w.reshape(-1, w.shape[-1])
    return kron_left(mats, flat.T).T.reshape(*lead, w.shape[-1])


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
    """``diag(+-1) H_n / sqrt(n)`` (random signs); a random orthogonal matrix (QR of a Gaussian)
    when ``n`` has no supported Hadamard factorisation."""
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int (the matrix size), got {n!r}")
    _check_seed(seed)
    try:
        split_size(n)
    except ValueError:
        q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
        return q * np.sign(np.diag(r))[None, :]
    return _signs(n, seed)[:, None] * normalized_hadamard(n)


def _check_seed(seed) -> int:
    """``seed`` as an int >= 0, else a ``ValueError`` naming it (None drew fresh random signs:
    a ``Q`` that :meth:`Rotation.q_matrix` could not give back)."""
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0 (the random signs of Q), got {seed!r}")
    return int(seed)


def _signs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=n)


def float64_tree(tree):
    """A float64 numpy copy of a (nested mapping) params tree, as plain dicts."""
    if isinstance(tree, Mapping):
        return {k: float64_tree(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def _dicts(tree):
    """A (nested mapping) params tree as plain dicts (FrozenDict in, dict out; leaves kept)."""
    return {k: _dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


# ----------------------------------------------------------------------------- jitted parts
# ``q``: the residual rotation, {"mats": Kronecker factors of H_d / sqrt(d), "signs": [d]}
# or {"dense": Q [d, d]} (no Hadamard of size d).  Everything float64 (called under x64).
def _q_left(q, w):    # Q^T w,  w [d, ...]
    if "dense" in q:
        return jnp.tensordot(q["dense"], w, axes=([0], [0]))
    return kron_left(q["mats"], q["signs"].reshape(-1, *([1] * (w.ndim - 1))) * w)


def _q_right(q, w):   # w Q,  w [..., d]
    return w @ q["dense"] if "dense" in q else kron_right(w * q["signs"], q["mats"])


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


@jax.jit
def _rotate_embed(q, e):
    return _q_right(q, _f64(e))


@jax.jit
def _rotate_head(q, w, s):
    w, s = _f64(w), _f64(s)
    return _q_left(q, s[:, None] * w), jnp.ones_like(s)


@jax.jit
def _rotate_block(q, mats, blk):
    """One block's params rotated and norm-folded (float64; see the module doc)."""
    blk = _f64(blk)
    att, mlp = blk["attn"], blk["mlp"]
    d = blk["attn_norm"]["scale"].shape[0]
    s = blk["attn_norm"]["scale"]
    for name in ("q", "k", "v"):
        w = att[name]["kernel"]
        att[name]["kernel"] = _q_left(q, s[:, None] * w.reshape(d, -1)).reshape(w.shape)
    att["v"]["kernel"] = kron_right(att["v"]["kernel"], mats["dh"])
    if "bias" in att["v"]:  # qkv_bias: v's outputs are rotated per head, so is its bias [Hkv, Dh]
        att["v"]["bias"] = kron_right(att["v"]["bias"], mats["dh"])
    wo = att["o"]["kernel"]
    att["o"]["kernel"] = _q_right(q, kron_left(mats["o"], wo.reshape(-1, d))).reshape(wo.shape)
    blk["attn_norm"]["scale"] = jnp.ones_like(s)
    s = blk["mlp_norm"]["scale"]
    for name in ("gate", "up"):
        mlp[name]["kernel"] = _q_left(q, s[:, None] * mlp[name]["kernel"])
    mlp["down"]["kernel"] = _q_right(q, kron_left(mats["ff"], mlp["down"]["kernel"]))
    blk["mlp_norm"]["scale"] = jnp.ones_like(s)
    return blk


def rotation_device():
    """Where :class:`Rotation` computes: the default device, or the host CPU where the default
    backend has no float64 (TPU)."""
    dev = jax.devices()[0]
    return jax.devices("cpu")[0] if dev.platform == "tpu" else dev


class Rotation:
    """QuaRot's offline rotation of a ``llama`` params tree, one part at a time: each method
    takes the original (any dtype) part and returns the rotated, norm-folded part as float64
    numpy arrays, so that no more than one block is ever held in float64 (a LLaMA-2-7B block
    is 1.6 GB in float64, the whole model 54 GB).  ``config``: the llama ``TransformerConfig``
    the params belong to; ``seed``: the random signs of ``Q``.  The products run jitted in
    float64 on :func:`rotation_device` (the parts are copied there and the results back)."""

    def __init__(self, config, seed: int = 0):
        model = getattr(config, "model", None)
        if model not in ("llama", "quarot"):
            raise ValueError(f"config must be a 'llama' (or unrotated 'quarot') config, got model={model!r}")
        if model == "quarot" and (config.rotated or config.int_linears):
            raise ValueError(f"config is an already quantized quarot model (rotated={config.rotated}, "
                             f"int_linears={config.int_linears}): rotate the original llama params instead")
        if config.norm != "rmsnorm" or config.mlp != "swiglu":
            raise ValueError(f"QuaRot rotation needs a llama-style model (norm='rmsnorm', "
                             f"mlp='swiglu'), got norm={config.norm!r}, mlp={config.mlp!r}")
        if config.scan_layers:
            raise ValueError("scan_layers must be False for quantization (per-layer parameter trees)")
        if config.skip_gains:
            raise ValueError("skip_gains must be False for QuaRot (the gains break the invariance "
                             "of the folded norms)")
        seed = _check_seed(seed)
        self.config, self.seed = config, seed
        d, h, dh, f = config.d_model, config.n_head, config.dim_head, config.ff_dim
        try:        # Q = diag(signs) H_d / sqrt(d): applied through the factors of H_d
            self._q = {"mats": hadamard_factors(d), "signs": _signs(d, seed)}
        except ValueError:  # no Hadamard of size d: Q is a dense random orthogonal matrix
            self._q = {"dense": random_hadamard(d, seed)}
        mats = {}
        for name, n in (("head_dim", dh), ("n_head", h), ("d_ff", f)):  # exact Hadamards: no fallback
            try:
                mats[name] = hadamard_factors(n)
            except ValueError as e:
                raise ValueError(f"{name}={n}: QuaRot's exact Hadamard on it does not exist here ({e})") from None
        self._mats = {"dh": mats["head_dim"], "o": mats["n_head"] + mats["head_dim"],   # H_heads (x) H_dh
                      "ff": mats["d_ff"]}
        self.device = rotation_device()

    def q_matrix(self) -> np.ndarray:
        """``Q [D, D]`` (dense float64, for inspection; the methods never form it)."""
        return random_hadamard(self.config.d_model, self.seed)

    def _run(self, fn, *args):
        """``fn(q, *args)`` jitted in float64 on ``self.device``, as numpy (scoped x64)."""
        with jax.enable_x64(True):
            q, args = jax.device_put((self._q, args), self.device)
            return jax.tree_util.tree_map(np.asarray, fn(q, *args))

    def embed(self, params) -> dict:
        """``{"embedding": E Q}`` and the other entries of the whole tree's ``embed``
        (float64)."""
        e = float64_tree({k: v for k, v in params["embed"].items() if k != "embedding"})
        e["embedding"] = self._run(_rotate_embed, params["embed"]["embedding"])
        return e

    def head(self, params) -> dict:
        """``{"lm_head": {"kernel": Q^T diag(s) W_head}, "final_norm": {"scale": 1}}``; a tied
        embedding is untied (the head gets its own rotated copy of ``E^T``)."""
        if self.config.tie_embeddings:
            w = jnp.asarray(params["embed"]["embedding"]).T
        else:
            w = params["lm_head"]["kernel"]
        kernel, ones = self._run(_rotate_head, w, params["final_norm"]["scale"])
        return {"lm_head": {"kernel": kernel}, "final_norm": {"scale": ones}}

    def block(self, blk) -> dict:
        """One block's params (``params["blocks_i"]``), rotated and norm-folded (float64)."""
        return self._run(_rotate_block, self._mats, _dicts(blk))


def rotate_params(config, params, seed: int = 0):
    """Rotated, norm-folded copy of a whole ``llama`` params tree (numpy float64) and the
    residual rotation ``Q``.  ``config``: the llama ``TransformerConfig`` the params belong to.
    (:func:`jaxformers.quant.quantize` goes block by block through :class:`Rotation` instead.)
    ``params`` as :func:`~jaxformers.quant.quantize` takes them: boxed (``module.init``) or not,
    or the ``{"params": ...}`` variables."""
    rot = Rotation(config, seed)
    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:  # module.init's variables
        params = params["params"]
    p = {k: float64_tree(v) for k, v in params.items()   # any other top-level entry (unrotated)
         if k not in ("embed", "lm_head", "final_norm") and not k.startswith("blocks_")}
    p["embed"] = rot.embed(params)
    p.update(rot.head(params))
    for i in range(config.n_layer):
        p[f"blocks_{i}"] = rot.block(params[f"blocks_{i}"])
    return p, rot.q_matrix()
