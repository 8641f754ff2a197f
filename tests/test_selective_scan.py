"""Pallas selective scan (interpret mode on CPU) vs the sequential float32 oracle."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan import reference, selective_scan, selective_state_update

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _inputs(seed, b, l, dim, n, g=None, dtype=jnp.float32, D=True, z=True, bias=True):
    # numpy RNG: eager jax.random calls would compile one program per shape.
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    bc_shape = (b, l, n) if g is None else (b, l, g, n)
    return dict(
        u=jnp.asarray(r(b, l, dim), dtype),
        delta=jnp.asarray(0.5 * r(b, l, dim), dtype),
        A=jnp.asarray(-np.exp(0.5 * r(dim, n))),
        B=jnp.asarray(r(*bc_shape), dtype),
        C=jnp.asarray(r(*bc_shape), dtype),
        D=jnp.asarray(r(dim)) if D else None,
        z=jnp.asarray(r(b, l, dim), dtype) if z else None,
        delta_bias=jnp.asarray(0.3 * r(dim)) if bias else None,
    )


def _rel(x, y):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    return float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-6))


def _value_and_grads(fn, inputs, static, seed=1):
    """Outputs and the VJP of all present array inputs for fixed random cotangents."""
    present = {k: v for k, v in inputs.items() if v is not None}
    out_shapes = jax.eval_shape(lambda p: fn(**{**inputs, **p}, **static), present)
    rng = np.random.default_rng(seed)
    cts = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32), s.dtype), out_shapes)

    @jax.jit
    def run(present, cts):
        out, vjp = jax.vjp(lambda p: fn(**{**inputs, **p}, **static), present)
        return out, vjp(cts)[0]

    return run(present, cts)


def _compare(inputs, static, kernel_static, tol, grad_tol):
    out_k, g_k = _value_and_grads(functools.partial(selective_scan, **kernel_static), inputs, static)
    out_r, g_r = _value_and_grads(reference, inputs, static)
    for a, b in zip(jax.tree_util.tree_leaves(out_k), jax.tree_util.tree_leaves(out_r)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < tol, _rel(a, b)
    for name in g_r:
        assert g_k[name].dtype == inputs[name].dtype, name
        assert _rel(g_k[name], g_r[name]) < grad_tol, (name, _rel(g_k[name], g_r[name]))


def test_full_features_groups_ragged_length():
    # L=37 not a multiple of chunk=16; G=3 groups of 8 channels, block_d=4 -> 2 blocks/group.
    inputs = _inputs(0, 2, 37, 24, 6, g=3)
    _compare(inputs, dict(delta_softplus=True, return_last_state=True),
             dict(block_d=4, chunk=16), 1e-4, 1e-4)


def test_minimal_batch1_no_group_axis():
    # No D / z / bias / softplus; default block and chunk; dim and N not powers of two.
    inputs = _inputs(1, 1, 50, 20, 5, D=False, z=False, bias=False)
    _compare(inputs, dict(return_last_state=True), dict(chunk=32, block_d=8), 1e-4, 1e-4)


def test_bf16_inputs():
    inputs = _inputs(2, 2, 24, 16, 8, g=2, dtype=jnp.bfloat16)
    _compare(inputs, dict(delta_softplus=True), dict(block_d=8, chunk=8), 2e-2, 3e-2)


def test_state_update_matches_scan():
    inp = _inputs(3, 2, 20, 16, 4, g=2)
    kw = dict(delta_softplus=True, return_last_state=True)
    y_ref, h_ref = reference(**inp, **kw)
    y_k, h_k = selective_scan(**inp, **kw, block_d=8, chunk=8)

    def step(state, t):
        y, state = selective_state_update(
            state, inp["u"][:, t], inp["delta"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
            D=inp["D"], z=inp["z"][:, t], dt_bias=inp["delta_bias"], dt_softplus=True)
        return state, y

    h_dec, ys = jax.lax.scan(step, jnp.zeros((2, 16, 4), jnp.float32), jnp.arange(20))
    y_dec = jnp.moveaxis(ys, 0, 1)
    assert _rel(y_dec, y_ref) < 1e-5 and _rel(h_dec, h_ref) < 1e-5
    assert _rel(y_k, y_dec) < 1e-4 and _rel(h_k, h_dec) < 1e-4
    # continuing from the scan's last state == scanning the longer sequence
    y1, s1 = selective_state_update(h_ref, inp["u"][:, 0], inp["delta"][:, 0], inp["A"],
                                    inp["B"][:, 0, 0], inp["C"][:, 0, 0])
    assert y1.shape == (2, 16) and s1.shape == (2, 16, 4)


@pytest.mark.parametrize("bad, msg", [
    (dict(u=jnp.zeros((2, 8))), "u must have rank 3"),
    (dict(delta=jnp.zeros((2, 9, 12))), "delta"),
    (dict(A=jnp.zeros((12, 3))), "B must have shape"),
    (dict(B=jnp.zeros((2, 8, 5, 4)), C=jnp.zeros((2, 8, 5, 4))), "divisible"),
    (dict(C=jnp.zeros((2, 8, 2, 4))), "same group layout"),
    (dict(D=jnp.zeros((11,))), "D must have shape"),
    (dict(z=jnp.zeros((2, 8, 13))), "z must have shape"),
])
def test_validation(bad, msg):
    args = dict(u=jnp.zeros((2, 8, 12)), delta=jnp.zeros((2, 8, 12)), A=jnp.zeros((12, 4)),
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


def test_bench_script_quick(tmp_path):
    """``python -m experiments.bench_scan --quick`` runs (tiny shapes, interpret mode)."""
    import json

    from experiments import bench_scan
    assert bench_scan.main(["--quick", "--impls", "pallas", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert {"device", "date", "jax_version", "rows"} <= set(result)
    ran = [r for r in result["rows"] if r["impl"] == "pallas"]
    assert len(ran) == 4 and all(r["ms"] is not None for r in ran), ran
