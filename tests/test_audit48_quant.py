"""Audit 48 (quant / layer-parallel): exact quantization grids, the quantizers' settings reaching
the model, GPTQ's damped inverse Hessian, int4 nibble layout, and layer-parallel checks that
the existing tests left open (found by mutation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.quant import fake_quant, pack_int4, quantize_rows_int8, unpack_int4


def _fq(x, bits, **kw):
    return np.asarray(fake_quant(jnp.asarray([x], jnp.float32), bits, **kw))[0]


def test_fake_quant_exact_grid_values():
    """Hand-computed values of the module doc's formulas (round half to even, as torch.round)."""
    # symmetric 4 bits: s = 7 / 7 = 1, codes in [-8, 7]; 2.5 / -2.5 round to even
    np.testing.assert_array_equal(_fq([7.0, -7.0, 3.2, -2.6, 2.5, -2.5, 0.4], 4), [7, -7, 3, -3, 2, -2, 0])
    # clipping 0.5: s = 0.5; -7 / s = -14 clamps to qmin = -8 (not -7), 7 / s to 7
    np.testing.assert_array_equal(_fq([7.0, -7.0, 1.2], 4, clip=0.5), [3.5, -4.0, 1.0])
    # asymmetric 2 bits: the range always holds 0 (all negative: lo = -3, hi = 0, s = 1, z = 3)
    np.testing.assert_array_equal(_fq([-3.0, -2.0, -1.0, -0.4], 2, sym=False), [-3, -2, -1, 0])
    np.testing.assert_array_equal(_fq([0.4, 1.0, 2.0, 3.0], 2, sym=False), [0, 1, 2, 3])
    # s = 4.5 / 3 = 1.5, z = round(1 / 1.5) = 1 (not floor = 0): -1 -> (0 - 1) s, 1 -> (2 - 1) s
    np.testing.assert_array_equal(_fq([-1.0, 1.0, 3.5], 2, sym=False), [-1.5, 1.5, 3.0])
    # asymmetric clip 0.5 on [-2, 4] at 2 bits: lo = -1, hi = 2, s = 1, z = 1; 4 clamps to 2
    np.testing.assert_array_equal(_fq([-2.0, 0.0, 4.0], 2, sym=False, clip=0.5), [-1, 0, 2])
    # groups: each block of 2 gets its own scale; a zero group stays zero
    np.testing.assert_array_equal(_fq([1.0, 0.5, 0.0, 0.0, 8.0, -5.0], 2, groupsize=2),
                                  [1.0, 0.0, 0.0, 0.0, 8.0, -8.0])
    # the int8 path's integers are the same codes
    q, s = quantize_rows_int8(jnp.asarray([[7.0, -7.0, 1.2]]), bits=4, clip=0.5)
    np.testing.assert_array_equal(q, [[7, -8, 2]])
    np.testing.assert_allclose(s, [[0.5]])


@pytest.mark.parametrize("x", [jnp.arange(101, dtype=jnp.int32)[None], np.arange(8)[None],
                               jnp.float32(3.0)])
def test_fake_quant_refuses_integer_and_scalar_x(x):
    """An integer ``x`` came back truncated to its dtype (``s q = 14.28 -> 14``; the int8 path
    already refused it), a scalar was an ``IndexError``."""
    with pytest.raises(ValueError, match="x must"):
        fake_quant(x, 4)
    assert fake_quant(x, 16) is x   # 16 bits: no quantization, any input passes through


def test_pack_int4_nibble_layout():
    """Element ``2i`` in the low nibble, ``2i + 1`` in the high one (two's complement)."""
    p = pack_int4(jnp.asarray([[1, 2, -1, 0, -8, 7]], jnp.int8))
    np.testing.assert_array_equal(p, [[0x21, 0x0F, 0x78]])
    np.testing.assert_array_equal(unpack_int4(jnp.asarray([[0x21, 0x0F, 0x78, 0x88]], jnp.uint8)),
                                  [[1, 2, -1, 0, -8, 7, -8, -8]])


