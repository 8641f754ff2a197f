"""Audit 57 (models / layers / kernel wrappers): empty state sizes, Mamba-2 chunk_size, the causal
conv's state with packed segments, landmark lengths / positions, SCFA kind fields, layer-parallel
q/k norms, unrepresentable config sizes."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import selective_scan as ss_pkg
from pallas_kernels import ssd as ssd_pkg


# ----------------------------------------------------------------- 1. empty state / head dim
def _scan_args(n, b=1, l=4, d=2):
    f = jnp.ones
    return (f((b, l, d)), f((b, l, d)), -f((d, n)), f((b, l, n)), f((b, l, n)))


def _ssd_args(p, n, b=1, l=4, h=2):
    f = jnp.ones
    return (f((b, l, h, p)), f((b, l, h)), -f((h,)), f((b, l, 1, n)), f((b, l, 1, n)))


@pytest.mark.parametrize("fn", [ss_pkg.reference, ss_pkg.selective_scan], ids=["reference", "kernel"])
def test_selective_scan_with_no_state_is_refused(fn):
    """N=0 (A [D, 0], B / C [B, L, 0]) returned y = D * x as if there were a state; now a
    ValueError naming the state size, on the reference and the kernel path."""
    with pytest.raises(ValueError, match=r"state size N must be >= 1"):
        fn(*_scan_args(0), D=jnp.ones((2,)))
    fn(*_scan_args(1))  # N=1 still runs


def test_selective_state_update_with_no_state_is_refused():
    b, d = 1, 2
    with pytest.raises(ValueError, match=r"state size N must be >= 1"):
        ss_pkg.selective_state_update(jnp.zeros((b, d, 0)), jnp.ones((b, d)), jnp.ones((b, d)),
                                      -jnp.ones((d, 0)), jnp.ones((b, 0)), jnp.ones((b, 0)))


@pytest.mark.parametrize("fn", [ssd_pkg.reference, ssd_pkg.ssd], ids=["reference", "kernel"])
@pytest.mark.parametrize("p,n,match", [(0, 4, r"head dim P \(x.shape\[-1\]\) must be >= 1"),
                                       (4, 0, r"state size N must be >= 1")])
def test_ssd_with_no_head_dim_or_state_is_refused(fn, p, n, match):
    """P=0 returned an empty y, N=0 y = D * x; now a ValueError naming P / N."""
    with pytest.raises(ValueError, match=match):
        fn(*_ssd_args(p, n), D=jnp.ones((2,)))


@pytest.mark.parametrize("p,n,match", [(0, 4, r"head dim P"), (4, 0, r"state size N must be >= 1")])
def test_ssd_state_update_with_no_head_dim_or_state_is_refused(p, n, match):
    b, h = 1, 2
    with pytest.raises(ValueError, match=match):
        ssd_pkg.ssd_state_update(jnp.zeros((b, h, p, n)), jnp.ones((b, h, p)), jnp.ones((b, h)),
                                 -jnp.ones((h,)), jnp.ones((b, 1, n)), jnp.ones((b, 1, n)))


# ----------------------------------------------------------------- 2. Mamba-2 chunk_size
@pytest.mark.parametrize("chunk_size", [8, 24])
def test_mamba2_auto_runs_the_kernel_with_a_tile_it_takes(monkeypatch, chunk_size):
    """scan_impl='auto' on GPU / TPU ran the SSD kernel with the config's chunk_size, which it
    refuses unless a power of two >= 16 (a Hugging Face checkpoint's chunk_size=8 loaded, then
    failed on the first GPU call).  The model's function does not depend on the chunk: 'auto'
    now runs the kernel at the next power of two (here in interpret mode, as 'auto' resolves on a
    GPU), equal to the reference; 'pallas' still refuses such a chunk_size at config time."""
    import jax
    import jaxformers as jf
    from jaxformers.layers import mamba as mamba_layers
    from jaxformers.layers import mamba2 as mamba2_layers

    assert [mamba2_layers.kernel_chunk_size(q) for q in (1, 8, 16, 24, 64, 100)] == [16, 16, 16, 32, 64, 128]
    kw = dict(vocab_size=32, d_model=16, n_layer=1, headdim=8, d_state=4, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=rf"chunk_size={chunk_size} must be a power of two >= 16"):
        jf.get_config("mamba2", "tiny", scan_impl="pallas", **kw)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 21)), jnp.int32)
    ref = jf.get_config("mamba2", "tiny", scan_impl="reference", **kw)
    params = jf.init_params(jf.build(ref), jax.random.PRNGKey(0))
    want = jf.build(ref).apply({"params": params}, tokens)

    def on_gpu(impl, family="selective_scan"):  # what 'auto' resolves to on a GPU
        return "pallas" if impl == "auto" else impl
    monkeypatch.setattr(mamba_layers, "resolve_scan_impl", on_gpu)
    monkeypatch.setattr(mamba2_layers, "resolve_scan_impl", on_gpu)
    got = jf.build(ref.replace(scan_impl="auto")).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- 3. causal conv: state + segments
def test_causal_conv_state_belongs_to_the_first_packed_segment():
    """CausalConv1d(x, state, segment_ids) dropped the state (its taps were masked as another
    segment's) and returned the last K-1 inputs whatever their segment; now the state feeds the
    first segment only and the new state is the last segment's, as running each segment alone."""
    import jax
    from jaxformers.layers.mamba import CausalConv1d

    k, ch = 4, 3
    ids = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [7, 7, 7, 7, 7, 7, 7, 8, 8], [3] * 9])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=ids.shape + (ch,)), jnp.float32)
    state = jnp.asarray(rng.normal(size=(ids.shape[0], k - 1, ch)), jnp.float32)
    conv = CausalConv1d(k, True)
    params = conv.init(jax.random.PRNGKey(0), x[:1])
    params = jax.tree.map(lambda p: p + 0.5, params)  # a non-zero bias too
    y, new = conv.apply(params, x, state, jnp.asarray(ids))
    for r in range(ids.shape[0]):
        starts = [0] + [t for t in range(1, ids.shape[1]) if ids[r, t] != ids[r, t - 1]] + [ids.shape[1]]
        for j, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
            s0 = state[r:r + 1] if j == 0 else jnp.zeros_like(state[r:r + 1])
            y_s, new_s = conv.apply(params, x[r:r + 1, a:b], s0)
            np.testing.assert_allclose(y[r, a:b], y_s[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(new[r], new_s[0], rtol=0, atol=0)  # the last segment's state


# ----------------------------------------------------------------- 5. SCFA kind fields
@pytest.mark.parametrize("model, field, value, owner", [
    ("qk_sparse", "n_buckets", 4, "hash_sparse"), ("hash_sparse", "qk_drop_rate", 0.25, "qk_sparse")])
def test_scfa_field_of_the_other_kind_is_refused_unless_default(model, field, value, owner):
    """qk_sparse(n_buckets=4) / hash_sparse(qk_drop_rate=0.25) silently ignored the field; now a
    ValueError naming it and the model that uses it.  Default values (every saved config holds
    both fields) still load, and so does a dict round trip."""
    import jaxformers as jf
    from jaxformers.models.scfa import SCFAConfig

    kw = dict(vocab_size=32, d_model=16, n_head=2, n_layer=1, max_seq_len=16)
    with pytest.raises(ValueError, match=rf"{field}={value!r} is used by model='{owner}' only"):
        jf.get_config(model, "tiny", **kw, **{field: value})
    c = jf.get_config(model, "tiny", **kw)
    assert getattr(c, field) == getattr(SCFAConfig, field)
    assert jf.registry.config_from_dict(c.to_dict()) == c
    assert jf.get_config(owner, "tiny", **kw, **{field: value}).model == owner


# ----------------------------------------------------------------- 6. layer-parallel q/k norms
def test_layer_transforms_refuse_params_whose_qk_norm_disagrees_with_the_config():
    """pair_layers / reorder_layers of a qk_norm=False config with params holding attn/q_norm and
    k_norm kept them (fused or passed through) and the model ignored them: another function,
    silently.  Now a ValueError naming qk_norm; the matching config still pairs."""
    import jax
    import jaxformers as jf
    from jaxformers.transforms.layer_parallel import pair_layers, reorder_layers

    cfg = jf.get_config("llama", "tiny", n_layer=2, d_model=32, n_head=4, n_kv_head=2, vocab_size=64,
                        max_seq_len=16, qk_norm=True)
    params = jax.eval_shape(lambda r: jf.init_params(jf.build(cfg), r, jnp.zeros((1, 4), jnp.int32)),
                            jax.random.PRNGKey(0))
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
    for wrong in (cfg.replace(qk_norm=False),):
        with pytest.raises(ValueError, match=r"layer 0: params attn has q/k norm scales \['k_norm', 'q_norm'\] "
                                             r"but config.qk_norm=False"):
            pair_layers(wrong, params, 0, 2)
        with pytest.raises(ValueError, match=r"config.qk_norm=False"):
            reorder_layers(wrong, params, [1, 0])
    plain = jax.tree.map(lambda x: x, params)
    for i in range(2):
        plain[f"blocks_{i}"]["attn"] = {k: v for k, v in plain[f"blocks_{i}"]["attn"].items()
                                        if k not in ("q_norm", "k_norm")}
    with pytest.raises(ValueError, match=r"has q/k norm scales \[\] but config.qk_norm=True"):
        pair_layers(cfg, plain, 0, 2)
    new, _ = pair_layers(cfg, params, 0, 2)
    assert new.qk_norm and new.pairs == (0,)


# ----------------------------------------------------------------- 7. unrepresentable sizes
@pytest.mark.parametrize("model, field", [
    ("gpt", "vocab_size"), ("gpt", "d_model"), ("denseformer", "n_layer"), ("llama", "n_head"),
    ("llama", "d_ff"), ("mamba", "d_state"), ("mamba2", "headdim")])
def test_a_size_beyond_int32_is_refused_at_config_time(model, field):
    """vocab_size=10**29 (n_layer, d_model, ... too) was accepted and failed only at init, with an
    obscure overflow; now a ValueError naming the field.  2**31 - 1 (representable) still passes
    the check."""
    import jaxformers as jf
    from jaxformers.config import _positive

    for big in (10 ** 29, 2 ** 31):
        with pytest.raises(ValueError, match=rf"{field}={big} cannot be represented: it must be a positive "
                                             r"int below 2\*\*31"):
            jf.get_config(model, "tiny", **{field: big})

    class Fake:  # the bound itself, without building a config of that size
        pass
    setattr(Fake, field, 2 ** 31 - 1)
    _positive(Fake, field)


@pytest.mark.parametrize("field", ["window", "max_seq_len"])
def test_a_limit_of_any_size_is_still_accepted(field):
    """window / max_seq_len are limits (no array of that size): a huge one means no limit and ran
    before; it is not refused."""
    import jaxformers as jf

    assert getattr(jf.get_config("gpt", "tiny", **{field: 10 ** 29}), field) == 10 ** 29


# ----------------------------------------------------------------- 4. landmark
def test_landmark_memory_decoding_refuses_positions():
    """Decoding through the memory (mem_chunk_len) ignored a positions argument (the memory sets
    them): logits as if positions were the defaults.  Now a ValueError naming positions; without
    a cache, or without the memory, positions are still taken."""
    import jax
    import jaxformers as jf

    cfg = jf.get_config("landmark", "tiny", d_model=16, n_layer=1, n_head=2, vocab_size=32, max_seq_len=32,
                        landmark_block=4, landmark_impl="reference", mem_chunk_len=8)
    model = jf.build(cfg)
    tok = jnp.zeros((1, 4), jnp.int32)
    params = jax.eval_shape(lambda r: jf.init_params(model, r, tok), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    cache = jf.decoding.init_cache(model, 1, 16)
    pos = jnp.arange(4, dtype=jnp.int32)[None] + 5
    with pytest.raises(ValueError, match=r"positions are not supported when decoding through the memory"):
        model.apply({"params": params}, tok, positions=pos, cache=cache)
    jax.eval_shape(lambda p: model.apply({"params": p}, tok, cache=cache), params)  # default positions
    jax.eval_shape(lambda p: model.apply({"params": p}, tok, positions=pos), params)  # no cache: taken
