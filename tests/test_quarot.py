"""QuaRot (jaxformers.quant): computational invariance of the rotations, the quantizers,
GPTQ, int4 packing, the int8 path, integer weight storage and the quantize() entry point."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.quant import (QuantSpec, fake_quant, gptq_weight, gptq_weight_reference, int8_linear,
                              pack_int4, quantize, quantize_rows_int8, rtn_weight, unpack_int4)


def _model(**over):
    """A llama config and random params (numpy, no init compile), with non-trivial norm scales
    so that folding them is exercised."""
    from jaxformers.utils import abstract_params
    cfg = jf.get_config("llama", "tiny", **over)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray((1 + 0.5 * rng.standard_normal(x.shape)) if str(path[-1].key) == "scale"
                                    else 0.05 * rng.standard_normal(x.shape), jnp.float32),
        abstract_params(jf.build(cfg)))
    return cfg, params


def _apply(cfg, params, tokens):
    return jax.jit(jf.build(cfg).apply)({"params": params}, tokens)


TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 256)


@pytest.fixture(scope="module")
def tiny():
    return _model()


# (overrides): the tiny llama (GQA 4/2, d_ff 352 = 44 * 8: a Paley factor), and 12 heads /
# 4 kv heads / head dim 16 (d 192 = 12 * 16, d_ff 384 = 12 * 32, the heads transform is H_12),
# and Goethals-Seidel factors everywhere (d 208 = 52 * 4, head dim 52, d_ff 688 = 172 * 4:
# LLaMA-2-7B's 11008 = 172 * 64 uses the same H_172)
@pytest.mark.parametrize("over", [{}, dict(d_model=192, n_head=12, n_kv_head=4, head_dim=16,
                                           d_ff=384, tie_embeddings=True),
                                  dict(d_model=208, n_head=4, n_kv_head=2, head_dim=52, d_ff=688)])
def test_rotation_is_invariant(over):
    cfg, params = _model(**over)
    ref = _apply(cfg, params, TOKENS)
    qcfg, qparams = quantize(cfg, params, QuantSpec(rotate=True, seed=1))
    assert qcfg.rotated and not qcfg.tie_embeddings
    got = _apply(qcfg, qparams, TOKENS)
    np.testing.assert_allclose(got, ref, atol=1e-5 * float(jnp.abs(ref).max()))
    # the norms are folded and the weights actually changed
    assert np.allclose(qparams["blocks_0"]["attn_norm"]["scale"], 1.0)
    assert not np.allclose(qparams["blocks_0"]["attn"]["q"]["kernel"],
                           params["blocks_0"]["attn"]["q"]["kernel"])


@pytest.mark.parametrize("over", [dict(tie_embeddings=True),
                                  dict(d_model=208, n_head=4, n_kv_head=2, head_dim=52, d_ff=688),
                                  dict(d_model=90, n_head=4, n_kv_head=2, head_dim=16)])
def test_rotation_equals_the_dense_formulas(over):
    """The jitted, Kronecker-factored float64 rotation == the module doc's formulas written with
    dense numpy float64 matrices: ``Q`` (``q_matrix``), ``H_dh``, ``H_heads (x) H_dh``,
    ``H_ff``; checks where each rotation goes and the factor order.  Cases: a tied embedding
    (untied into the head), Goethals-Seidel factors (52, 172), and d = 90, which has no
    Hadamard matrix (``Q`` is then a dense random orthogonal matrix)."""
    from jaxformers.quant.rotation import Rotation, normalized_hadamard, rotate_params
    cfg, params = _model(**over)
    d, h, dh = cfg.d_model, cfg.n_head, cfg.dim_head
    got, q = rotate_params(cfg, params, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(d), atol=1e-12)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    h_dh, h_ff = normalized_hadamard(dh), normalized_hadamard(cfg.ff_dim)
    h_o = np.kron(normalized_hadamard(h), h_dh)
    e = p["embed"]["embedding"]
    want = {"embed": {"embedding": e @ q},
            "lm_head": {"kernel": q.T @ (p["final_norm"]["scale"][:, None]
                                         * (e.T if cfg.tie_embeddings else p["lm_head"]["kernel"]))},
            "final_norm": {"scale": np.ones(d)}}
    for i in range(cfg.n_layer):
        b = p[f"blocks_{i}"]
        sa, sm = b["attn_norm"]["scale"][:, None], b["mlp_norm"]["scale"][:, None]
        att = {n: {"kernel": (q.T @ (sa * b["attn"][n]["kernel"].reshape(d, -1))).reshape(
            b["attn"][n]["kernel"].shape)} for n in "qkv"}
        att["v"]["kernel"] = att["v"]["kernel"] @ h_dh
        att["o"] = {"kernel": (h_o.T @ b["attn"]["o"]["kernel"].reshape(h * dh, d) @ q).reshape(h, dh, d)}
        mlp = {n: {"kernel": q.T @ (sm * b["mlp"][n]["kernel"])} for n in ("gate", "up")}
        mlp["down"] = {"kernel": h_ff.T @ b["mlp"]["down"]["kernel"] @ q}
        want[f"blocks_{i}"] = {"attn_norm": {"scale": np.ones(d)}, "mlp_norm": {"scale": np.ones(d)},
                               "attn": att, "mlp": mlp}
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for path, a in jax.tree_util.tree_leaves_with_path(got):
        b = functools.reduce(lambda t, k: t[k.key], path, want)
        assert a.dtype == np.float64 and a.shape == b.shape, path
        np.testing.assert_allclose(a, b, atol=1e-12 * np.abs(b).max(), err_msg=str(path))
    # the user's x64 setting is left as it was
    assert jnp.asarray(1.0).dtype == (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    assert Rotation(cfg).device.platform == jax.devices()[0].platform


def test_rotated_model_with_kernel_and_decoding(tiny):
    """The online Hadamards through the Pallas kernel (interpret mode) and KV-cache decoding
    match the dense path."""
    from jaxformers.decoding import init_cache
    cfg, params = tiny
    qcfg, qparams = quantize(cfg, params, QuantSpec(rotate=True))
    dense = _apply(qcfg, qparams, TOKENS[:1, :8])
    kern = _apply(qcfg.replace(hadamard_impl="pallas"), qparams, TOKENS[:1, :8])
    np.testing.assert_allclose(kern, dense, atol=1e-5)
    model = jf.build(qcfg)
    cache = init_cache(model, 1, 8)
    fn = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    _, cache = fn(qparams, TOKENS[:1, :7], cache)
    last, _ = fn(qparams, TOKENS[:1, 7:8], cache)
    np.testing.assert_allclose(last[:, 0], dense[:, 7], atol=1e-5)


@pytest.mark.parametrize("sym", [True, False])
def test_fake_quant_grid(sym):
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 32)) * jnp.arange(1, 33)
    y = fake_quant(x, 4, groupsize=8, sym=sym)
    for row, xrow in zip(np.asarray(y).reshape(-1, 8), np.asarray(x).reshape(-1, 8)):
        assert len(np.unique(row)) <= 16
        assert np.max(np.abs(row - xrow)) <= (np.ptp(xrow) if not sym else 2 * np.abs(xrow).max()) / 14 + 1e-6
    err = [float(jnp.abs(fake_quant(x, b, sym=sym) - x).mean()) for b in (3, 4, 8)]
    assert err[0] > err[1] > err[2] > 0
    assert fake_quant(x, 16) is x
    with pytest.raises(ValueError, match="groupsize"):
        fake_quant(x, 4, groupsize=5)
    with pytest.raises(ValueError, match="bits"):
        fake_quant(x, 1)


def test_pack_int4_round_trip():
    q = jax.random.randint(jax.random.PRNGKey(0), (3, 5, 16), -8, 8).astype(jnp.int8)
    p = pack_int4(q)
    assert p.dtype == jnp.uint8 and p.shape == (3, 5, 8)
    np.testing.assert_array_equal(unpack_int4(p), q)
    with pytest.raises(ValueError, match="even"):
        pack_int4(q[..., :3])


def test_int8_linear_equals_fake_quant():
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (2, 5, 64))
    w = np.asarray(jax.random.normal(kw, (64, 48)))
    deq, q, s, _ = rtn_weight(w, 8, clip_search=False, return_int=True)
    y = int8_linear(x, jnp.asarray(q, jnp.int8), jnp.asarray(s[0], jnp.float32))
    ref = jnp.matmul(fake_quant(x, 8), jnp.asarray(deq, jnp.float32), precision="highest")
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    qx, sx = quantize_rows_int8(x)
    assert qx.dtype == jnp.int8 and sx.shape == (2, 5, 1)


def test_clip_search_and_gptq_reduce_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32))
    w[3, :] *= 8  # an outlier input row
    plain = rtn_weight(w, 3, clip_search=False)
    clipped = rtn_weight(w, 3, clip_search=True)
    assert np.sum(np.abs(clipped - w) ** 2.4) < np.sum(np.abs(plain - w) ** 2.4)
    # correlated calibration inputs: GPTQ minimises the output error ||X W - X Q||
    x = rng.standard_normal((512, 16)) @ rng.standard_normal((16, 64)) + 0.1 * rng.standard_normal((512, 64))
    g = gptq_weight(w, x.T @ x, 3, groupsize=16)
    r = rtn_weight(w, 3, groupsize=16)
    assert np.linalg.norm(x @ (g - w)) < 0.7 * np.linalg.norm(x @ (r - w))


@pytest.mark.parametrize("sym, grid", [(True, 100), (False, 100), (True, 20)])
def test_clip_search_is_the_authors_grid(sym, grid):
    """The weights' clipping search tries the authors' ratios ``1 - i / grid``, ``i < 0.8 grid``
    (``WeightQuantizer(grid=100, maxshrink=0.8)``: 80 ratios, 1.0 .. 0.21) and keeps the first
    of equal errors: each row's scale == a brute-force numpy search over those ratios."""
    from jaxformers.quant.quantizers import clip_ratios, quant_params, quantize_int
    ratios = clip_ratios(grid)
    assert len(ratios) == int(0.8 * grid) and ratios[0] == 1.0
    assert ratios[-1] == pytest.approx(1 - (int(0.8 * grid) - 1) / grid)   # grid 100: 0.21
    w = np.random.default_rng(grid).standard_normal((48, 24))
    w[3] *= 8                                                          # an outlier input
    _, _, scale, zero = rtn_weight(w, 3, sym=sym, clip_grid=grid, return_int=True, dtype=jnp.float32)
    x = w.T.astype(np.float32)                                         # rows = output channels
    errs = []
    for c in ratios:
        s, z, lo, hi = quant_params(x, 3, sym=sym, clip=np.float32(c), xp=np)
        errs.append(np.sum(np.abs((quantize_int(x, s, z, lo, hi, xp=np) - z) * s - x) ** 2.4, -1))
    errs = np.stack(errs, -1)                                          # [out, ratios]
    decisive = np.sort(errs, -1)[:, 1] > errs.min(-1) * (1 + 1e-4)      # no float32 near-tie
    best = np.asarray(ratios)[np.argmin(errs, -1)]
    want = quant_params(x, 3, sym=sym, clip=best[:, None], xp=np)[0][:, 0]
    assert decisive.mean() > 0.8
    np.testing.assert_allclose(scale[0][decisive], want[decisive], rtol=1e-5)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="clip_grid"):
            rtn_weight(w, 3, clip_grid=bad)
        with pytest.raises(ValueError, match="clip_grid"):
            gptq_weight(w, w @ w.T, 3, clip_grid=bad)
        with pytest.raises(ValueError, match="w_clip_grid"):
            QuantSpec(w_bits=4, w_clip_grid=bad)


