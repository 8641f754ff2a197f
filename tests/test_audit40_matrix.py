"""Audit 40, the model matrix: invariants every registered model must keep (decoding in awkward
chunks == the full forward, packed rows == each document alone, config round trips) and the
bad inputs every model must refuse with a ValueError naming the argument."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.config import TransformerConfig, coerce_value
from jaxformers.models.cotformer import CoTFormerConfig
from jaxformers.models.denseformer import DenseFormerConfig
from jaxformers.registry import build, config_from_dict, get_config, list_models, list_presets

MODELS = [n for n in list_models() if not n.startswith("test-")]  # not tests' toys
SMALL = dict(d_model=32, n_head=2)


def _model(name, **kw):
    over = dict(d_model=32, headdim=16) if name in ("mamba", "mamba2") else dict(SMALL)
    if name == "hybrid":
        over["headdim"] = 16
    config = get_config(name, "tiny", **over, **kw)
    module = build(config)
    return config, module, {"params": jf.init_params(module, jax.random.PRNGKey(0))}


def _tokens(b, t, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 200)


# ----------------------------------------------------------------------- invariants (all models)
@pytest.mark.parametrize("name", [n for n in MODELS if n != "adaptive_cotformer"])  # no KV cache
def test_every_model_decodes_in_awkward_chunks_as_its_forward(name):
    """Batch 3: a 1-token prefill, a 3-token chunk, single steps, a 2-token chunk."""
    _, module, params = _model(name)
    apply = jax.jit(module.apply)
    tok = _tokens(3, 10)
    full = apply(params, tok)
    cache, outs, start = jf.init_cache(module, 3, 13), [], 0
    for end in (1, 4, 5, 6, 8, 10):
        logits, cache = apply(params, tok[:, start:end], cache=cache)
        outs.append(logits)
        start = end
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in MODELS if n not in ("landmark", "qk_sparse")])
def test_every_model_keeps_packed_documents_apart(name):
    """Two rows packed differently (documents of 1 to 6 tokens, ids reused across rows): each
    document's logits are those it has alone (landmark refuses segment_ids; qk_sparse's keep
    masks depend on the row)."""
    _, module, params = _model(name)
    apply = jax.jit(module.apply)
    lens = [[3, 6, 3], [1, 5, 6]]
    tok = _tokens(2, 12, seed=4)
    seg = jnp.asarray([sum(([100 * (i + 1)] * n for i, n in enumerate(row)), []) for row in lens])
    out = apply(params, tok, segment_ids=seg)
    for b, row in enumerate(lens):
        start = 0
        for n in row:
            alone = apply(params, tok[b:b + 1, start:start + n])
            np.testing.assert_allclose(out[b, start:start + n], alone[0], atol=2e-5, err_msg=name)
            start += n


@pytest.mark.parametrize("name", MODELS)
def test_every_preset_round_trips_through_json(name):
    for preset in list_presets(name):
        config = get_config(name, preset)
        again = config_from_dict(json.loads(config.to_json()))
        assert again == config and type(again) is type(config), (name, preset)


# ----------------------------------------------------------------------- bad inputs (all models)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(2, 0), (0, 3)])
def test_empty_tokens_are_a_value_error(name, shape):
    """Before: 'zero-size array to reduction operation max' from inside attention (or the scans'
    own messages), never naming the tokens."""
    config = get_config(name, "tiny")
    module = build(config)
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    with pytest.raises(ValueError, match=r"tokens must hold at least one position and one row"):
        module.apply(params, jnp.zeros(shape, jnp.int32))


@pytest.mark.parametrize("name", ["gpt", "mamba"])
def test_positions_of_another_shape_or_dtype_are_refused(name):
    """Before: an error about rotary cos/sin shapes (attention), or nothing at all (Mamba)."""
    _, module, params = _model(name)
    tok = _tokens(2, 6)
    with pytest.raises(ValueError, match=r"positions must be \[B, T\] = \(2, 6\) integers"):
        module.apply(params, tok, positions=jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="positions must be"):
        module.apply(params, tok, positions=jnp.zeros((2, 6), jnp.float32))
    row = jnp.arange(6, dtype=jnp.int32)[None]  # one row for every batch row: the default positions
    np.testing.assert_array_equal(module.apply(params, tok, positions=row), module.apply(params, tok))


def test_tokens_may_be_a_nested_list():
    _, module, params = _model("gpt")
    want = module.apply(params, jnp.array([[1, 2, 3]]))
    np.testing.assert_array_equal(module.apply(params, [[1, 2, 3]]), want)


@pytest.mark.parametrize("name", ["gpt", "mamba"])
@pytest.mark.parametrize("args, field", [
    ((2, 8.5), "max_len"), ((2, 8.0), "max_len"), ((2.0, 8), "batch_size"), ((True, 8), "batch_size"),
    ((2, "8"), "max_len"), ((2, None), "max_len"), ((2, 0), "max_len")])
def test_init_cache_sizes_must_be_positive_ints(name, args, field):
    """Before: a TypeError from jnp.zeros (or a bool read as batch 1; Mamba took max_len=8.5)."""
    module = build(get_config(name, "tiny"))
    with pytest.raises(ValueError, match=f"{field} must be a positive int"):
        jf.init_cache(module, *args)
    assert jf.init_cache(module, np.int64(2), np.int32(8))["index"] == 0  # numpy ints are ints


# ----------------------------------------------------------------------- --set parsing
@pytest.mark.parametrize("cls, field", [(TransformerConfig, "remat"), (DenseFormerConfig, "dwa_mode")])
def test_set_none_keeps_the_string_of_a_plain_string_field(cls, field):
    """``--set remat=none`` (turn remat off on resume) was read as None and refused with
    "remat=None is not allowed; choose one of ['none', ...]"; so was ``dwa_mode=none``."""
    value = coerce_value(cls, field, "none")
    assert value == "none"
    assert getattr(cls(**{field: value}), field) == "none"
    # Optional fields still read none / null as None
    assert coerce_value(TransformerConfig, "window", "none") is None
    assert coerce_value(CoTFormerConfig, "depth_embedding", "null") is None
