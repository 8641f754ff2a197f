"""Regression tests of the config / FLOP / training-step audit (tiny shapes, CPU)."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformers as jf
from jaxformers.config import TransformerConfig, coerce_value
from jaxformers.models.mamba import HybridConfig, MambaConfig
from jaxformers.training import TrainConfig, apply_model, next_token_targets, train_step
from jaxformers.training.metrics import peak_flops
from jaxformers.training.optim import decay_mask
from jaxformers.training.steps import abstract_params


# ----------------------------------------------------------------------------- FLOPs
def _dense_reference(c, keys):
    """Independent count: 6 * (attention + MLP matmuls + head + small vectors) + attention."""
    d, h, kv, dh = c.d_model, c.n_head, c.kv_heads, c.dim_head
    per_layer = d * h * dh + 2 * d * kv * dh + h * dh * d + (3 if c.mlp == "swiglu" else 2) * d * c.ff_dim
    head = c.vocab_size * d
    norms = (2 * c.n_layer + 1) * d
    return 6.0 * (c.n_layer * per_layer + head + norms) + 12.0 * c.n_layer * h * dh * keys


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_flops_match_independent_count(model):
    c = jf.get_config(model, "tiny")
    assert c.flops_per_token(64) == pytest.approx(_dense_reference(c, 64), rel=1e-12)


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_window_attention_flops_count_the_window(model):
    # a sliding window of W keys: the attention term counts min(W, T) keys, not T
    c = jf.get_config(model, "tiny", window=32)
    assert c.flops_per_token(128) == pytest.approx(_dense_reference(c, 32), rel=1e-12)
    assert c.flops_per_token(16) == pytest.approx(_dense_reference(c, 16), rel=1e-12)  # T < W


# ----------------------------------------------------------------------------- coerce_value
def test_coerce_value_keeps_strings_and_integral_floats():
    assert coerce_value(TrainConfig, "data", "2024") == "2024"  # a directory named 2024
    assert coerce_value(TrainConfig, "init_from", "123") == "123"
    assert coerce_value(TrainConfig, "tokenizer", "true") == "true"
    assert coerce_value(TrainConfig, "mesh", "none") is None
    steps = coerce_value(TrainConfig, "steps", "1e3")
    assert steps == 1000 and type(steps) is int
    assert type(coerce_value(TransformerConfig, "n_layer", "2.0")) is int
    assert coerce_value(TransformerConfig, "n_layer", "1.5") == 1.5  # left for validation to refuse
    assert coerce_value(TrainConfig, "lr", "1e-3") == pytest.approx(1e-3)
    TrainConfig(steps=steps, data=coerce_value(TrainConfig, "data", "2024"))


def test_coerce_value_tuples():
    for text in ("[1, 3]", "(1, 3)", "1,3", "1, 3,"):
        assert coerce_value(HybridConfig, "attn_layers", text) == (1, 3)
    assert coerce_value(MambaConfig, "a_init_range", "1,16") == (1, 16)
    c = jf.get_config("hybrid", "tiny", attn_layers=coerce_value(HybridConfig, "attn_layers", "0,2"))
    assert c.attention_layers == (0, 2)
    with pytest.raises(ValueError, match="attn_layers"):
        coerce_value(HybridConfig, "attn_layers", "1;3")
    # aux_loss_weights keeps its own NAME=W syntax
    assert TrainConfig(aux_loss_weights=coerce_value(TrainConfig, "aux_loss_weights", "a=0.5")).aux_loss_weights \
        == (("a", 0.5),)


# ----------------------------------------------------------------------------- registry / TrainConfig
def test_get_config_refuses_a_contradicting_model_override():
    with pytest.raises(ValueError, match="model='llama'"):
        jf.get_config("gpt", "tiny", model="llama")
    assert jf.get_config("gpt", "tiny", model="gpt").model == "gpt"


@pytest.mark.parametrize("value", [5, 1.5])
def test_aux_loss_weights_not_iterable_is_a_value_error(value):
    with pytest.raises(ValueError, match="aux_loss_weights"):
        TrainConfig(aux_loss_weights=value)


# ----------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("model", ["mamba", "mamba2", "hybrid"])
def test_mamba_ssm_parameters_are_not_decayed(model, monkeypatch):
    # mamba_ssm marks A_log, D (and dt_bias) _no_weight_decay (the config's no_weight_decay hook,
    # which the trainer passes to decay_mask); Mamba-1's A_log is 2-D
    from jaxformers.training.optim import make_optimizer
    from jaxformers.training.trainer import train_program

    config = jf.get_config(model, "tiny")
    assert set(config.no_weight_decay) == {"A_log", "D", "dt_bias"}
    a, specs = abstract_params(jf.build(config))
    mask = decay_mask(specs, a, config.no_weight_decay)
    ssm = [b["mixer"] for b in mask.values() if isinstance(b, dict) and "A_log" in b.get("mixer", {})]
    assert ssm
    for mixer in ssm:
        assert not mixer["A_log"] and not mixer["D"] and not mixer["dt_bias"]
        assert mixer["out_proj"]["kernel"]  # the matmuls still are
    # the trainer's optimizer uses exactly this mask: its weight decay never touches A_log
    seen = {}

    def spy(tc, mask=None):
        seen["mask"] = mask
        return make_optimizer(tc, mask)

    import jaxformers.training.trainer as trainer
    from jaxformers.training.mesh import make_mesh

    monkeypatch.setattr(trainer, "make_optimizer", spy)
    train_program(config, TrainConfig(steps=2, batch_size=2, seq_len=8), make_mesh(), "float32",
                  trainer.get_loss("cross_entropy"))
    assert seen["mask"] == mask
    assert not jf.get_config("gpt", "tiny").no_weight_decay  # attention families: the shape rule only


# ----------------------------------------------------------------------------- MFU peak
@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12),
                                       ("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA GH200 480GB", 989e12),
                                       ("cpu", None)])
def test_peak_flops_by_device_kind(kind, peak):
    assert peak_flops(SimpleNamespace(device_kind=kind)) == peak


# ----------------------------------------------------------------------------- train step
def _tiny():
    module = jf.build(jf.get_config("gpt", "tiny", vocab_size=64, n_layer=1, d_model=32, n_head=2,
                                    max_seq_len=16))
    return module, jf.init_params(module, jax.random.PRNGKey(0))


def test_grad_accum_equals_full_batch_with_different_masks():
    module, params = _tiny()
    tokens = np.random.default_rng(0).integers(0, 64, (4, 9)).astype(np.int32)
    mask = np.ones((4, 9), np.float32)
    mask[0, 3:] = 0
    mask[2] = 0
    mask[3, 1:8] = 0
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
    tx = optax.sgd(1.0)
    loss = jf.training.get_loss("cross_entropy")
    out = {a: train_step(module, tx, loss, params, tx.init(params), batch, 0, None, grad_accum=a)
           for a in (1, 4)}
    for x, y in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[4][0])):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert float(out[4][2]["loss"]) == pytest.approx(float(out[1][2]["loss"]), rel=1e-6)


def test_grad_accum_micro_batch_without_targets_adds_nothing():
    module, params = _tiny()

    def unguarded(module, params, batch, rng):  # 0/0 = NaN on a batch without targets
        logits, _ = apply_model(module, params, batch, rng)
        t, w = next_token_targets(batch)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, t)
        return jnp.sum(ce * w) / jnp.sum(w), {"n_targets": jnp.sum(w)}

    tokens = np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.float32)
    mask[1] = 0  # micro-batch 1 has no targets
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
    tx = optax.sgd(0.1)
    p1, _, m1 = train_step(module, tx, unguarded, params, tx.init(params), batch, 0, None, grad_accum=1)
    p2, _, m2 = train_step(module, tx, unguarded, params, tx.init(params), batch, 0, None, grad_accum=2)
    assert np.isfinite(float(m2["loss"])) and float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("seq_len", [0, -3, 12.5, None, True])
def test_flops_per_token_refuses_a_bad_seq_len(seq_len):
    with pytest.raises(ValueError, match="seq_len"):
        jf.get_config("gpt", "tiny").flops_per_token(seq_len)


@pytest.mark.parametrize("model, field, value", [
    ("hash_sparse", "qk_drop_rate", "x"),      # was "could not convert string to float" (no field)
    ("qk_sparse", "qk_drop_rate", None),       # was a TypeError
    ("landmark", "landmark_id", 1.5),          # was accepted
    ("landmark", "landmark_id", True),         # was accepted
    ("landmark", "landmark_id", "3"),          # was a TypeError
    ("quarot", "w_bits", 0),                   # was accepted unless int_linears=True
    ("quarot", "w_bits", "3"),
])
def test_model_specific_fields_name_themselves(model, field, value):
    with pytest.raises(ValueError, match=field):
        jf.get_config(model, "tiny", **{field: value})