@pytest.mark.parametrize("shape, groupsize, sym, clip", [((64, 32), None, True, True),
                                                          ((96, 5), 32, False, True),
                                                          ((48, 7), 16, True, False),
                                                          ((200, 3), None, False, False)])
def test_rtn_equals_the_numpy_reference(shape, groupsize, sym, clip):
    """The jitted RTN == the numpy float64 version: in float64 the same integers, scales and
    zeros; in float32 (default) the same up to near-ties."""
    from jaxformers.quant import rtn_weight_reference
    w = np.random.default_rng(shape[0]).standard_normal(shape)
    w[3] *= 8                                                          # an outlier input
    kw = dict(groupsize=groupsize, sym=sym, clip_search=clip, return_int=True,
              clip_grid=20 if shape[1] == 5 else 100)
    ref = rtn_weight_reference(w, 4, **kw)
    with jax.enable_x64(True):
        got = rtn_weight(w, 4, dtype=jnp.float64, **kw)
    np.testing.assert_array_equal(got[1], ref[1])
    for a, b in zip(got[::2] + got[3:], ref[::2] + ref[3:]):           # deq, scale, zero
        assert a.shape == b.shape and a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())
    g32 = rtn_weight(w, 4, **kw)
    assert g32[0].dtype == np.float32 and g32[1].dtype == np.int32
    assert (g32[1] != ref[1]).mean() < 0.01
    same = g32[1] == ref[1]
    np.testing.assert_allclose(g32[0][same], ref[0][same], rtol=1e-5, atol=1e-6 * np.abs(ref[0]).max())
    assert np.all(np.abs(g32[0] - ref[0]) <= 1.01 * np.abs(ref[2]).max())  # a flip: one step
    with pytest.raises(ValueError, match="groupsize"):
        rtn_weight(w, 4, groupsize=7)
    with pytest.raises(ValueError, match="dtype"):
        rtn_weight(w, 4, dtype=jnp.int8)
    with pytest.raises(ValueError, match="2-D"):
        rtn_weight(w[0], 4)


