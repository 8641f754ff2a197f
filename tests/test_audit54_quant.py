"""Audit 54 (QuaRot, jaxformers.quant / experiments.quarot): regression tests."""
import jax.numpy as jnp
import numpy as np
import pytest

from test_quarot import _model as _random_model


def _model(**over):
    """A tiny llama config and random params (non-trivial norm scales and biases)."""
    base = dict(vocab_size=64, d_model=32, n_layer=1, n_head=2, n_kv_head=1, d_ff=64, max_seq_len=32)
    return _random_model(**{**base, **over})


TOKENS = np.random.default_rng(1).integers(0, 64, (2, 8)).astype(np.int32)


def test_experiment_int_path_keeps_the_qkv_bias():
    """experiments.quarot.int_path rebuilt the fake-quant linears as {"kernel"} only: a qkv_bias
    model (Qwen2 via --run) crashed with ScopeParamNotFoundError ('bias')."""
    from experiments.quarot import int_path
    cfg, params = _model(qkv_bias=True)
    r = int_path(cfg, params, "float32", TOKENS, ["W8A8"], 0, warmup=0, iters=1)
    row = r["schemes"][0]
    assert row["max_rel_logit_diff"] < 1e-4
    assert abs(row["nll_int"] - row["nll_fake_quant"]) < 1e-4


def test_experiment_int_path_skips_the_qk_norms():
    """int_path read every entry of blocks_i/attn as a linear: a qk_norm model (Qwen3 via --run)
    was a KeyError 'qkernel' (and the q/k norm scales were counted as linear bytes)."""
    from experiments.quarot import int_path
    cfg, params = _model(qk_norm=True)
    r = int_path(cfg, params, "float32", TOKENS, ["W8A8"], 0, warmup=0, iters=1)
    assert r["schemes"][0]["max_rel_logit_diff"] < 1e-4
    d, f, dh = cfg.d_model, cfg.ff_dim, cfg.dim_head
    outs = {"q": cfg.n_head * dh, "k": cfg.kv_heads * dh, "v": cfg.kv_heads * dh, "o": d, "gate": f, "up": f}
    n = sum(d * o for o in outs.values()) + f * d  # + down
    mem = r["weight_memory"]
    assert mem["float32"]["total"] == 4 * n
    assert mem["int8"] == {"weights": n, "scales": 4 * (sum(outs.values()) + d), "total": n + 4 * (sum(outs.values()) + d),
                           "ratio_to_float32": (n + 4 * (sum(outs.values()) + d)) / (4 * n)}


def test_calibration_windows_longer_than_the_data_name_seq_len(tmp_path):
    """calibration_tokens on a training split shorter than --seq-len was numpy's bare
    'ValueError: high <= 0'; now it names --seq-len and --data."""
    from experiments.quarot import calibration_tokens
    from jaxformers.training.trainer import open_dataset
    corpus = tmp_path / "small.txt"
    corpus.write_text("hello world " * 40)
    n_train = len(open_dataset(str(corpus), "byte")[2])
    with pytest.raises(ValueError, match=r"--seq-len 1000.*--data"):
        calibration_tokens(str(corpus), "byte", 4, 1000, 0)
    with pytest.raises(ValueError, match=r"--seq-len"):
        calibration_tokens(str(corpus), "byte", 4, n_train + 1, 0)
    # (a window may end at the split's last token: audit 57)
    assert calibration_tokens(str(corpus), "byte", 4, n_train, 0).shape == (4, n_train)


@pytest.mark.parametrize("name", ["fake_quant", "rtn_weight", "rtn_weight_reference", "gptq_weight",
                                  "gptq_weight_reference"])
@pytest.mark.parametrize("arg", ["sym", "clip_search"])
def test_quantizer_flags_must_be_bools(name, arg):
    """sym="False" (a truthy string) silently quantized symmetrically, clip_search="no" searched;
    now a ValueError naming the argument (numpy bools still pass)."""
    import jaxformers.quant as q
    if name == "fake_quant" and arg == "clip_search":
        pytest.skip("fake_quant has no clipping search")
    w = np.random.default_rng(0).standard_normal((8, 4))
    fn = getattr(q, name)
    args = (jnp.asarray(w, jnp.float32), 4) if name == "fake_quant" else \
        (w, w @ w.T + np.eye(8), 4) if name.startswith("gptq") else (w, 4)
    with pytest.raises(ValueError, match=arg):
        fn(*args, **{arg: "False"})
    fn(*args, **{arg: np.bool_(False)})


