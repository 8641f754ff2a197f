"""Audit 46, kernels and sharding contracts: ``unknown_names`` (and so ``logical_to_sharding`` and
``constrain``) names a non-string entry and a bare mesh axis (a one-axis tuple that
``PartitionSpec`` flattened) instead of failing inside jax or calling it an unknown logical
name; the attention dispatcher's window check is the kernels' ``static_window``; the flash
kernel has no dead ``sm_scale`` check; the references' traced ``sm_scale`` is documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from jax.sharding import PartitionSpec as P

from jaxformers.ops.attention import attention, xla_attention
from jaxformers.sharding import DEFAULT_RULES, constrain, unknown_names
from jaxformers.training.mesh import logical_to_sharding, make_mesh


def _qkv(t=8):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal((1, t, 2, 8), dtype=np.float32)) for _ in range(3))


# ------------------------------------------------------- one-axis mesh tuple (known issue 1)
def test_one_axis_mesh_tuple_in_a_partition_spec_is_explained():
    """P(("data",), "embed") is stored as P("data", "embed"): 'data' was then reported as an
    unknown *logical* name, with no word about the tuple that was meant."""
    assert P(("data",), "embed") == P("data", "embed")  # jax's normalisation, the cause
    with pytest.raises(ValueError, match=r"'data' is a mesh axis, not a logical axis name.*one-axis tuple"):
        logical_to_sharding({"w": P(("data",), "embed")}, make_mesh(None))
    with nn.logical_axis_rules(DEFAULT_RULES):
        with pytest.raises(ValueError, match=r"'tensor' is a mesh axis"):
            constrain(jnp.zeros((2, 3)), ("tensor", None))
        # the plain-tuple spelling constrain takes still works (no mesh: a no-op)
        assert constrain(jnp.zeros((2, 3)), (("tensor",), None)).shape == (2, 3)
    # names that are both (expert) stay logical names; true typos are still reported
    assert unknown_names(P("expert", "embed"), DEFAULT_RULES) == ()
    assert unknown_names(("bogus", ("data",)), DEFAULT_RULES) == ("bogus",)


# ------------------------------------------------------- non-string entry (known issue 2)
@pytest.mark.parametrize("spec", [P("embed", 3), P(2.5, None)])
def test_non_string_entry_is_named(spec):
    """P("embed", 3) failed inside jax ("Resource axis: 3 of P('fsdp', 3) is not found in
    mesh") after the rules had renamed the spec."""
    bad = spec[1] if spec[0] == "embed" else spec[0]
    with pytest.raises(ValueError, match=rf"holds {bad!r} \(.*\): each dimension takes a logical axis name"):
        logical_to_sharding({"w": spec}, make_mesh(None))


# ------------------------------------------------------- dispatcher window (known issue 5)
def test_attention_window_check_is_the_kernels():
    """The dispatcher had its own window check, which refused a concrete 0-d jax int
    (``jnp.int32(3)``) that flash_attention itself accepts."""
    q, k, v = _qkv()
    want = attention(q, k, v, window=3, implementation="xla")
    for w in (jnp.int32(3), np.array(3)):
        np.testing.assert_allclose(attention(q, k, v, window=w, implementation="xla"), want, atol=1e-6)
        np.testing.assert_allclose(xla_attention(q, k, v, window=w), want, atol=1e-6)
        np.testing.assert_allclose(attention(q, k, v, window=w, implementation="pallas"), want, atol=2e-5)
    for w in (0, -2, 1.5, True, np.array([2, 3])):
        with pytest.raises(ValueError, match="window must be a positive int or None"):
            attention(q, k, v, window=w, implementation="xla")
    with pytest.raises(ValueError, match="window must be a concrete positive int"):
        jax.jit(lambda w: attention(q, k, v, window=w, implementation="xla"))(3)


# ------------------------------------------------------- dead sm_scale check (known issue 4)
def test_flash_kernel_sm_scale_rule_after_the_dead_check_went():
    from pallas_kernels.flash_attention import kernel
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="sm_scale must be a real scalar"):
        kernel.flash_attention(q, k, v, sm_scale="0.3")
    with pytest.raises(ValueError, match="got a traced value"):
        jax.jit(lambda s: kernel.flash_attention(q, k, v, sm_scale=s))(0.3)


# ------------------------------------------------------- mutation pass: check_decay call sites
def _ssd_args(a):
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))  # noqa: E731
    return r(1, 16, 2, 16), r(1, 16, 2), a, r(1, 16, 1, 16), r(1, 16, 1, 16)


def _ss_args(a):
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))  # noqa: E731
    return r(1, 16, 4), r(1, 16, 4), a, r(1, 16, 8), r(1, 16, 8)