def test_gptq_hinv_is_the_damped_inverse_cholesky():
    """``U^T U = (H + percdamp mean(diag H) I)^-1`` with dead inputs' ``H_jj = 1``; ``U`` upper."""
    from jaxformers.quant.quantizers import gptq_hinv
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)) * np.array([1.0, 3.0, 0.2, 1.0, 5.0, 1.0])
    x[:, 3] = 0
    h = x.T @ x
    with jax.enable_x64(True):
        u, dead = gptq_hinv(jnp.asarray(h, jnp.float64), 0.05)
        u, dead = np.asarray(u), np.asarray(dead)
    np.testing.assert_array_equal(dead, [False, False, False, True, False, False])
    hd = h.copy()
    hd[3, 3] = 1.0
    hd += 0.05 * np.mean(np.diag(hd)) * np.eye(6)
    np.testing.assert_allclose(np.triu(u), u, atol=0)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(hd), rtol=1e-10, atol=1e-12)


def _quarot_cfg(**over):
    return jf.get_config("quarot", "tiny", n_layer=1, **over)


@pytest.mark.parametrize("a_sym, kv_sym", [(True, False), (False, True)])
def test_model_gives_each_quantizer_its_own_settings(monkeypatch, a_sym, kv_sym):
    """Activations (every linear input, per token) and K / V (per head) each get their own bits,
    groups, symmetry and clipping ratio (traced only: no compile)."""
    from jaxformers.quant import model as qm
    calls = []
    real = qm.fake_quant

    def spy(x, bits, **kw):
        calls.append((x.shape, bits, kw))
        return real(x, bits, **kw)
    monkeypatch.setattr(qm, "fake_quant", spy)
    cfg = _quarot_cfg(a_bits=6, a_groupsize=32, a_sym=a_sym, a_clip=0.9,
                      kv_bits=5, kv_groupsize=16, kv_sym=kv_sym, kv_clip=0.8)
    tokens = jnp.zeros((1, 4), jnp.int32)
    jax.eval_shape(lambda: jf.build(cfg).init(jax.random.PRNGKey(0), tokens))
    a = dict(groupsize=32, sym=a_sym, clip=0.9)
    kv = dict(groupsize=16, sym=kv_sym, clip=0.8)
    d, hkv, dh = cfg.d_model, cfg.kv_heads, cfg.dim_head
    assert calls == [((1, 4, d), 6, a),                       # q/k/v input
                     ((1, 4, hkv, dh), 5, kv), ((1, 4, hkv, dh), 5, kv),   # K, V
                     ((1, 4, cfg.n_head * dh), 6, a),         # o input
                     ((1, 4, d), 6, a),                       # gate/up input
                     ((1, 4, cfg.ff_dim), 6, a)]              # down input


def test_int_linears_use_the_activation_clip():
    """The model's ``IntLinear`` quantizes its input with the config's ``a_clip``."""
    from jaxformers.quant.model import linear_class
    from jaxformers.quant.quantizers import int_matmul
    cfg = _quarot_cfg(int_linears=True, a_bits=8, a_clip=0.5)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.integers(-127, 128, (16, 6)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.01, 0.1, 6), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32)
    y = linear_class(cfg)(6, ("embed", "mlp")).apply({"params": {"qkernel": q, "scale": scale}}, x)
    np.testing.assert_allclose(y, int_matmul(x, q, scale, a_bits=8, clip=0.5), rtol=1e-6, atol=1e-6)
    assert not np.allclose(y, int_matmul(x, q, scale, a_bits=8, clip=1.0), atol=1e-3)


# ------------------------------------------------------------------ layer-parallel
def _lp_model(n_layer=4):
    """A tiny llama with random (numpy) params, every entry in [0.5, 1.5] (norm scales not 1)."""
    from jaxformers.utils import abstract_params
    cfg = jf.get_config("llama", "tiny", n_layer=n_layer, d_model=32, n_head=4, n_kv_head=2, d_ff=64,
                        vocab_size=64, max_seq_len=32)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32),
                                    abstract_params(jf.build(cfg)))
    return cfg, params


