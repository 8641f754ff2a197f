"""Layer-parallel fused pairs of ``qk_norm`` (Qwen3-style) models: per-head q/k norm scales
(``qk_norm_per_head``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from test_layer_parallel import _logits, _model

QK = dict(qk_norm=True, n_kv_head=2)


def test_qk_norm_per_head_is_off_by_default_checked_and_not_exported(tmp_path):
    cfg = jf.get_config("llama", "tiny", n_layer=1, d_model=32, n_head=4, n_kv_head=2, vocab_size=64, qk_norm=True)
    p = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))["blocks_0"]["attn"]
    assert p["q_norm"]["scale"].shape == (8,) and p["k_norm"]["scale"].shape == (8,)  # unchanged tree
    ph = cfg.replace(qk_norm_per_head=True)
    p = jf.init_params(jf.build(ph), jax.random.PRNGKey(0))["blocks_0"]["attn"]
    assert p["q_norm"]["scale"].shape == (4, 8) and p["k_norm"]["scale"].shape == (2, 8)
    # a shared scale repeated on every head computes the shared-scale model; another row for one head does not
    cfg, params = _model("llama", **QK)
    per_head = dict(params)
    for b in [k for k in params if k.startswith("blocks_")]:
        attn = params[b]["attn"]
        per_head[b] = dict(params[b], attn=dict(attn, **{n: {"scale": jnp.broadcast_to(attn[n]["scale"], (h, 8))}
                                                        for n, h in (("q_norm", 4), ("k_norm", 2))}))
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, 64)
    ph = cfg.replace(qk_norm_per_head=True)
    np.testing.assert_allclose(_logits(ph, per_head, toks), _logits(cfg, params, toks), atol=1e-6)
    q_norm = per_head["blocks_0"]["attn"]["q_norm"]
    q_norm["scale"] = q_norm["scale"].at[3].multiply(2.0)
    assert float(jnp.max(jnp.abs(_logits(ph, per_head, toks) - _logits(cfg, params, toks)))) > 1e-3
    with pytest.raises(ValueError, match="qk_norm_per_head=True needs qk_norm=True"):
        cfg.replace(qk_norm=False, qk_norm_per_head=True)
    with pytest.raises(ValueError, match="qk_norm_per_head must be a bool"):
        cfg.replace(qk_norm_per_head=1)
    from jaxformers.convert import to_hf
    with pytest.raises(ValueError, match="qk_norm_per_head=True is not llama-compatible"):
        to_hf(ph, jf.init_params(jf.build(ph), jax.random.PRNGKey(0)), str(tmp_path / "hf"))