@pytest.mark.parametrize("how", ["keyword", "three_positional", "numpy"])
def test_positive_A_refused_however_it_is_passed(how):
    """Mutants that survived audit 45's tests: ``A=`` as a keyword to selective_scan, A as the last
    of three positional arguments (B, C keywords), and a numpy A were not checked."""
    from pallas_kernels.selective_scan import selective_scan
    from pallas_kernels.ssd import ssd
    for fn, a, kw, shape in ((ssd, np.array([-0.5, 0.5], np.float32), dict(chunk_size=16), r"\[H\]"),
                             (selective_scan, np.full((4, 8), 0.3, np.float32), dict(dt_softplus=True),
                              r"\[D, N\]")):
        x, dt, A, B, C = (_ssd_args if fn is ssd else _ss_args)(a if how == "numpy" else jnp.asarray(a))
        with pytest.raises(ValueError, match=rf"A {shape} must be negative"):
            if how == "keyword":
                fn(x, dt, A=A, B=B, C=C, **kw)
            elif how == "three_positional":
                fn(x, dt, A, B=B, C=C, **kw)
            else:
                fn(x, dt, A, B, C, **kw)


def test_integer_A_gets_the_dtype_message_not_the_sign_one():
    """check_decay leaves a non-float A to the callers' dtype check (a positive integer A is
    first of all not a float)."""
    from pallas_kernels.selective_scan import selective_scan
    from pallas_kernels.ssd import ssd
    x, dt, A, B, C = _ssd_args(jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match="A must be a real floating-point"):
        ssd(x, dt, A, B, C, chunk_size=16)
    x, dt, A, B, C = _ss_args(jnp.ones((4, 8), jnp.int32))
    with pytest.raises(ValueError, match="A must be a real floating-point"):
        selective_scan(x, dt, A, B, C)


# ------------------------------------------------------- mutation pass: write_kv_cache
def _cache(s=6):
    return {"k": jnp.zeros((1, s, 2, 4)), "v": jnp.zeros((1, s, 2, 4))}


@pytest.mark.parametrize("kw,match", [
    (dict(segment_ids=jnp.zeros((1, 1), jnp.int32)), "segment_ids are not supported"),
    (dict(capacity=-1), "capacity must be an int in"),
    (dict(capacity=True), "capacity must be an int in"),            # was read as capacity 1
    (dict(cache_index=-1), "cache_index must be >= 0"),             # dynamic_update_slice: slot S-1
    (dict(cache_index=5, k=jnp.ones((1, 2, 2, 4))), "KV cache is full"),   # 5 + 2 > 6: one slot over
    (dict(k=jnp.ones((1, 1, 1, 4))), r"build the cache with init_cache"),   # Hkv 1 vs the cache's 2
    (dict(k=jnp.ones((1, 1, 2, 3))), r"build the cache with init_cache"),   # Dh 3 vs 4
])
def test_write_kv_cache_more_bad_arguments(kw, match):
    from jaxformers.layers.attention import write_kv_cache
    k = kw.pop("k", jnp.ones((1, 1, 2, 4)))
    args = dict(cache_index=0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        write_kv_cache(_cache(), k, k, args.pop("cache_index"), **args)


def test_write_kv_cache_fills_to_the_last_slot():
    """The boundaries are inclusive: a chunk of S tokens at 0, a chunk ending at slot S - 1 and
    capacity = S all fit (eager and under jit)."""
    from jaxformers.layers.attention import write_kv_cache
    full = jnp.ones((1, 6, 2, 4))
    np.testing.assert_array_equal(write_kv_cache(_cache(), full, full, 0)["k"], full)
    k = jnp.ones((1, 2, 2, 4))
    for fn in (write_kv_cache, jax.jit(write_kv_cache, static_argnames="capacity")):
        out = fn(_cache(), k, 2 * k, jnp.int32(4), capacity=6)
        np.testing.assert_array_equal(np.asarray(out["v"])[0, :, 0, 0], [0, 0, 0, 0, 2, 2])


def test_write_kv_cache_traced_negative_index_poisons():
    """Under jit a negative index would be clamped to slot 0 by dynamic_update_slice (an
    overwrite of the first keys): the written keys/values become NaN instead."""
    from jaxformers.layers.attention import write_kv_cache
    k = jnp.ones((1, 1, 2, 4))
    out = jax.jit(lambda i: write_kv_cache(_cache(), k, k, i))(jnp.int32(-1))
    assert bool(jnp.isnan(out["k"]).any()) and bool(jnp.isnan(out["v"]).any())


# ------------------------------------------------------- new: exported xla_attention's sm_scale
@pytest.mark.parametrize("scale,match", [(-1.0, "finite number > 0"), (0.0, "finite number > 0"),
                                         (float("nan"), "finite number > 0"), ("0.3", "real scalar"),
                                         (jnp.array([0.1, 0.2]), "real scalar")])
def test_xla_attention_checks_sm_scale_like_attention(scale, match):
    """xla_attention (exported) took sm_scale=-1 (inverted attention), 0 (uniform) and NaN (NaN
    out) silently, and a string / [2] array failed inside jax; attention() already refused them."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        xla_attention(q, k, v, sm_scale=scale)
    want = xla_attention(q, k, v, sm_scale=0.3)
    np.testing.assert_allclose(jax.jit(lambda s: xla_attention(q, k, v, sm_scale=s))(0.3), want, atol=1e-6)
    np.testing.assert_allclose(xla_attention(q, k, v, sm_scale=np.float32(0.3)), want, atol=1e-6)