def _gptq_problem(n, out, seed=0):
    """A weight ``[n, out]`` with an outlier input, correlated calibration inputs ``x`` and
    their Hessian ``x^T x``, input 3 never active (dead)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, out))
    w[5] *= 6
    x = rng.standard_normal((3 * n, 16)) @ rng.standard_normal((16, n))
    x += 0.1 * rng.standard_normal((3 * n, n))
    x[:, 3] = 0
    return w, x, x.T @ x


@pytest.mark.parametrize("n, out, groupsize, sym, clip, blocksize", [
    (64, 32, None, True, True, 128),    # one block wider than the matrix
    (200, 1, None, False, True, 64),    # in not a multiple of the block; one output channel
    (96, 16, 32, True, True, 64),       # groups inside blocks; the last block padded
    (256, 8, 128, False, True, 48),     # groups spanning blocks (blocks of 32 | 128)
    (150, 5, 30, True, False, 64),      # odd sizes: groups of 30 in blocks of 60
    (2048, 3, 256, False, True, 128),   # 2 chunks of blocks; groups wider than a block
    (2304, 2, None, True, True, 128)])  # 2 chunks; per-channel parameters from chunk 0
def test_gptq_equals_the_one_column_reference(n, out, groupsize, sym, clip, blocksize):
    """The jitted blocked GPTQ (lazy batches, padding, groups) is the one-column-at-a-time
    numpy algorithm: in float64 the same integers, scales and zeros; in float32 (default)
    the same output error up to rounding."""
    w, x, h = _gptq_problem(n, out, seed=n + out)
    kw = dict(groupsize=groupsize, sym=sym, clip_search=clip)
    ref = gptq_weight_reference(w, h, 4, **kw)
    with jax.enable_x64(True):
        got = gptq_weight(w, h, 4, blocksize=blocksize, return_int=True, dtype=jnp.float64, **kw)
    np.testing.assert_array_equal(got[1], ref[1])
    for a, b in zip(got[::2] + got[3:], ref[::2] + ref[3:]):       # deq, scale, zero
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())
    assert np.all(ref[0][3] == 0)                                     # the dead input
    g32 = gptq_weight(w, h, 4, blocksize=blocksize, return_int=True, **kw)
    assert g32[0].dtype == np.float32 and (g32[1] != ref[1]).mean() < 0.02   # near-ties may flip

    def err(d):
        return np.linalg.norm(x @ (d - w))
    # float32 rounding flips a few codes near .5 and GPTQ carries each flip into the later
    # columns: the output error moves by a few percent (3.6% at 2304 inputs, grid 100)
    assert abs(err(g32[0]) - err(ref[0])) < 0.05 * err(ref[0])
    assert max(err(ref[0]), err(g32[0])) < 0.7 * err(rtn_weight(w, 4, **kw))


@pytest.mark.parametrize("groupsize", [None, 32])
def test_gptq_act_order(groupsize):
    """``act_order``: inputs quantized by decreasing ``H_jj`` = GPTQ on the permuted problem,
    put back in input order; the same integers as the reference's act order (float64)."""
    w, x, h = _gptq_problem(96, 6, seed=7)
    x *= np.random.default_rng(8).uniform(0.1, 3.0, 96)        # spread the Hessian diagonal
    h = x.T @ x
    perm = np.argsort(-np.diag(h), kind="stable")
    assert not np.array_equal(perm, np.arange(96))
    with jax.enable_x64(True):
        got = gptq_weight(w, h, 3, groupsize=groupsize, act_order=True, dtype=jnp.float64)
        plain = gptq_weight(w[perm], h[np.ix_(perm, perm)], 3, groupsize=groupsize, dtype=jnp.float64)
    np.testing.assert_array_equal(got[perm], plain)
    ref = gptq_weight_reference(w, h, 3, groupsize=groupsize, act_order=True)
    np.testing.assert_allclose(got, ref[0], rtol=0, atol=1e-12 * np.abs(ref[0]).max())
    if groupsize is None:
        with jax.enable_x64(True):
            deq, q, s, z = gptq_weight(w, h, 3, act_order=True, return_int=True, dtype=jnp.float64)
        np.testing.assert_array_equal(q, ref[1])
        np.testing.assert_allclose(deq, (q - z) * s, rtol=1e-12)
    else:
        with pytest.raises(ValueError, match="act_order"):
            gptq_weight(w, h, 3, groupsize=groupsize, act_order=True, return_int=True)
    with pytest.raises(ValueError, match="act_order"):
        gptq_weight(w, h, 3, act_order="yes")
    with pytest.raises(ValueError, match="w_act_order"):
        QuantSpec(w_bits=4, w_act_order=True)                      # RTN has no column order


