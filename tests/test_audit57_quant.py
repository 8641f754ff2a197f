"""Audit 57: QuaRot (int path, GPTQ-only settings, the CPU Hadamard, return_int), calibration
windows, the BPE tokenizer's literal special token, doge's --reuse check, mamba's eval data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf


def _llama(**over):
    """A tiny llama (Hadamard sizes: head_dim 8, 2 heads, d_ff 32) and random float32 params."""
    from jaxformers.utils import abstract_params
    kw = dict(vocab_size=64, d_model=16, n_layer=1, n_head=2, n_kv_head=1, d_ff=32, max_seq_len=16)
    kw.update(over)
    cfg = jf.get_config("llama", "tiny", **kw)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32),
                                    abstract_params(jf.build(cfg)))
    return cfg, params


# 1. int_path quantizes only the weight widths its rows use; the byte table is unchanged


def test_int_path_quantizes_only_the_widths_its_rows_use(monkeypatch):
    import jaxformers.quant
    from experiments import quarot as exp
    cfg, params = _llama()
    real, widths = jaxformers.quant.quantize, []

    def recording(c, p, spec, calibration=None):
        widths.append(spec.w_bits)
        return real(c, p, spec, calibration)
    monkeypatch.setattr(jaxformers.quant, "quantize", recording)
    tokens = np.arange(2 * 8, dtype=np.int32).reshape(2, 8)
    res = exp.int_path(cfg, params, "float32", tokens, ["W8A8"], 0, warmup=0, iters=1)
    assert widths == [8] and [r["scheme"] for r in res["schemes"]] == ["W8A8"]
    # the byte table still has every format, equal to the bytes of really quantized params
    mem = res["weight_memory"]
    assert list(mem) == ["float32", "bfloat16", "int8", "int4_packed"]
    for key, w_bits in (("int8", 8), ("int4_packed", 4)):
        _, ip = real(cfg, params, jaxformers.quant.QuantSpec(storage="int", w_bits=w_bits, w_clip=False))
        got = {k: mem[key][k] for k in ("weights", "scales")}
        assert got == exp._linear_bytes(ip) == exp._int_linear_bytes(params, w_bits)
    assert res["schemes"][0]["linear_bytes"] == mem["int8"]["total"]


def test_int_linear_bytes_counts_biases_as_stored():
    """A ``qkv_bias`` model: the float biases are stored as they are next to the integer weights."""
    import jaxformers.quant
    from experiments import quarot as exp
    cfg, params = _llama(qkv_bias=True)
    for w_bits in (8, 4):
        _, ip = jaxformers.quant.quantize(cfg, params, jaxformers.quant.QuantSpec(storage="int", w_bits=w_bits,
                                                                                    w_clip=False))
        assert exp._int_linear_bytes(params, w_bits) == exp._linear_bytes(ip)


# 2. GPTQ-only settings given to RTN are refused, as w_act_order is


@pytest.mark.parametrize("field,value", [("gptq_sequential", False), ("percdamp", 0.1), ("calib_batch", 4)])
def test_rtn_refuses_gptq_only_settings(field, value):
    from jaxformers.quant import QuantSpec
    with pytest.raises(ValueError, match=f"{field}={value!r}.*w_method='gptq'"):
        QuantSpec(w_bits=4, **{field: value})
    assert getattr(QuantSpec(w_bits=4, w_method="gptq", **{field: value}), field) == value
    # the defaults are fine with RTN (and with no weight quantization)
    assert QuantSpec(w_bits=4, **{field: getattr(QuantSpec(), field)}).w_method == "rtn"


def test_quarot_experiment_specs_pass_calib_batch_to_gptq_only():
    from experiments import quarot as exp
    from jaxformers.quant import QuantSpec
    for name, fields in exp.SCHEMES.items():
        spec = exp._spec(fields, 3, 32)  # (raised for every RTN scheme before)
        assert spec.calib_batch == (32 if fields.get("w_method") == "gptq" else QuantSpec().calib_batch), name


# 3. the CPU ("dense") online Hadamard: factored, never the [n, n] matrix


@pytest.mark.parametrize("n", [8, 24, 52, 88])  # 2^3, Paley 12 x 2, Goethals-Seidel 52, Paley 44 x 2
def test_cpu_hadamard_is_factored_and_equals_the_dense_matrix(n, monkeypatch):
    import pallas_kernels.hadamard as ph
    import pallas_kernels.hadamard.reference as ref
    from jaxformers.quant.model import hadamard
    dense = ref.hadamard_matrix(n) * n ** -0.5
    x = jax.random.normal(jax.random.PRNGKey(n), (3, 2, n), jnp.float32)

    def no_dense(n):
        raise AssertionError("the CPU Hadamard built the dense [n, n] matrix")
    monkeypatch.setattr(ph, "hadamard_matrix", no_dense)
    monkeypatch.setattr(ref, "hadamard_matrix", no_dense)
    cfg = jf.get_config("quarot", "tiny", hadamard_impl="dense")
    y = hadamard(cfg, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(x, np.float64) @ dense, rtol=0, atol=2e-5)
    yb = hadamard(cfg, x.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16


@pytest.mark.parametrize("n", [24, 52])
def test_factored_hadamard_gradient_equals_the_dense_oracles(n):
    """hadamard_factored (plain XLA, beside the kernel) vs hadamard_reference (the dense
    oracle): forward and gradient on an awkward leading shape."""
    from pallas_kernels.hadamard import hadamard_factored, hadamard_reference
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 3, n), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(2), (1, 3, n), jnp.float32)
    np.testing.assert_allclose(hadamard_factored(x), hadamard_reference(x), rtol=0, atol=2e-5)
    g = jax.grad(lambda x: jnp.sum(hadamard_factored(x) * w))(x)
    g_ref = jax.grad(lambda x: jnp.sum(hadamard_reference(x) * w))(x)
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=2e-5)


# 4. return_int is a bool, not read by truthiness


@pytest.mark.parametrize("bits", [4, 16])
def test_weight_quantizers_refuse_a_non_bool_return_int(bits):
    from jaxformers.quant.quantizers import gptq_weight, rtn_weight, rtn_weight_reference
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (8, 4)))
    h = w @ w.T + np.eye(8)
    for bad in ("no", 1, None):
        for fn in (lambda: rtn_weight(w, bits, return_int=bad), lambda: rtn_weight_reference(w, bits, return_int=bad),
                   lambda: gptq_weight(w, h, bits, return_int=bad)):
            with pytest.raises(ValueError, match="return_int"):
                fn()
    assert len(rtn_weight(w, bits, return_int=np.bool_(True))) == 4


# 5. calibration windows: every start in [0, len - seq_len], the last ones included


def test_calibration_windows_reach_the_end_of_the_training_split(tmp_path):
    from experiments.quarot import calibration_tokens
    from jaxformers.training.trainer import open_dataset
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(chr(97 + i % 26) for i in range(400)))
    train = np.asarray(open_dataset(str(corpus), "byte")[2])
    seq_len = len(train) - 3  # 4 possible starts: 0, 1, 2, 3
    windows = calibration_tokens(str(corpus), "byte", 200, seq_len, 0)
    starts = {next(s for s in range(4) if np.array_equal(train[s:s + seq_len], w)) for w in windows}
    assert starts == {0, 1, 2, 3}
    # the whole split is one window
    np.testing.assert_array_equal(calibration_tokens(str(corpus), "byte", 2, len(train), 0), np.stack([train] * 2))


# 7. doge --reuse: the base run on a finished reusable proxy's weights is checked before training


@pytest.mark.parametrize("proxy,base", [("proxy", "base_doge"), ("proxy_ood", "ood_doge_ood")])
def test_doge_reuse_checks_the_doge_base_run_before_anything_trains(tmp_path, monkeypatch, proxy, base):
    from experiments import doge as exp
    from jaxformers.data.domains import domain_spec
    from jaxformers.training import doge as doge_mod
    weights = {d: 0.1 * (i + 1) for i, d in enumerate(exp.DOMAINS)}
    for name in ("proxy", "proxy_ood"):  # finished runs (what _reusable accepted)
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "summary.json").write_text('{"finished": true}')
    checked, trained = [], []

    def fake_reusable(name, model_kw, train_kw, data, out, seed, eval_batches, step_fn=None):
        checked.append((name, data))
        if name == base:
            raise SystemExit(f"error: cannot reuse {name}")
        return [name] if name in ("proxy", "proxy_ood") else []

    def fake_train(name, *a, **kw):
        trained.append(name)
        return {"train_loss": 1.0, **{f"val_loss/{d}": 1.0 for d in exp.DOMAINS}}, tmp_path / "runs" / name, True
    monkeypatch.setattr(exp, "_reusable", fake_reusable)
    monkeypatch.setattr(exp, "_train", fake_train)
    monkeypatch.setattr(doge_mod, "doge_weights", lambda run_dir, **kw: dict(weights))
    monkeypatch.setattr(doge_mod, "doge_weight_history", lambda run_dir, kind="weight": ([1], {"a": [1.0]}))
    with pytest.raises(SystemExit, match=f"cannot reuse {base}"):
        exp.main(["--preset", "tiny", "--out", str(tmp_path), "--max-bytes", "20000", "--no-compile-cache",
                  "--reuse"])
    assert trained == []  # failed at once, not after training the other runs
    assert checked[-1] == (base, domain_spec(exp.DOMAINS, weights=[weights[d] for d in exp.DOMAINS],
                                             max_bytes=20000))


# 8. mamba's decode timing prefills from the first validation tokens without copying them all


def test_mamba_decode_prefill_reads_only_the_tokens_it_needs(monkeypatch):
    from experiments import mamba
    cfg = jf.get_config("mamba", "tiny", vocab_size=32, d_model=16, n_layer=1, d_state=4, max_seq_len=16)
    params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
    monkeypatch.setattr(mamba, "_median_time", lambda fn, v, tok, cache: 0.001)
    real_resize, resized = np.resize, []

    def recording(a, shape):
        resized.append((np.size(a), shape))
        return real_resize(a, shape)
    monkeypatch.setattr(np, "resize", recording)
    val = np.arange(1000, dtype=np.int32) % 32
    rows = mamba.decode_scaling(cfg, params, [4], batch=2, prefill_tokens=val)
    assert resized == [] and rows[0]["prefilled"]  # a slice of the split
    mamba.decode_scaling(cfg, params, [4], batch=2, prefill_tokens=val[:5])  # too few: repeated
    assert resized == [(5, 6)]


# 6. a literal "<|endoftext|>" in BPE training text is plain text, as when encoding (pinned: already so)


def test_bpe_trains_on_a_literal_end_of_text_as_plain_text():
    import warnings

    from jaxformers.data.tokenizer import EOS_TEXT, BPETokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (fewer merges than asked)
        tok = BPETokenizer(300).train([f"ab {EOS_TEXT} cd " * 20])
    vocab = tok._tok.get_vocab()
    # merges learned inside the literal: training saw its characters as text
    assert "<|" in vocab and "endoftext" in vocab and list(vocab).count(EOS_TEXT) == 1
    ids = tok.encode(f"ab {EOS_TEXT} cd")
    assert tok.eos_id not in ids and tok.decode(ids) == f"ab {EOS_TEXT} cd"
