"""jaxformers ``mamba`` / ``mamba2`` -> HF ``MambaForCausalLM`` / ``Mamba2ForCausalLM``
(``to_hf_mamba``, also through ``to_hf``): transformers loads the export and computes our logits;
``from_hf_mamba`` reads back exactly our params; configs HF cannot express are refused."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxformers as jf  # noqa: E402
from jaxformers.convert import config_to_hf_mamba, from_hf, to_hf, to_hf_mamba  # noqa: E402
from jaxformers.convert.layers import stack_layers  # noqa: E402

pytestmark = pytest.mark.hf

TOKENS = np.random.RandomState(0).randint(0, 96, (2, 19)).astype(np.int32)
CASES = {
    "mamba": dict(proj_bias=True, tie_embeddings=False, dt_rank=3),
    "mamba2": dict(headdim=16, n_groups=2, d_state=16, chunk_size=8),
}


def _model(kind, **kw):
    config = jf.get_config(kind, "tiny", vocab_size=96, d_model=32, n_layer=2, **{**CASES[kind], **kw})
    params = jf.init_params(jf.build(config), jax.random.PRNGKey(1))
    # perturb what init leaves constant (norm scales, D, biases) so a swapped mapping shows
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys)])
    return config, params


def _ours(config, params):
    return np.asarray(jf.build(config).apply({"params": params}, jnp.asarray(TOKENS)))


def _theirs(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS.astype(np.int64)), use_cache=False).logits.numpy()


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_transformers_computes_our_logits_and_from_hf_reads_back_our_params(kind, tmp_path):
    config, params = _model(kind)
    to_hf(config, {"params": params}, str(tmp_path))  # dispatches to to_hf_mamba
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == kind
    want = _ours(config, params)
    got = _theirs(str(tmp_path))
    # float32 both sides; the torch path's scan / chunked SSD sums in another order (1e-4 as the
    # import tests; a wrong mapping is off by O(1))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    back_config, back = from_hf(str(tmp_path))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)
    np.testing.assert_allclose(_ours(back_config, back), want, atol=1e-6)


def test_scanned_params_export_the_same_weights(tmp_path):
    config, params = _model("mamba2")
    to_hf_mamba(config, params, str(tmp_path / "a"))
    scanned = config.replace(scan_layers=True)
    to_hf_mamba(scanned, stack_layers(dict(params), "blocks", n_layer=2), str(tmp_path / "b"))
    from safetensors.numpy import load_file
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("kind,field,value", [
    ("mamba", "skip_gains", True), ("mamba", "norm", "layernorm"), ("mamba2", "skip_gains", True),
])
def test_configs_hf_cannot_express_are_refused_naming_the_field(kind, field, value):
    config = jf.get_config(kind, "tiny", **{field: value})
    with pytest.raises(ValueError, match=field):
        config_to_hf_mamba(config)


def test_bad_params_and_other_models_are_refused(tmp_path):
    config, params = _model("mamba")
    with pytest.raises(ValueError, match="missing"):
        to_hf_mamba(config, {k: v for k, v in params.items() if k != "lm_head"}, str(tmp_path))
    other, other_params = _model("mamba2")
    with pytest.raises(ValueError, match="blocks_0"):
        to_hf_mamba(config, {**params, "blocks_0": other_params["blocks_0"]}, str(tmp_path))
    with pytest.raises(ValueError, match="config.model must be one of"):
        to_hf_mamba(jf.get_config("gpt", "tiny"), params, str(tmp_path))