def test_mean_mlp_norm_is_the_mean_of_the_two_layers():
    """``mlp_norm="mean"``: both MLP branches of a pair use the mean of the two layers' MLP norm
    scales (the authors' shared norm), folded into the fused pair's MLP input kernels; the
    attention norms stay each layer's own."""
    from jaxformers.transforms import pair_layers
    cfg, params = _lp_model()
    _, up = pair_layers(cfg, params, 0, 4, fused=False, mlp_norm="mean")
    _, fp = pair_layers(cfg, params, 0, 4, mlp_norm="mean")
    for k, (i, j) in enumerate([(0, 1), (2, 3)]):
        b0, b1 = params[f"blocks_{i}"], params[f"blocks_{j}"]
        mean = (b0["mlp_norm"]["scale"] + b1["mlp_norm"]["scale"]) / 2
        for n in ("mlp_norm_0", "mlp_norm_1"):
            np.testing.assert_allclose(up[f"blocks_{k}"][n]["scale"], mean, rtol=1e-6)
        np.testing.assert_array_equal(up[f"blocks_{k}"]["attn_norm_0"]["scale"], b0["attn_norm"]["scale"])
        np.testing.assert_array_equal(up[f"blocks_{k}"]["attn_norm_1"]["scale"], b1["attn_norm"]["scale"])
        want = np.concatenate([mean[:, None] * b["mlp"]["gate"]["kernel"] for b in (b0, b1)], axis=1)
        np.testing.assert_allclose(fp[f"blocks_{k}"]["mlp"]["gate"]["kernel"], want, rtol=1e-6)
        np.testing.assert_array_equal(fp[f"blocks_{k}"]["mlp_norm"]["scale"], np.ones(cfg.d_model))


def test_layer_parallel_config_checks_the_pair_span():
    """``pair_start, pair_end``: ``0 <= start <= end <= n_layer`` with an even span, else a
    ``ValueError`` naming them; ``start == end`` pairs nothing (the original depth)."""
    for kw in (dict(pair_start=1, pair_end=2), dict(pair_start=3, pair_end=1),
               dict(pair_start=2, pair_end=6), dict(pair_start=-2, pair_end=0)):
        with pytest.raises(ValueError, match="pair_start"):
            jf.get_config("layer_parallel", "tiny", **kw)
    with pytest.raises(ValueError, match="fused"):
        jf.get_config("layer_parallel", "tiny", fused=1)
    c = jf.get_config("layer_parallel", "tiny", pair_start=0, pair_end=4)
    assert (c.pairs, c.units(), c.effective_depth) == ((0, 2), [(0, 1), (2, 3)], 2)
    c = jf.get_config("layer_parallel", "tiny", pair_start=2, pair_end=2)
    assert (c.pairs, c.units(), c.effective_depth) == ((), [(0,), (1,), (2,), (3,)], 4)
    c = jf.get_config("layer_parallel", "tiny", pair_start=1, pair_end=3)
    assert (c.pairs, c.units(), c.effective_depth) == ((1,), [(0,), (1, 2), (3,)], 3)


def test_layer_transforms_refuse_params_of_another_depth_and_deleting_every_layer():
    from jaxformers.transforms import delete_layers, pair_layers
    cfg, params = _lp_model(n_layer=4)
    with pytest.raises(ValueError, match=r"unexpected \['blocks_4'\]"):
        pair_layers(cfg, dict(params, blocks_4=params["blocks_0"]), 0, 2)
    with pytest.raises(ValueError, match="at least one"):
        delete_layers(cfg, params, [0, 1, 2, 3])
    c, p = delete_layers(cfg, params, [0, 2, 3])
    assert c.n_layer == 1 and set(k for k in p if k.startswith("blocks_")) == {"blocks_0"}
    np.testing.assert_array_equal(p["blocks_0"]["attn"]["q"]["kernel"], params["blocks_1"]["attn"]["q"]["kernel"])


def test_groupsize_true_is_refused():
    """``groupsize=True`` was taken as 1: every value its own group, i.e. no quantization."""
    from jaxformers.quant import rtn_weight
    x = jnp.asarray([[0.1, 0.7, -0.3, 2.0]])
    with pytest.raises(ValueError, match="groupsize"):
        fake_quant(x, 4, groupsize=True)
    with pytest.raises(ValueError, match="groupsize"):
        rtn_weight(np.ones((4, 2)), 4, groupsize=True)


@pytest.mark.parametrize("bits", [1, 9, 16, True])
def test_int8_storage_refuses_more_than_8_bits(bits):
    """int8 storage holds at most 8-bit codes (9 bits would wrap in the int8 cast)."""
    with pytest.raises(ValueError, match=r"bits must be an int in \[2, 8\]"):
        quantize_rows_int8(jnp.ones((2, 4)), bits=bits)


@pytest.mark.parametrize("over, match", [(dict(skip_gains=True), "skip_gains"),
                                         (dict(scan_layers=True), "scan_layers"),
                                         (dict(norm="layernorm"), "norm='rmsnorm'")])