def test_gptq_rows_are_independent_and_bad_arguments_fail():
    """Linears sharing an input quantized as one matrix (as ``quantize`` does with q/k/v and
    gate/up) give each one's own result; bad arguments are ValueErrors naming them."""
    w, _, h = _gptq_problem(96, 24)
    with jax.enable_x64(True):
        whole = gptq_weight(w, h, 4, groupsize=32, dtype=jnp.float64)
        parts = [gptq_weight(w[:, a:b], h, 4, groupsize=32, dtype=jnp.float64) for a, b in ((0, 7), (7, 24))]
    np.testing.assert_allclose(np.concatenate(parts, 1), whole, rtol=0, atol=1e-12 * np.abs(whole).max())
    for kw, match in ((dict(hessian=h[:-1]), "hessian"), (dict(blocksize=0), "blocksize"),
                      (dict(dtype=jnp.float16), "dtype"), (dict(percdamp=-1.0), "percdamp"),
                      (dict(percdamp=float("nan")), "percdamp"), (dict(groupsize=40), "groupsize"),
                      (dict(hessian=-np.eye(96)), "positive definite")):
        with pytest.raises(ValueError, match=match):
            gptq_weight(w, kw.pop("hessian", h), 4, **kw)
    with pytest.raises(ValueError, match="w must be"):
        gptq_weight(w[0], h, 4)
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            gptq_weight(w, h, 4, dtype=jnp.float64)


