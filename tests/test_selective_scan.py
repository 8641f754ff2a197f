"""Pallas selective scan (interpret mode on CPU) vs the sequential float32 oracle."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scan_testing import assert_continuation, assert_packed_equals_separate, rel as _rel, segments as _segments
from scan_testing import value_and_grads as _value_and_grads

from pallas_kernels.selective_scan import reference, selective_scan, selective_state_update

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _inputs(seed, b, l, dim, n, g=None, dtype=jnp.float32, D=True, z=True, bias=True, init=False):
    # numpy RNG: eager jax.random calls would compile one program per shape.
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    bc_shape = (b, l, n) if g is None else (b, l, g, n)
    return dict(
        x=jnp.asarray(r(b, l, dim), dtype),
        dt=jnp.asarray(0.5 * r(b, l, dim), dtype),
        A=jnp.asarray(-np.exp(0.5 * r(dim, n))),
        B=jnp.asarray(r(*bc_shape), dtype),
        C=jnp.asarray(r(*bc_shape), dtype),
        D=jnp.asarray(r(dim)) if D else None,
        z=jnp.asarray(r(b, l, dim), dtype) if z else None,
        dt_bias=jnp.asarray(0.3 * r(dim)) if bias else None,
        initial_state=jnp.asarray(r(b, dim, n)) if init else None,
    )





def _compare(inputs, static, kernel_static, tol, grad_tol):
    out_k, g_k = _value_and_grads(functools.partial(selective_scan, **kernel_static), inputs, static)
    out_r, g_r = _value_and_grads(reference, inputs, static)
    for a, b in zip(jax.tree_util.tree_leaves(out_k), jax.tree_util.tree_leaves(out_r)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < tol, _rel(a, b)
    assert set(g_k) == set(g_r)
    for name in g_r:
        assert g_k[name].dtype == inputs[name].dtype, name
        assert _rel(g_k[name], g_r[name]) < grad_tol, (name, _rel(g_k[name], g_r[name]))


def test_full_features_groups_ragged_length():
    # L=37 not a multiple of chunk=16; G=3 groups of 8 channels, block_d=4 -> 2 blocks/group.
    inputs = _inputs(0, 2, 37, 24, 6, g=3)
    _compare(inputs, dict(dt_softplus=True, return_final_state=True),
             dict(block_d=4, chunk_size=16), 1e-4, 1e-4)


def test_minimal_batch1_no_group_axis():
    # No D / z / bias / softplus; default block and chunk; dim and N not powers of two.
    inputs = _inputs(1, 1, 50, 20, 5, D=False, z=False, bias=False)
    _compare(inputs, dict(return_final_state=True), dict(chunk_size=32, block_d=8), 1e-4, 1e-4)


def test_bf16_inputs():
    inputs = _inputs(2, 2, 24, 16, 8, g=2, dtype=jnp.bfloat16)
    _compare(inputs, dict(dt_softplus=True), dict(block_d=8, chunk_size=8), 2e-2, 3e-2)


def test_state_update_matches_scan():
    inp = _inputs(3, 2, 20, 16, 4, g=2)
    kw = dict(dt_softplus=True, return_final_state=True)
    y_ref, h_ref = reference(**inp, **kw)
    y_k, h_k = selective_scan(**inp, **kw, block_d=8, chunk_size=8)

    def step(state, t):
        y, state = selective_state_update(
            state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
            D=inp["D"], z=inp["z"][:, t], dt_bias=inp["dt_bias"], dt_softplus=True)
        return state, y

    h_dec, ys = jax.lax.scan(step, jnp.zeros((2, 16, 4), jnp.float32), jnp.arange(20))
    y_dec = jnp.moveaxis(ys, 0, 1)
    assert _rel(y_dec, y_ref) < 1e-5 and _rel(h_dec, h_ref) < 1e-5
    assert _rel(y_k, y_dec) < 1e-4 and _rel(h_k, h_dec) < 1e-4
    # continuing from the scan's last state == scanning the longer sequence
    y1, s1 = selective_state_update(h_ref, inp["x"][:, 0], inp["dt"][:, 0], inp["A"],
                                    inp["B"][:, 0, 0], inp["C"][:, 0, 0])
    assert y1.shape == (2, 16) and s1.shape == (2, 16, 4)


@pytest.mark.parametrize("bad, msg", [
    (dict(x=jnp.zeros((2, 8))), "x must have rank 3"),
    (dict(x=jnp.zeros((2, 8, 12), jnp.int32)), "x must be a real floating-point array"),
    (dict(dt=jnp.zeros((2, 9, 12))), "dt must have shape"),
    (dict(dt=jnp.zeros((2, 8, 12), jnp.int32)), "dt must be a real floating-point"),
    (dict(A=jnp.zeros((12, 3))), "B must have shape"),
    (dict(A=jnp.zeros((12, 4), jnp.int32)), "A must be a real floating-point"),
    (dict(B=jnp.zeros((2, 8, 5, 4)), C=jnp.zeros((2, 8, 5, 4))), "divisible"),
    (dict(C=jnp.zeros((2, 8, 2, 4))), "same group layout"),
    (dict(D=jnp.zeros((11,))), "D must have shape"),
    (dict(z=jnp.zeros((2, 8, 13))), "z must have shape"),
    # L = 0
    (dict(x=jnp.zeros((2, 0, 12)), dt=jnp.zeros((2, 0, 12)), B=jnp.zeros((2, 0, 4)),
          C=jnp.zeros((2, 0, 4))), r"x must be non-empty: expected \[B, L, D\] with B, L, D >= 1"),
    # B = 0, D = 0: a clear error, not a slice error inside the kernel
    (dict(x=jnp.zeros((0, 8, 12)), dt=jnp.zeros((0, 8, 12)), B=jnp.zeros((0, 8, 4)),
          C=jnp.zeros((0, 8, 4))), r"x must be non-empty"),
    (dict(x=jnp.zeros((2, 8, 0)), dt=jnp.zeros((2, 8, 0)), A=jnp.zeros((0, 4))), r"x must be non-empty"),
    # mamba_ssm's channels-first [B, D, L] layout passed as is
    (dict(x=jnp.zeros((2, 12, 8)), dt=jnp.zeros((2, 12, 8)), B=jnp.zeros((2, 4, 8)),
          C=jnp.zeros((2, 4, 8))), r"expected x as \[B, L, D\].*must be transposed"),
    (dict(B=jnp.zeros((2, 4, 8))), r"B must have shape \[B, L, N\].*must be transposed"),
    (dict(initial_state=jnp.zeros((2, 4, 12))), r"initial_state must have shape \[B, D, N\]"),
    (dict(initial_state=jnp.zeros((2, 12, 4), jnp.int32)), "initial_state must be a real floating"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), r"segment_ids must have shape \[B, L\]"),
    (dict(segment_ids=jnp.zeros((2, 8))), "segment_ids must be an integer"),
    (dict(dt_softplus="no"), "dt_softplus must be a bool"),  # not read by truthiness
])
def test_validation(bad, msg):
    args = dict(x=jnp.zeros((2, 8, 12)), dt=jnp.zeros((2, 8, 12)), A=jnp.zeros((12, 4)),
                B=jnp.zeros((2, 8, 4)), C=jnp.zeros((2, 8, 4)))
    args.update(bad)
    with pytest.raises(ValueError, match=msg):
        selective_scan(**args)
    with pytest.raises(ValueError, match=msg):
        reference(**args)


def test_state_update_validation():
    with pytest.raises(ValueError, match="x must have shape"):
        selective_state_update(jnp.zeros((2, 8, 4)), jnp.zeros((2, 7)), jnp.zeros((2, 8)),
                               jnp.zeros((8, 4)), jnp.zeros((2, 4)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="divisible"):
        selective_state_update(jnp.zeros((2, 8, 4)), jnp.zeros((2, 8)), jnp.zeros((2, 8)),
                               jnp.zeros((8, 4)), jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="x must be a real floating-point"):
        selective_state_update(jnp.zeros((2, 8, 4)), jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 8)),
                               jnp.zeros((8, 4)), jnp.zeros((2, 4)), jnp.zeros((2, 4)))


# ----------------------------------------------------------------- initial state / packed sequences
def test_initial_state_kernel_vs_reference():
    # B=2, L=50 with chunk 32 (padded), dim 20 / N 5 padded, no group axis; grads include
    # d initial_state (the backward's adjoint left after step 0).
    inputs = _inputs(5, 2, 50, 20, 5, init=True)
    _compare(inputs, dict(dt_softplus=True, return_final_state=True),
             dict(chunk_size=32, block_d=8), 1e-5, 1e-5)


# L=37, chunk 16: row 0 has a start exactly at the chunk edge 16, a length-1 segment [16, 17),
# several starts inside chunk 1 (17, 20, 22) and one in the padded last chunk (33); row 1
# reuses ids (0 -> 1 -> 0): a start is wherever the id *changes*.
PACKED_STARTS = [(16, 17, 20, 22, 33), (5, 30)]


def test_packed_segments_kernel_vs_reference():
    inputs = _inputs(6, 2, 37, 24, 6, g=3, init=True)
    inputs["segment_ids"] = _segments(2, 37, PACKED_STARTS)
    _compare(inputs, dict(dt_softplus=True, return_final_state=True),
             dict(block_d=4, chunk_size=16), 1e-5, 1e-5)


def test_packed_segments_batch1_no_initial_state():
    # B=1, chunk 8: starts at the chunk edges 8 and 16, a length-1 segment [8, 9) and a
    # length-1 last segment [19, 20); no initial state, no z.
    inputs = _inputs(7, 1, 20, 8, 4, z=False)
    inputs["segment_ids"] = _segments(1, 20, [(8, 9, 12, 16, 19)])
    _compare(inputs, dict(dt_softplus=True, return_final_state=True),
             dict(block_d=4, chunk_size=8), 1e-5, 1e-5)


def test_reference_initial_state_is_a_continuation():
    inp = _inputs(8, 2, 30, 12, 4, g=2, init=True)
    ref = jax.jit(functools.partial(reference, dt_softplus=True, return_final_state=True))
    assert_continuation(ref, inp)


def test_reference_segments_equal_separate_runs():
    """The defining property: a packed row == each segment run alone (the initial state
    only for the first), concatenated; the final state is the last segment's."""
    b, l = 2, 37
    inp = _inputs(9, b, l, 12, 4, g=2, init=True)
    ref = jax.jit(functools.partial(reference, dt_softplus=True, return_final_state=True))
    assert_packed_equals_separate(ref, inp, PACKED_STARTS)


def test_bench_script_quick(tmp_path):
    """``python -m experiments.bench_scan --quick`` runs (tiny shapes, interpret mode)."""
    import json

    from experiments import bench_scan
    assert bench_scan.main(["--quick", "--impls", "pallas", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert {"device", "date", "jax_version", "rows"} <= set(result)
    ran = [r for r in result["rows"] if r["impl"] == "pallas"]
    assert len(ran) == 4 and all(r["ms"] is not None for r in ran), ran