def test_int_matmul_refuses_grouped_scales():
    """int_matmul took rtn_weight(groupsize=4, return_int=True)'s scale [G, out] and broadcast it
    against the tokens: with T == G tokens a silently wrong product (max error 3.06 on |y| <= 8.1);
    now a ValueError naming w_scale.  Per-channel [out] / [1, out] and scalar scales still work."""
    from jaxformers.quant import fake_quant, int_matmul, rtn_weight
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8))
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    _, q, s, _ = rtn_weight(w, 8, groupsize=4, return_int=True, clip_search=False)
    assert s.shape == (4, 8)
    with pytest.raises(ValueError, match="w_scale"):
        int_matmul(x, jnp.asarray(q, jnp.int8), s)
    deq, q, s, _ = rtn_weight(w, 8, return_int=True, clip_search=False)
    ref = fake_quant(x, 8) @ deq
    for scale in (s, s[0]):
        np.testing.assert_allclose(int_matmul(x, jnp.asarray(q, jnp.int8), scale), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(int_matmul(x, jnp.asarray(q, jnp.int8), 2.0),
                               2.0 * fake_quant(x, 8) @ q, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", [None, -1, 1.5, "0", True])
def test_rotation_seed_must_be_a_non_negative_int(seed):
    """rotate_params(seed=None) rotated with fresh random signs and returned a Q drawn again
    (q_matrix: other signs), so the Q returned was not the one applied; True was read as 1 and
    -1 / 1.5 / "0" were numpy errors that did not name seed.  Now a ValueError naming seed."""
    from jaxformers.quant import rotate_params
    cfg, params = _model()
    with pytest.raises(ValueError, match="seed"):
        rotate_params(cfg, params, seed=seed)


def test_rotate_params_returns_the_q_it_applied():
    from jaxformers.quant import rotate_params
    cfg, params = _model()
    rp, q = rotate_params(cfg, params, seed=np.int64(3))
    np.testing.assert_allclose(rp["embed"]["embedding"], np.asarray(params["embed"]["embedding"], np.float64) @ q,
                               atol=1e-6)


@pytest.mark.parametrize("kw, match", [(dict(n=0), "n must"), (dict(n=-3), "n must"), (dict(n=2.0), "n must"),
                                       (dict(n=8, seed=None), "seed"), (dict(n=8, seed=-1), "seed")])
def test_random_hadamard_checks_its_arguments(kw, match):
    """random_hadamard(0) returned a [0, 0] matrix, -3 / 2.0 were numpy errors not naming n,
    seed=None a fresh random matrix; now ValueErrors naming n / seed."""
    from jaxformers.quant import random_hadamard
    with pytest.raises(ValueError, match=match):
        random_hadamard(**kw)
    q = random_hadamard(12, np.int64(1))
    np.testing.assert_allclose(q @ q.T, np.eye(12), atol=1e-12)


@pytest.mark.parametrize("spec", [dict(w_bits=4), None])
def test_quant_config_names_a_bad_spec(spec):
    """quant_config(config, {"w_bits": 4}) was AttributeError: 'dict' object has no attribute
    'rotate'; now a ValueError naming spec (as quantize)."""
    from jaxformers.quant import quant_config
    cfg, _ = _model()
    with pytest.raises(ValueError, match="spec must be a QuantSpec"):
        quant_config(cfg, spec)


def test_int_matmul_names_mismatched_input_sizes():
    """x [2, 8] @ w_int8 [6, 4] was XLA's TypeError ('dot_general requires contracting dimensions
    ...'); now a ValueError naming x and w_int8."""
    from jaxformers.quant import int_matmul
    with pytest.raises(ValueError, match="w_int8"):
        int_matmul(jnp.ones((2, 8)), jnp.ones((6, 4), jnp.int8), jnp.ones(4))


@pytest.mark.parametrize("h, match", [(np.ones((3, 4)), "square"), (np.ones(3), "square"),
                                      (np.full((3, 3), np.nan), "NaN")])
def test_gptq_hinv_names_a_bad_hessian(h, match):
    """A non-square Hessian was a JAX broadcasting / diagonal error not naming it, a NaN one
    'not positive definite ...; raise percdamp' (which cannot help); now ValueErrors naming hessian."""
    from jaxformers.quant import gptq_hinv
    with pytest.raises(ValueError, match=match):
        gptq_hinv(h)


def test_unpack_int4_refuses_floats():
    """unpack_int4 truncated float 'bytes' (3.7 -> 3) silently; now a ValueError naming p.
    int8 storage of the same bytes still unpacks."""
    from jaxformers.quant import pack_int4, unpack_int4
    with pytest.raises(ValueError, match="p must be packed int4"):
        unpack_int4(jnp.asarray([3.7, 255.0]))
    q = jnp.asarray([-8, 7, -1, 0, 3, -5], jnp.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(q)), q)
    np.testing.assert_array_equal(unpack_int4(pack_int4(q).astype(jnp.int8)), q)


@pytest.mark.parametrize("a_bits", [16, 1, 4.0])
def test_int_matmul_names_a_bits(a_bits):
    """int_matmul(a_bits=16) said 'bits must be an int in [2, 8]' (quantize_rows_int8's name for
    it); now the error names a_bits."""
    from jaxformers.quant import int_matmul
    with pytest.raises(ValueError, match="a_bits must be"):
        int_matmul(jnp.ones((2, 8)), jnp.ones((8, 4), jnp.int8), jnp.ones(4), a_bits=a_bits)