def test_quantize_end_to_end(tiny):
    cfg, params = tiny
    ref = _apply(cfg, params, TOKENS)
    # (GPTQ through quantize() with calibration runs in tests/test_experiment_quarot.py)
    qcfg, qparams = quantize(cfg, params, QuantSpec(rotate=True, w_bits=8, a_bits=8, kv_bits=8))
    got = _apply(qcfg, qparams, TOKENS)
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(got - ref).max()) < 0.05 * scale   # W8A8KV8 (rotated): close to float
    q4cfg, q4 = quantize(cfg, params, QuantSpec(rotate=False, w_bits=4, a_bits=4, kv_bits=4))
    worse = _apply(q4cfg, q4, TOKENS)
    assert float(jnp.abs(worse - ref).max()) > float(jnp.abs(got - ref).max())
    # the quantized weights sit on a 4-bit grid per output channel
    k = np.asarray(q4["blocks_0"]["mlp"]["up"]["kernel"])
    assert max(len(np.unique(k[:, j])) for j in range(k.shape[1])) <= 16
    with pytest.raises(ValueError, match="calibration"):
        quantize(cfg, params, QuantSpec(w_bits=4, w_method="gptq"))
    with pytest.raises(ValueError, match="w_method"):
        QuantSpec(w_method="awq")
    with pytest.raises(ValueError, match="llama"):
        quantize(jf.get_config("gpt", "tiny"), params, QuantSpec())


def _quantize_whole_model(cfg, params, spec, calibration):
    """The oracle of ``quantize``'s block-by-block pass: the whole tree rotated in float64 at
    once, and GPTQ's Hessians of layer ``i`` from a forward pass of the whole model whose
    layers ``< i`` are already quantized (what ``quantize`` did before it streamed), with
    ``gptq_sequential`` a new pass for each group of linears (q/k/v, o, gate/up, down) whose
    earlier groups of layer ``i`` are quantized too."""
    from jaxformers.quant import LINEARS, collect_stats, quant_config, rotate_params
    qcfg = quant_config(cfg, spec)
    fp_cfg = qcfg.replace(a_bits=16, kv_bits=16)
    if spec.rotate:
        p, _ = rotate_params(cfg, params, spec.seed)
    else:
        p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)

    def cast(tree):
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
    for i in range(cfg.n_layer):
        stats, last = None, None
        for (sub, name), stat in LINEARS.items():
            if stats is None or (spec.gptq_sequential and stat != last):
                stats = collect_stats(fp_cfg, cast(p), calibration, spec.calib_batch)[f"blocks_{i}"]
            last = stat
            w = p[f"blocks_{i}"][sub][name]["kernel"]
            w2 = w.reshape(int(np.prod(w.shape[:2 if name == "o" else 1])), -1)  # [in, out]
            q = gptq_weight(w2, stats[stat]["xtx"], spec.w_bits, groupsize=spec.w_groupsize,
                            act_order=spec.w_act_order)
            p[f"blocks_{i}"][sub][name]["kernel"] = q.reshape(w.shape)
    return qcfg, cast(p)


