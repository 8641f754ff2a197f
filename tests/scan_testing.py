"""Helpers shared by the scan-kernel tests (selective scan and SSD have the same API)."""
import jax
import jax.numpy as jnp
import numpy as np

SEQ_KEYS = ("x", "dt", "B", "C", "z")  # per-time-step inputs, [B, L, ...]


def segments(b, l, starts):
    """``[b, l]`` int32 ids from per-row lists of segment starts (ids may repeat non-adjacently)."""
    ids = np.zeros((b, l), np.int32)
    for row, row_starts in enumerate(starts):
        for k, t in enumerate(row_starts):
            ids[row, t:] = (k + 1) % 2 if row % 2 else k + 1  # odd rows reuse ids 0 / 1
    return jnp.asarray(ids)


def rel(x, y):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    return float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-6))


def value_and_grads(fn, inputs, static, seed=1):
    """Outputs and the VJP of all present float inputs for fixed random cotangents."""
    present = {k: v for k, v in inputs.items()
               if v is not None and jnp.issubdtype(v.dtype, jnp.floating)}
    g = lambda p: fn(**{**inputs, **p}, **static)  # noqa: E731
    out_shapes = jax.eval_shape(g, present)
    rng = np.random.default_rng(seed)
    cts = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32), s.dtype), out_shapes)

    @jax.jit
    def run(present, cts):
        out, vjp = jax.vjp(g, present)
        return out, vjp(cts)[0]

    return run(present, cts)


def assert_packed_equals_separate(ref, inp, starts_per_row, tol=1e-6):
    """The defining property of ``segment_ids``: a packed row == each segment run alone (the
    initial state only for the first), concatenated; the final state is the last segment's.
    ``ref(**inputs) -> (y, final_state)``."""
    b, l = inp["x"].shape[:2]
    y, h = ref(**inp, segment_ids=segments(b, l, starts_per_row))
    for row, starts in enumerate(starts_per_row):
        bounds = [0, *starts, l]
        ys = []
        for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            part = {n: (v[row:row + 1, s:e] if n in SEQ_KEYS else v) for n, v in inp.items()}
            part["initial_state"] = inp["initial_state"][row:row + 1] if k == 0 else None
            y_seg, h_seg = ref(**part)
            ys.append(y_seg)
        assert rel(jnp.concatenate(ys, axis=1), y[row:row + 1]) < tol, row
        assert rel(h_seg, h[row:row + 1]) < tol, row


def assert_continuation(ref, inp, cut=13):
    """``initial_state`` continues a scan: running ``[0, cut)`` then ``[cut, L)`` from its final
    state equals one run over ``[0, L)``.  ``ref(**inputs) -> (y, final_state)``."""
    y, h = ref(**inp)
    l = inp["x"].shape[1]
    part = lambda sl: {k: (v[:, sl] if k in SEQ_KEYS else v) for k, v in inp.items()}  # noqa: E731
    y1, h1 = ref(**part(slice(0, cut)))
    y2, h2 = ref(**{**part(slice(cut, l)), "initial_state": h1})
    assert rel(jnp.concatenate([y1, y2], axis=1), y) < 1e-6 and rel(h2, h) < 1e-6