def test_rotation_refuses_models_it_is_not_exact_for(over, match):
    """``Rotation`` / ``rotate_params`` called directly (not through ``quantize``, whose quarot
    config refuses these too): skip gains break the folded norms' invariance."""
    from jaxformers.quant.rotation import Rotation
    with pytest.raises(ValueError, match=match):
        Rotation(jf.get_config("llama", "tiny", **over))


def test_collect_stats_in_batches_equals_one_batch():
    """``xtx`` / ``count`` add up over the batches, ``absmax`` is the max over all of them."""
    from jaxformers.quant import QuantSpec, collect_stats, quant_config
    cfg, params = _lp_model(n_layer=1)
    qcfg = quant_config(cfg, QuantSpec(rotate=False))
    tokens = np.random.default_rng(2).integers(0, 64, (3, 5))
    one = collect_stats(qcfg, params, tokens, batch=3)["blocks_0"]
    split = collect_stats(qcfg, params, tokens, batch=1)["blocks_0"]
    for name in ("attn_in", "o_in", "mlp_in", "down_in"):
        assert split[name]["count"] == one[name]["count"] == 15
        np.testing.assert_allclose(split[name]["absmax"], one[name]["absmax"], rtol=1e-6)
        np.testing.assert_allclose(split[name]["xtx"], one[name]["xtx"], rtol=1e-4)


@pytest.mark.parametrize("name", ["a_clip", "kv_clip"])
@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, True])
def test_online_clip_ratios_must_be_in_0_1(name, bad):
    from jaxformers.quant import QuantSpec
    with pytest.raises(ValueError, match=name):
        QuantSpec(**{name: bad})
    with pytest.raises(ValueError, match=name):
        _quarot_cfg(**{name: bad})


def test_quant_spec_bounds():
    """``percdamp`` a finite number >= 0, as ``gptq_weight`` takes (stop 49: ``QuantSpec`` refused
    1 and above, which ``gptq_weight`` and the authors' ``--percdamp`` take); ``storage="int"``
    is per output channel (no weight groups)."""
    from jaxformers.quant import QuantSpec
    g = dict(w_method="gptq")  # (percdamp is GPTQ's: RTN refuses a non-default one)
    assert QuantSpec(percdamp=0, **g).percdamp == 0
    assert QuantSpec(percdamp=1, **g).percdamp == 1 and QuantSpec(percdamp=np.float32(2.5), **g).percdamp == 2.5
    for bad in (-0.01, float("nan"), float("inf"), True, "0.01"):
        with pytest.raises(ValueError, match="percdamp"):
            QuantSpec(percdamp=bad, **g)
    with pytest.raises(ValueError, match="w_groupsize=32"):
        QuantSpec(w_bits=4, w_groupsize=32, storage="int")
    with pytest.raises(ValueError, match="w_sym=False"):
        QuantSpec(w_bits=4, w_sym=False, storage="int")


def test_unfused_pair_drops_the_mlp_branch_too():
    """Residual dropout on the summed MLP branch of :class:`ParallelPairBlock` (with the
    attention branch zeroed, ``y - x`` is the MLP branch: about half of it dropped, the rest
    scaled by ``1 / (1 - rate)``)."""
    from jaxformers.transforms import pair_layers
    from jaxformers.transforms.layer_parallel import ParallelPairBlock
    cfg, params = _lp_model(n_layer=2)
    cfg = cfg.replace(dropout=0.5)
    pc, pp = pair_layers(cfg, params, 0, 2, fused=False)
    p = jax.tree_util.tree_map(lambda a: a, pp["blocks_0"])
    for j in (0, 1):
        p[f"attn_{j}"] = dict(p[f"attn_{j}"], o={"kernel": jnp.zeros_like(p[f"attn_{j}"]["o"]["kernel"])})
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, cfg.d_model))
    pos = jnp.arange(5)[None]
    blk = ParallelPairBlock(pc.base_config())
    m = np.asarray(blk.apply({"params": p}, x, pos)[0] - x)
    got = np.asarray(blk.apply({"params": p}, x, pos, rngs={"dropout": jax.random.PRNGKey(3)})[0] - x)
    kept = got != 0
    assert np.all(m != 0) and 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(got[kept], 2 * m[kept], rtol=1e-4, atol=1e-5)