def test_quantize_inputs_it_used_to_get_wrong(tiny):
    """Cases that gave garbage or failed late: re-quantizing an already rotated quarot model
    (its config lost ``rotated``: logits off by 160%), a scanned llama (refused), activation /
    KV groups that do not divide what they split (accepted, then failed at the first forward),
    sizes without a Hadamard (the error did not name the setting), odd int4 output axes
    (failed after the block's quantization)."""
    from jaxformers.convert.layers import stack_layers
    cfg, params = tiny
    ref = _apply(cfg, params, TOKENS)
    rcfg, rparams = quantize(cfg, params, QuantSpec(rotate=True))
    for spec in (QuantSpec(rotate=False, w_bits=8), QuantSpec(rotate=True, seed=1)):
        with pytest.raises(ValueError, match="already quantized quarot model"):
            quantize(rcfg, rparams, spec)
    # an unrotated float quarot config is a llama: quantized the same, its hadamard_impl kept
    ucfg = jf.get_config("quarot", "tiny", hadamard_impl="dense")
    got_cfg, got = quantize(ucfg, params, QuantSpec(rotate=True, w_bits=8))
    want_cfg, want = quantize(cfg, params, QuantSpec(rotate=True, w_bits=8))
    assert got_cfg.hadamard_impl == "dense" and got_cfg.replace(hadamard_impl="auto") == want_cfg
    np.testing.assert_array_equal(_apply(got_cfg, got, TOKENS), _apply(want_cfg, want, TOKENS))
    # a scanned llama: its layers are unstacked (the quarot model is per layer)
    scfg = cfg.replace(scan_layers=True)
    sq_cfg, sq = quantize(scfg, stack_layers(params, "blocks"), QuantSpec(rotate=True, w_bits=4, a_bits=4))
    q_cfg, q = quantize(cfg, params, QuantSpec(rotate=True, w_bits=4, a_bits=4))
    assert sq_cfg == q_cfg and not sq_cfg.scan_layers
    np.testing.assert_array_equal(_apply(sq_cfg, sq, TOKENS), _apply(q_cfg, q, TOKENS))
    assert float(jnp.abs(_apply(rcfg, rparams, TOKENS) - ref).max()) < 1e-4 * float(jnp.abs(ref).max())
    # groups that do not divide what they split (head dim 32, d 128, d_ff 352)
    for kw, msg in ((dict(kv_bits=4, kv_groupsize=12), r"kv_groupsize=12 must divide head_dim=32"),
                    (dict(a_bits=4, a_groupsize=64), r"a_groupsize=64 must divide .*'d_ff': 352"),
                    (dict(a_bits=4, a_groupsize=48), r"a_groupsize=48 must divide .*'d_model': 128")):
        with pytest.raises(ValueError, match=msg):
            quantize(cfg, params, QuantSpec(**kw))
        with pytest.raises(ValueError, match=msg):
            jf.get_config("quarot", "tiny", **kw)
    assert jf.get_config("quarot", "tiny", kv_groupsize=12).kv_groupsize == 12   # kv_bits 16: unused
    # sizes with no Hadamard name the setting; odd int4 output axes fail before any work
    for over, msg in ((dict(d_ff=1000), r"d_ff=1000: QuaRot's exact Hadamard"),
                      (dict(n_head=6, n_kv_head=2, head_dim=32), r"n_head=6"),
                      (dict(head_dim=10), r"head_dim=10")):
        c2, p2 = _model(**over)
        with pytest.raises(ValueError, match=msg):
            quantize(c2, p2, QuantSpec(rotate=True))
    c3, p3 = _model(d_ff=353)
    with pytest.raises(ValueError, match=r"must be even, not \{'d_ff': 353\}"):
        quantize(c3, p3, QuantSpec(rotate=False, w_bits=4, storage="int"))


@pytest.mark.parametrize("spec", [QuantSpec(rotate=True, w_bits=4, w_method="gptq", calib_batch=4),
                                  QuantSpec(rotate=False, w_bits=3, w_method="gptq", w_groupsize=32),
                                  QuantSpec(rotate=True, w_bits=4, w_method="gptq", w_groupsize=32,
                                            w_act_order=True),
                                  QuantSpec(rotate=True, w_bits=4, w_method="gptq", gptq_sequential=False)])
def test_quantize_block_by_block_equals_the_whole_model_algorithm(spec):
    """``quantize`` rotates, quantizes and casts one block at a time and pushes GPTQ's
    calibration hidden states through each quantized block; in float32 that gives the same
    weights as rotating the whole tree and re-running the whole model per layer."""
    cfg, params = _model(n_layer=3, tie_embeddings=True)
    cal = np.random.default_rng(3).integers(0, cfg.vocab_size, (6, 32))
    qcfg, got = quantize(cfg, params, spec, calibration=cal)
    rcfg, want = _quantize_whole_model(cfg, params, spec, cal)
    assert qcfg == rcfg
    flat = dict(jax.tree_util.tree_leaves_with_path(want))
    assert set(flat) == {path for path, _ in jax.tree_util.tree_leaves_with_path(got)}
    for path, x in jax.tree_util.tree_leaves_with_path(got):
        np.testing.assert_allclose(x, flat[path], rtol=0, atol=1e-6 * float(np.abs(flat[path]).max()),
                                   err_msg=jax.tree_util.keystr(path))


def test_gptq_sequential_groups():
    """``gptq_sequential`` (the authors' order): q/k/v come first, so they are the same either
    way; o, gate/up and down see the layer's earlier groups quantized, so they change."""
    cfg, params = _model(n_layer=1)
    cal = np.random.default_rng(4).integers(0, cfg.vocab_size, (4, 32))
    got = {seq: quantize(cfg, params, QuantSpec(w_bits=3, w_method="gptq", gptq_sequential=seq),
                         calibration=cal)[1]["blocks_0"] for seq in (True, False)}
    for sub, name in (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"), ("mlp", "gate"),
                      ("mlp", "up"), ("mlp", "down")):
        same = np.array_equal(got[True][sub][name]["kernel"], got[False][sub][name]["kernel"])
        assert same == (name in "qkv"), (sub, name)
    with pytest.raises(ValueError, match="gptq_sequential"):
        QuantSpec(gptq_sequential="no")


