"""Pallas chunked SSD (interpret mode on CPU) vs the sequential float32 oracle."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scan_testing import assert_continuation, assert_packed_equals_separate, rel as _rel, segments as _segments
from scan_testing import value_and_grads as _value_and_grads

from pallas_kernels.ssd import reference, ssd, ssd_state_update


def _inputs(seed, b, l, h, p, g, n, dtype=jnp.float32, D=None, z=True, bias=True, init=True):
    # numpy RNG: eager jax.random calls would compile one program per shape.
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    d_shape = {None: None, "h": (h,), "hp": (h, p)}[D]
    return dict(
        x=jnp.asarray(r(b, l, h, p), dtype),
        dt=jnp.asarray(r(b, l, h), dtype),
        A=jnp.asarray(-np.exp(0.5 * r(h))),
        B=jnp.asarray(r(b, l, g, n), dtype),
        C=jnp.asarray(r(b, l, g, n), dtype),
        D=None if d_shape is None else jnp.asarray(r(*d_shape)),
        z=jnp.asarray(r(b, l, h, p), dtype) if z else None,
        dt_bias=jnp.asarray(0.3 * r(h)) if bias else None,
        initial_state=jnp.asarray(r(b, h, p, n)) if init else None,
    )





def _compare(inputs, static, tol, grad_tol, **kernel_kw):
    out_k, g_k = _value_and_grads(functools.partial(ssd, **kernel_kw), inputs, static)
    out_r, g_r = _value_and_grads(reference, inputs, static)
    for a, b in zip(jax.tree_util.tree_leaves(out_k), jax.tree_util.tree_leaves(out_r)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < tol, _rel(a, b)
    assert set(g_k) == set(g_r)
    for name in g_r:
        assert g_k[name].dtype == inputs[name].dtype, name
        assert _rel(g_k[name], g_r[name]) < grad_tol, (name, _rel(g_k[name], g_r[name]))


def test_full_features_groups_ragged_length():
    # L=37 with chunk 16 (3 chunks, padded); H=4 heads in G=2 groups; P=6, N=5 padded.
    inputs = _inputs(0, 2, 37, 4, 6, 2, 5, D="hp")
    _compare(inputs, dict(chunk_size=16, dt_softplus=True, return_final_state=True), 1e-4, 1e-4)


def test_minimal_batch1():
    # No z / bias / softplus / initial state; D per head; L=50 with chunk 32;
    # P=20 -> padded to 32 and split into two P blocks of 16.
    inputs = _inputs(1, 1, 50, 2, 20, 1, 16, D="h", z=False, bias=False, init=False)
    inputs["dt"] = jnp.abs(inputs["dt"]) * 0.5
    _compare(inputs, dict(chunk_size=32, return_final_state=True), 1e-4, 1e-4, block_p=16)


def test_bf16_inputs():
    inputs = _inputs(2, 2, 40, 4, 8, 4, 8, dtype=jnp.bfloat16, D="h", init=False)
    _compare(inputs, dict(chunk_size=16, dt_softplus=True), 2e-2, 3e-2)


def test_state_update_matches_scan():
    inp = _inputs(3, 2, 21, 4, 4, 2, 8, D="h")
    kw = dict(dt_softplus=True, return_final_state=True)
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
    opt = dict(D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], initial_state=inp["initial_state"])
    y_ref, s_ref = reference(*args, **opt, **kw)

    def step(state, t):
        y, state = ssd_state_update(state, inp["x"][:, t], inp["dt"][:, t], inp["A"],
                                    inp["B"][:, t], inp["C"][:, t], D=inp["D"], z=inp["z"][:, t],
                                    dt_bias=inp["dt_bias"], dt_softplus=True)
        return state, y

    s_dec, ys = jax.lax.scan(step, inp["initial_state"], jnp.arange(21))
    assert _rel(jnp.moveaxis(ys, 0, 1), y_ref) < 1e-5 and _rel(s_dec, s_ref) < 1e-5
    # the chunked kernel's final state hands over to decoding
    _, s_k = ssd(*[a[:, :20] for a in args[:2]], args[2], *[a[:, :20] for a in args[3:]],
                 chunk_size=16, **{**opt, "z": inp["z"][:, :20]}, **kw)
    y_next, _ = ssd_state_update(s_k, inp["x"][:, 20], inp["dt"][:, 20], inp["A"], inp["B"][:, 20],
                                 inp["C"][:, 20], D=inp["D"], z=inp["z"][:, 20],
                                 dt_bias=inp["dt_bias"], dt_softplus=True)
    assert _rel(y_next, y_ref[:, 20]) < 1e-4


@pytest.mark.parametrize("bad, msg", [
    (dict(x=jnp.zeros((2, 8, 4))), "x must have rank 4"),
    (dict(x=jnp.zeros((2, 8, 4, 8), jnp.int32)), "x must be a real floating-point array"),
    (dict(dt=jnp.zeros((2, 9, 4))), "dt must have shape"),
    (dict(dt=jnp.zeros((2, 8, 4), jnp.int32)), "dt must be a real floating-point"),
    (dict(A=jnp.zeros((4, 2))), "A must have shape"),
    (dict(A=jnp.zeros((4,), jnp.int32)), "A must be a real floating-point"),
    (dict(B=jnp.zeros((2, 8, 3, 16)), C=jnp.zeros((2, 8, 3, 16))), "divisible"),
    (dict(C=jnp.zeros((2, 7, 1, 16))), "C must have the same shape"),
    (dict(B=jnp.zeros((2, 8, 1, 16), jnp.int32)), "B must be a real floating-point"),
    (dict(D=jnp.zeros((3,))), "D must have shape"),
    # L = 0
    (dict(x=jnp.zeros((2, 0, 4, 8)), dt=jnp.zeros((2, 0, 4)), B=jnp.zeros((2, 0, 1, 16)),
          C=jnp.zeros((2, 0, 1, 16))), r"x must be non-empty: expected \[B, L, H, P\] with B, L, H >= 1"),
    # B = 0, H = 0: a clear error, not a slice error inside the kernel
    (dict(x=jnp.zeros((0, 8, 4, 8)), dt=jnp.zeros((0, 8, 4)), B=jnp.zeros((0, 8, 1, 16)),
          C=jnp.zeros((0, 8, 1, 16))), r"x must be non-empty"),
    (dict(x=jnp.zeros((2, 8, 0, 8)), dt=jnp.zeros((2, 8, 0)), A=jnp.zeros((0,))), r"x must be non-empty"),
    # channels-first layouts (mamba_ssm's selective-scan convention) passed as is
    (dict(x=jnp.zeros((2, 4, 8, 8))), r"expected x as \[B, L, H, P\].*must be transposed"),
    (dict(dt=jnp.zeros((2, 4, 8))), r"dt must have shape \[B, L, H\].*must be transposed"),
    (dict(initial_state=jnp.zeros((2, 4, 8, 8))), r"initial_state must have shape \[B, H, P, N\]"),
    (dict(initial_state=jnp.zeros((2, 4, 8, 16), jnp.int32)), "initial_state must be a real floating"),
    (dict(segment_ids=jnp.zeros((1, 8), jnp.int32)), r"segment_ids must have shape \[B, L\]"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.float32)), "segment_ids must be an integer"),
    (dict(dt_softplus="no"), "dt_softplus must be a bool"),  # not read by truthiness
])
def test_validation(bad, msg):
    args = dict(x=jnp.zeros((2, 8, 4, 8)), dt=jnp.zeros((2, 8, 4)), A=jnp.zeros((4,)),
                B=jnp.zeros((2, 8, 1, 16)), C=jnp.zeros((2, 8, 1, 16)))
    args.update(bad)
    pos = [args.pop(k) for k in ("x", "dt", "A", "B", "C")]
    with pytest.raises(ValueError, match=msg):
        ssd(*pos, **args)
    with pytest.raises(ValueError, match=msg):
        reference(*pos, **args)


def test_bad_chunk_size():
    z = jnp.zeros
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(z((1, 8, 2, 4)), z((1, 8, 2)), z((2,)), z((1, 8, 1, 4)), z((1, 8, 1, 4)), chunk_size=24)


def test_backward_uses_finer_p_blocks():
    # P=40 -> padded 64: the forward runs one P block of 64, the backward two of 32
    # (partial dt / dB / dC sums over P blocks).
    inputs = _inputs(4, 1, 20, 2, 40, 1, 16, D="h")
    _compare(inputs, dict(chunk_size=16, dt_softplus=True, return_final_state=True), 1e-4, 1e-4)


def test_state_update_validation():
    # P is carried by x and the state only: the state is checked against x, and the message names both
    with pytest.raises(ValueError, match=r"state must have shape .* from x \(2, 4, 7\)"):
        ssd_state_update(jnp.zeros((2, 4, 8, 16)), jnp.zeros((2, 4, 7)), jnp.zeros((2, 4)),
                         jnp.zeros((4,)), jnp.zeros((2, 1, 16)), jnp.zeros((2, 1, 16)))
    with pytest.raises(ValueError, match="dt must be a real floating-point"):
        ssd_state_update(jnp.zeros((2, 4, 8, 16)), jnp.zeros((2, 4, 8)), jnp.zeros((2, 4), jnp.int32),
                         jnp.zeros((4,)), jnp.zeros((2, 1, 16)), jnp.zeros((2, 1, 16)))


# ----------------------------------------------------------------- packed sequences
# L=37, chunk 16: row 0 has a start exactly at the chunk edge 16, a length-1 segment [16, 17),
# several starts inside chunk 1 (17, 20, 22) and one in the padded last chunk (33); row 1
# reuses ids (0 -> 1 -> 0): a start is wherever the id *changes*.
PACKED_STARTS = [(16, 17, 20, 22, 33), (5, 30)]


def test_packed_segments_kernel_vs_reference():
    # H=4 heads in G=2 groups, P=6 / N=5 padded, initial state (first segments only).
    inputs = _inputs(5, 2, 37, 4, 6, 2, 5, D="hp")
    inputs["segment_ids"] = _segments(2, 37, PACKED_STARTS)
    _compare(inputs, dict(chunk_size=16, dt_softplus=True, return_final_state=True), 1e-5, 1e-5)


def test_packed_segments_batch1_p_blocks():
    # B=1, no initial state; P=40 -> forward one P block of 64, backward two of 32; starts at
    # the chunk edges 16 and 32, a length-1 segment [32, 33) and a length-1 last one [39, 40).
    inputs = _inputs(6, 1, 40, 2, 40, 1, 16, D="h", init=False, z=False)
    inputs["segment_ids"] = _segments(1, 40, [(3, 16, 32, 33, 39)])
    _compare(inputs, dict(chunk_size=16, dt_softplus=True, return_final_state=True), 1e-5, 1e-5)


def test_reference_initial_state_is_a_continuation():
    inp = _inputs(7, 2, 30, 4, 4, 2, 8, D="h")
    ref = jax.jit(functools.partial(reference, dt_softplus=True, return_final_state=True))
    assert_continuation(ref, inp)


def test_reference_segments_equal_separate_runs():
    """The defining property: a packed row == each segment run alone (the initial state
    only for the first), concatenated; the final state is the last segment's."""
    b, l = 2, 37
    inp = _inputs(8, b, l, 4, 4, 2, 8, D="h")
    ref = jax.jit(functools.partial(reference, dt_softplus=True, return_final_state=True))
    assert_packed_equals_separate(ref, inp, PACKED_STARTS)
