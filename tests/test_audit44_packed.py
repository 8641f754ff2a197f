"""Audit 44: packed sequences and initial states (the fla convention) for the scans and the
flash-attention op: packed == separate and state chaining from first principles (gradients
included, d initial_state with a final-state cotangent), and bad packed ids."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.ops.attention import attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention import reference as flash_reference
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.ssd import ssd

SEQ = ("x", "dt", "B", "C", "z")


def _ss_inputs(seed, b, l, dim=8, n=4, g=2):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))  # noqa: E731
    return dict(x=r(b, l, dim), dt=0.5 * r(b, l, dim), A=-jnp.exp(0.5 * r(dim, n)), B=r(b, l, g, n),
                C=r(b, l, g, n), D=r(dim), z=r(b, l, dim), dt_bias=0.3 * r(dim), initial_state=r(b, dim, n))


def _ssd_inputs(seed, b, l, h=4, p=4, n=4, g=2):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))  # noqa: E731
    return dict(x=r(b, l, h, p), dt=r(b, l, h), A=-jnp.exp(0.5 * r(h)), B=r(b, l, g, n), C=r(b, l, g, n),
                D=r(h), z=r(b, l, h, p), dt_bias=0.3 * r(h), initial_state=r(b, h, p, n))


def _run(fn, static, inp, seg=None):
    return fn(**inp, segment_ids=seg, dt_softplus=True, return_final_state=True, **static)


def _cotangents(fn, static, inp):
    y, h = jax.eval_shape(lambda i: _run(fn, static, i), inp)
    rng = np.random.default_rng(7)
    return (jnp.asarray(rng.standard_normal(y.shape, dtype=np.float32)),
            jnp.asarray(rng.standard_normal(h.shape, dtype=np.float32)))


def _assert_close(got, want, tol):
    for name in want:
        err = float(jnp.max(jnp.abs(got[name] - want[name])))
        scale = float(jnp.max(jnp.abs(want[name]))) + 1e-6
        assert err / scale < tol, (name, err, scale)


SCANS = [
    pytest.param(selective_scan, dict(chunk_size=8, block_d=4), _ss_inputs, 21,
                 (1, 8, 9, 10, 17, 20), id="selective_scan"),
    pytest.param(ssd, dict(chunk_size=16), _ssd_inputs, 21, (1, 15, 16, 17, 20), id="ssd"),
]


@pytest.mark.parametrize("fn, static, make, l, starts", SCANS)
def test_packed_equals_separate_with_grads(fn, static, make, l, starts):
    """A packed row == each segment run alone (initial_state only for the first; final state the
    last segment's), for outputs and the gradients of every input, initial_state included, with
    a cotangent on the final state too.  Layout: 1-token segments, a start on a chunk edge and
    one past it, a 1-token last segment, many starts in one chunk."""
    inp = make(0, 1, l)
    ids = np.zeros((1, l), np.int32)
    for k, s in enumerate(starts):
        ids[0, s:] = k + 1
    cy, ch = _cotangents(fn, static, inp)
    bounds = [0, *starts, l]

    def packed(inp):
        y, h = _run(fn, static, inp, jnp.asarray(ids))
        return jnp.sum(y * cy) + jnp.sum(h * ch)

    def separate(inp):
        ys = []
        for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            part = {n: (v[:, s:e] if n in SEQ else v) for n, v in inp.items()}
            if k:
                part["initial_state"] = None
            y, h = _run(fn, static, part)
            ys.append(y)
        return jnp.sum(jnp.concatenate(ys, 1) * cy) + jnp.sum(h * ch)

    lp, gp = jax.jit(jax.value_and_grad(packed))(inp)
    ls, gs = jax.jit(jax.value_and_grad(separate))(inp)
    np.testing.assert_allclose(lp, ls, rtol=1e-5)
    assert float(jnp.max(jnp.abs(gp["initial_state"]))) > 0
    _assert_close(gp, gs, 1e-5)


@pytest.mark.parametrize("fn, static, make, l, starts", SCANS)
def test_state_chaining_with_grads(fn, static, make, l, starts):
    """x[:t] -> final state -> x[t:] from it == one run (t=9 / 17: not a chunk multiple),
    outputs, final state and every gradient (d initial_state through both calls)."""
    del starts
    t = 9 if fn is selective_scan else 17
    inp = make(1, 2, l)
    cy, ch = _cotangents(fn, static, inp)

    def whole(inp):
        y, h = _run(fn, static, inp)
        return jnp.sum(y * cy) + jnp.sum(h * ch)

    def chained(inp):
        y1, h1 = _run(fn, static, {n: (v[:, :t] if n in SEQ else v) for n, v in inp.items()})
        y2, h2 = _run(fn, static, {**{n: (v[:, t:] if n in SEQ else v) for n, v in inp.items()},
                                   "initial_state": h1})
        return jnp.sum(jnp.concatenate([y1, y2], 1) * cy) + jnp.sum(h2 * ch)

    lw, gw = jax.jit(jax.value_and_grad(whole))(inp)
    lc, gc = jax.jit(jax.value_and_grad(chained))(inp)
    np.testing.assert_allclose(lw, lc, rtol=1e-5)
    _assert_close(gw, gc, 1e-5)


@pytest.mark.parametrize("which", ["selective_scan", "ssd"])
def test_scans_keep_starts_of_int64_segment_ids(which):
    """numpy's default int64 ids with x64 off: 0 and 2**32 are different segments.  The jitted
    kernels used to wrap them to int32 (both 0) and drop the start (max abs error ~3.2)."""
    if jax.config.jax_enable_x64:
        pytest.skip("x64 on: the ids stay 64-bit")
    ids64 = np.array([[0] * 4 + [2 ** 32] * 4], np.int64)
    ids32 = np.array([[0] * 4 + [1] * 4], np.int32)
    if which == "selective_scan":
        inp = _ss_inputs(2, 1, 8)
        fn, static = selective_scan, dict(chunk_size=8, block_d=4)
    else:
        inp = _ssd_inputs(2, 1, 8)
        fn, static = ssd, dict(chunk_size=16)
    y64, h64 = _run(fn, static, inp, ids64)
    y32, h32 = _run(fn, static, inp, ids32)
    np.testing.assert_array_equal(np.asarray(y64), np.asarray(y32))
    np.testing.assert_array_equal(np.asarray(h64), np.asarray(h32))
    assert fn.__name__ == which


_ATTN = {
    "flash": lambda q, ids: flash_attention(q, q, q, segment_ids=ids, interpret=True),
    "flash_reference": lambda q, ids: flash_reference(q, q, q, segment_ids=ids),
    "attention_xla": lambda q, ids: attention(q, q, q, segment_ids=ids, implementation="xla"),
    "attention_pallas": lambda q, ids: attention(q, q, q, segment_ids=ids, implementation="pallas"),
}


@pytest.mark.parametrize("impl", sorted(_ATTN))
def test_attention_segment_ids_as_list_is_a_value_error(impl):
    """A nested list of ids (B=2 makes it look like a (q_ids, kv_ids) pair) used to crash with
    AttributeError: 'list' object has no attribute 'ndim'."""
    q = jnp.ones((2, 6, 2, 16))
    with pytest.raises(ValueError, match="segment_ids"):
        _ATTN[impl](q, [[0] * 6, [0] * 6])


@pytest.mark.parametrize("ids, match", [
    (jnp.zeros((2, 6)), "integers"),                    # float ids: used to be accepted
    (jnp.zeros((2, 6), bool), "integers"),              # bool ids: used to be accepted
    (jnp.zeros((1, 6), jnp.int32), r"\[B, T\]"),        # broadcast batch: used to be accepted
    (jnp.zeros((2, 7), jnp.int32), r"\[B, T\]"),        # used to be a broadcasting TypeError
    ((jnp.zeros((2, 6), jnp.int32), jnp.zeros((2, 5), jnp.int32)), "kv ids"),
])
def test_flash_reference_validates_segment_ids_like_the_kernel(ids, match):
    q = jnp.ones((2, 6, 2, 16))
    with pytest.raises(ValueError, match=match):
        flash_reference(q, q, q, segment_ids=ids)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, q, q, segment_ids=ids, interpret=True)