def test_quantize_memory_does_not_grow_with_depth():
    """No whole-model float64 copy: the peak of the numpy memory ``quantize`` allocates is the
    same for 2 and 8 layers (it grew by ~3 float64 blocks a layer when the whole tree was
    rotated and re-cast at once)."""
    import tracemalloc
    cal = np.random.default_rng(3).integers(0, 256, (4, 16))
    peaks = {}
    for n_layer in (2, 8):
        cfg, params = _model(n_layer=n_layer)
        block = 8 * sum(x.size for x in jax.tree_util.tree_leaves(params["blocks_0"]))
        for spec in (QuantSpec(rotate=True), QuantSpec(rotate=True, w_bits=4, w_method="gptq")):
            quantize(cfg, params, spec, calibration=cal)  # compile outside the measurement
            tracemalloc.start()
            try:
                quantize(cfg, params, spec, calibration=cal)
                peaks[n_layer, spec.w_bits] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    for w_bits in (16, 4):
        assert peaks[8, w_bits] - peaks[2, w_bits] < 0.5 * block, (peaks, block)


def test_bench_quantize_quick(tmp_path):
    """``python -m experiments.bench_quantize --quick``: each (spec, layers) measured in its own
    process; results.json has every row and the Markdown table."""
    import json
    from experiments import bench_quantize
    assert bench_quantize.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["spec"], r["layers"]) for r in res["rows"]] == [("rotate", 1), ("rotate", 2),
                                                               ("gptq4", 1), ("gptq4", 2)]
    assert all(r["seconds"] > 0 and r["peak_rss_gb"] >= r["rss_before_gb"] > 0 for r in res["rows"])
    assert "| gptq4 |" in res["table"]


# --------------------------------------------------------------------------- integer storage
@functools.lru_cache(maxsize=None)
def _jit_apply(cfg):
    return jax.jit(jf.build(cfg).apply)


