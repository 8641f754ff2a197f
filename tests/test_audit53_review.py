"""Audit 53 review: regressions found reviewing the audit-53 commits."""
import pytest

from jaxformers.data.domains import parse_domains_spec


@pytest.mark.parametrize("spec", ["domains:a=shakespeare,b=python:text_field=content",
                                  "domains:a=default,b=noise:text_field=content",
                                  "domains:comedies,b=pystdlib:text_field=content"])
def test_domains_text_field_refused_when_every_source_is_built_in(spec):
    # built-in corpora have no fields (load_corpus refuses text_field for them): a spec whose
    # every SOURCE is built-in silently ignored the option
    with pytest.raises(ValueError, match="no domain has such a SOURCE"):
        parse_domains_spec(spec)


def test_domains_text_field_still_applies_beside_a_built_in_corpus(tmp_path):
    (tmp_path / "a").mkdir()
    assert parse_domains_spec(f"domains:a={tmp_path / 'a'},b=python:text_field=content").text_field == "content"


@pytest.mark.parametrize("scan", [False, True])
def test_per_head_norm_scales_and_qkv_biases_are_not_weight_decayed(scan):
    # qk_norm_per_head's q/k norm scales [H|Hkv, Dh] (a layer-parallel fused pair's) and the q/k/v
    # biases [H|Hkv, Dh] have two logical axes (heads, head_dim): the shape rule decayed them, though
    # norm scales and biases are never decayed (optim's rule); kernels still are
    import jax
    import jaxformers as jf
    from jaxformers.training.optim import decay_mask
    from jaxformers.training.steps import abstract_params
    from jaxformers.transforms import pair_layers

    cfg = jf.get_config("llama", "tiny", n_layer=2, d_model=32, n_head=4, n_kv_head=2, vocab_size=64,
                        qkv_bias=True, qk_norm=True, qk_norm_per_head=True, scan_layers=scan)
    base = cfg.replace(qk_norm_per_head=False, scan_layers=False)
    lp = pair_layers(base, jf.init_params(jf.build(base), jax.random.PRNGKey(0)), 0, 2)[0]  # a fused pair
    for config in (cfg, lp):
        abstract, specs = abstract_params(jf.build(config))
        mask = decay_mask(specs, abstract, *config.weight_decay_names())
        got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
        attn = {k: v for k, v in got.items() if "['attn']" in k}
        assert attn and all(v == k.endswith("['kernel']") for k, v in attn.items()), (config.model, attn)
        assert not any(v for k, v in got.items() if "norm" in k), config.model
