"""Audit 41 (optimizer, losses, mesh, sharding): regression tests."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multidevice import run_on_devices

from jaxformers.registry import build, get_config
from jaxformers.training.losses import cross_entropy, logits_cross_entropy, next_token_targets


@pytest.fixture(scope="module")
def gpt():
    module = build(get_config("gpt", "tiny"))
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((2, 8), jnp.int32))["params"]
    return module, params


@pytest.mark.parametrize("key", ["segment_ids", "positions"])
def test_a_per_token_key_not_aligned_with_tokens_names_the_batch_shapes(gpt, key):
    """Before: the model's error named the sliced shapes ("must be [B, T] = (2, 8), got (2, 7)"
    for a [B, T] = (2, 8) array the user passed), not the batch's [B, T+1] alignment."""
    module, params = gpt
    tokens = jnp.zeros((2, 9), jnp.int32)
    with pytest.raises(ValueError, match=rf"{key} must be aligned with tokens \(2, 9\) \(\[B, T\+1\]\), "
                                         r"got \(2, 8\)"):
        cross_entropy(module, params, {"tokens": tokens, key: jnp.zeros((2, 8), jnp.int32)})


def test_segment_ids_of_one_row_are_not_broadcast_over_the_targets():
    """Before: segment_ids [1, T+1] were silently broadcast over the batch's rows."""
    tokens = jnp.zeros((2, 9), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids must be aligned with tokens"):
        next_token_targets({"tokens": tokens, "segment_ids": jnp.zeros((1, 9), jnp.int32)})
    _, w = next_token_targets({"tokens": tokens, "segment_ids": jnp.zeros((2, 9), jnp.int32)})
    assert float(w.sum()) == 16


def test_one_dimensional_tokens_are_a_value_error():
    """Before: an IndexError from slicing ``tokens[:, 1:]``."""
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\+1\], got shape \(9,\)"):
        next_token_targets({"tokens": jnp.zeros((9,), jnp.int32)})


def test_a_counted_target_outside_the_vocabulary_is_a_value_error_not_nan():
    """Before: NaN loss (the model refuses such an id as input, but the last column is only a target)."""
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
    tokens = jnp.zeros((2, 9), jnp.int32).at[:, -1].set(16)
    with pytest.raises(ValueError, match=r"target ids .* must be in \[0, vocab_size=16\), got ids from 0 to 16"):
        logits_cross_entropy(logits, {"tokens": tokens})
    # masked out (weight 0) it adds nothing; padding ids (-100) are not targets
    mask = jnp.ones((2, 9)).at[:, -1].set(0.0)
    loss, metrics = logits_cross_entropy(logits, {"tokens": tokens, "loss_mask": mask})
    assert np.isfinite(float(loss)) and float(metrics["n_targets"]) == 14
    loss, _ = logits_cross_entropy(logits, {"tokens": tokens.at[:, -1].set(-100)})
    assert np.isfinite(float(loss))
    # under jit the values are unknown: no check (documented NaN), no error
    jax.jit(logits_cross_entropy)(logits, {"tokens": tokens})


def test_kernel_map_names_in_axes_that_do_not_match_the_arguments():
    """Before: an IndexError (too few in_axes: the output's names were read as an input's) or
    shard_map's error about in_specs (too many names), only on a mesh of several devices."""
    script = r"""
import json
import jax, jax.numpy as jnp
from jaxformers.training.mesh import make_mesh, activate
from jaxformers.sharding import kernel_map, BATCH, ACT_HEADS
x = jnp.ones((4, 3, 4, 2))
fn = lambda a, b: a * b
names = (BATCH, None, ACT_HEADS, None)
out = {}
with activate(make_mesh("data=2,tensor=2")):
    for label, in_axes in [("ok", (names, names)), ("few", (names,)), ("long", (names + (None,), names))]:
        try:
            y = jax.jit(kernel_map(fn, in_axes, names))(x, x)
            out[label] = "ok" if bool(jnp.allclose(y, x)) else "wrong"
        except Exception as e:
            out[label] = f"{type(e).__name__}: {e}"
print("RESULT" + json.dumps(out))
"""
    out = run_on_devices(script, n=4)
    assert out["ok"] == "ok"
    assert out["few"].startswith("ValueError: kernel_map: in_axes / out_axes name 1 / 1 arrays, the kernel "
                                 "takes 2"), out["few"]
    assert out["long"].startswith("ValueError: kernel_map: in_axes[0]="), out["long"]
    assert "names 5 dimensions, the array has shape (4, 3, 4, 2)" in out["long"]