def _linear_bytes(params):
    """Bytes of the block linears' parameters (kernel, or qkernel + scale)."""
    return sum(int(x.size) * x.dtype.itemsize for k, blk in params.items() if k.startswith("blocks_")
               for sub in ("attn", "mlp") for lin in blk[sub].values() for x in lin.values())


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (4, 4), (4, 16)])
def test_int_storage_equals_fake_quant(tiny, w_bits, a_bits):
    """``storage="int"`` (int8 / packed int4 weights, int8 x int8 -> int32 matmuls) gives the
    fake-quant model's logits; the int4 weights take ~1/8 of the float32 bytes."""
    cfg, params = tiny
    kw = dict(rotate=True, w_bits=w_bits, a_bits=a_bits, kv_bits=16, w_clip=False)
    fcfg, fparams = quantize(cfg, params, QuantSpec(**kw))
    icfg, iparams = quantize(cfg, params, QuantSpec(storage="int", **kw))
    assert icfg.int_linears and icfg.w_bits == w_bits and not fcfg.int_linears
    ref = _jit_apply(fcfg)({"params": fparams}, TOKENS)
    got = _jit_apply(icfg)({"params": iparams}, TOKENS)
    # equal up to float32 rounding; a rounding-boundary flip of an activation code (int32
    # accumulation vs a float matmul; jax 0.12 flips two positions of W8A8) moves that token's
    # logits (and later ones' through attention) by about a quantization step: allow up to 10%
    # of the positions off by at most that (a wrong scale or code moves every position)
    scale = float(jnp.abs(ref).max())
    err = np.asarray(jnp.abs(got - ref).max(-1))                   # [B, T]
    assert np.sum(err > 2e-5 * scale) <= max(1, err.size // 10) and err.max() < 0.02 * scale, \
        np.sort(err.ravel())[-3:]
    for sub, name in (("attn", "q"), ("attn", "o"), ("mlp", "up"), ("mlp", "down")):
        lin = iparams["blocks_1"][sub][name]
        kernel = fparams["blocks_1"][sub][name]["kernel"]
        assert set(lin) == {"qkernel", "scale"} and lin["scale"].dtype == jnp.float32
        n_in = 2 if name == "o" else 1
        assert lin["scale"].shape == kernel.shape[n_in:]
        if w_bits == 4:  # two per byte along the last output axis
            assert lin["qkernel"].dtype == jnp.uint8
            assert lin["qkernel"].shape == kernel.shape[:-1] + (kernel.shape[-1] // 2,)
            deq = unpack_int4(lin["qkernel"]).astype(jnp.float32) * lin["scale"]
        else:
            assert lin["qkernel"].dtype == jnp.int8 and lin["qkernel"].shape == kernel.shape
            deq = lin["qkernel"].astype(jnp.float32) * lin["scale"]
        np.testing.assert_allclose(deq, kernel, rtol=1e-6, atol=1e-7)
    ratio = _linear_bytes(iparams) / _linear_bytes(fparams)
    # per output channel: in/2 (int4) or in (int8) bytes + a 4-byte scale, vs 4 * in
    expect = (0.125 if w_bits == 4 else 0.25)
    assert expect < ratio < expect + 4 / 128, ratio  # tiny: >= 128 inputs per channel
    print(f"W{w_bits} block-linear bytes / float32: {ratio:.4f}")


def test_int_storage_decoding_sharding_and_errors(tiny):
    """The integer model decodes == forward, keeps the logical axis names, and bad
    integer-storage specs raise ValueError."""
    from jaxformers.decoding import init_cache
    from jaxformers.utils import logical_axes
    cfg, params = tiny
    qcfg, qparams = quantize(cfg, params, QuantSpec(storage="int", w_bits=4, a_bits=4, w_clip=False))
    model = jf.build(qcfg)
    full = _jit_apply(qcfg)({"params": qparams}, TOKENS[:1, :8])
    cache = init_cache(model, 1, 8)
    fn = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    _, cache = fn(qparams, TOKENS[:1, :7], cache)
    last, _ = fn(qparams, TOKENS[:1, 7:8], cache)
    np.testing.assert_allclose(last[:, 0], full[:, 7], atol=1e-5 * float(jnp.abs(full).max()))
    fspecs = logical_axes(jf.build(cfg))["blocks_0"]
    ispecs = logical_axes(model)["blocks_0"]
    for sub, name in (("attn", "k"), ("attn", "o"), ("mlp", "down")):
        axes = tuple(fspecs[sub][name]["kernel"])
        assert tuple(ispecs[sub][name]["qkernel"]) == axes
        assert tuple(ispecs[sub][name]["scale"]) == axes[2 if name == "o" else 1:]
    for bad in (dict(w_groupsize=32), dict(w_sym=False), dict(a_bits=12), dict(a_sym=False),
                dict(a_groupsize=16), dict(w_bits=16)):
        with pytest.raises(ValueError, match="storage='int'"):
            QuantSpec(storage="int", **{"w_bits": 4, "a_bits": 4, **bad})
    with pytest.raises(ValueError, match="storage"):
        QuantSpec(storage="int4")
    with pytest.raises(ValueError, match="int_linears"):
        qcfg.replace(a_bits=12)
    # GPTQ's integer output is the same grid as its dequantized one
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((32, 8)), rng.standard_normal((64, 32))
    deq, q, s, z = gptq_weight(w, x.T @ x, 4, return_int=True)
    np.testing.assert_allclose(deq, (q - z) * s, rtol=1e-6, atol=0)   # float32
    assert q.dtype == np.int32 and q.min() >= -8 and q.max() <= 7 and s.shape == (1, 8)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_gptq_lowers_for_gpu_and_tpu(platform):
    """GPTQ's jitted parts (the preconditioner and the column loop, with groups and the
    clipping search) lower for the accelerators from this CPU (``jax.export``)."""
    from jax import export

    from jaxformers.quant import quantizers as Q
    W = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    u = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    for fn, args in ((lambda W, u: Q._gptq_columns(W, u, 4, 32, True, 100, 64), (W, u)),
                     (lambda h: Q._gptq_hinv(h, 0.01), (u,))):
        exp = export.export(jax.jit(fn), platforms=(platform,))(*args)
        assert exp.platforms == (platform,)


def test_rotation_lowers_in_float64_for_gpu():
    """The rotation's jitted float64 products lower for CUDA from this CPU (on a TPU they run
    on the host CPU: :func:`jaxformers.quant.rotation.rotation_device`)."""
    from jax import export

    from jaxformers.quant.rotation import Rotation, _rotate_block
    cfg, params = _model(d_model=208, n_head=4, n_kv_head=2, head_dim=52, d_ff=688)
    rot = Rotation(cfg)
    with jax.enable_x64(True):
        exp = export.export(_rotate_block, platforms=("cuda",))(rot._q, rot._mats, params["blocks_0"])
    assert exp.platforms == ("cuda",)
    assert "f64" in exp.mlir_module()


def test_int4_flops_count_weights_not_bytes():
    # a packed int4 qkernel holds two weights per byte: counted by storage it halved the FLOPs
    # (2.11M vs 3.20M per token on tiny); now int4 == int8 == float up to the per-channel scales
    base = jf.get_config("quarot", "tiny").flops_per_token(256)
    for bits in (8, 4):
        c = jf.get_config("quarot", "tiny", int_linears=True, w_bits=bits, a_bits=8)
        assert abs(c.flops_per_token(256) / base - 1) < 0.01, bits
