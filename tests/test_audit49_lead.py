"""Audit 49 (lead): regression tests for the items stop 48 left open (numpy scalars in configs and
quantizer arguments, eager argument checks of the batch iterators, batches given to decode)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.registry import build, get_config
from jaxformers.training.config import TrainConfig


def test_model_configs_take_numpy_scalars_and_store_python_values():
    """A sweep's ``np.arange`` grid gives numpy scalars: accepted like the Python values, stored as
    them (so run files stay JSON), inside tuple fields too."""
    c = get_config("gpt", n_layer=np.int64(3), dropout=np.float32(0.0), tie_embeddings=np.bool_(True))
    assert (c.n_layer, c.tie_embeddings) == (3, True)
    assert type(c.n_layer) is int and type(c.tie_embeddings) is bool and type(c.dropout) is float
    json.loads(c.to_json())
    h = get_config("hybrid", n_layer=2, attn_layers=[np.int64(1)])
    assert h.attn_layers == (1,) and type(h.attn_layers[0]) is int
    s = get_config("hash_sparse", n_layer=2, sparse_layers=(np.int32(0),), n_buckets=np.int64(4))
    assert s.sparse_layers == (0,) and type(s.sparse_layers[0]) is int and type(s.n_buckets) is int
    assert get_config("cotformer", n_repeat=np.int64(2)).n_repeat == 2
    # still refused: a numpy bool where an int goes, a 0-d array, a float
    for bad in (np.bool_(True), np.asarray(3), np.float64(3.0)):
        with pytest.raises(ValueError, match="n_layer"):
            get_config("gpt", n_layer=bad)


def test_train_config_takes_numpy_scalars():
    t = TrainConfig(steps=np.int64(5), lr=np.float32(0.5), aux_loss_weights={"moe": np.float32(0.25)})
    assert (t.steps, t.lr, t.aux_loss_weights) == (5, 0.5, (("moe", 0.25),))
    assert type(t.steps) is int and type(t.lr) is float
    json.loads(t.to_json())
    with pytest.raises(ValueError, match="aux_loss_weights"):  # a bool is no weight, numpy's neither
        TrainConfig(aux_loss_weights={"moe": np.bool_(True)})


def test_quantizers_take_numpy_ints_and_quant_spec_takes_gptqs_percdamp():
    from jaxformers.quant import QuantSpec
    from jaxformers.quant.quantizers import fake_quant, gptq_weight, quantize_rows_int8, rtn_weight

    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
    np.testing.assert_array_equal(fake_quant(x, np.int64(4), groupsize=np.int32(4)), fake_quant(x, 4, groupsize=4))
    q, s = quantize_rows_int8(x, bits=np.int8(8))
    np.testing.assert_array_equal(q, quantize_rows_int8(x, bits=8)[0])
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (8, 4)))
    np.testing.assert_array_equal(rtn_weight(w, np.int64(4), clip_grid=np.int64(10)), rtn_weight(w, 4, clip_grid=10))
    h = w @ w.T + np.eye(8)
    np.testing.assert_array_equal(gptq_weight(w, h, 4, blocksize=np.int64(2), percdamp=np.float32(0.5)),
                                  gptq_weight(w, h, 4, blocksize=2, percdamp=0.5))
    assert QuantSpec(w_bits=np.int64(4), w_method="gptq", percdamp=np.float32(1.5)).percdamp == 1.5
    for bad in (np.bool_(True), 4.0):
        with pytest.raises(ValueError, match="bits"):
            fake_quant(x, bad)


def test_linear_features_numpy_int_and_bad_features():
    from jaxformers.layers.linear import Linear

    x = jnp.ones((2, 3))
    p = Linear(np.int64(4), ("embed", "mlp")).init(jax.random.PRNGKey(0), x)
    assert p["params"]["kernel"].value.shape == (3, 4)
    p = Linear((np.int64(2), 2), ("embed", "heads", "kv")).init(jax.random.PRNGKey(0), x)
    assert p["params"]["kernel"].value.shape == (3, 2, 2)
    for bad in (0, (), (2, 0), 2.0, True, "4"):
        with pytest.raises(ValueError, match="features"):
            Linear(bad, ("embed", "mlp")).init(jax.random.PRNGKey(0), x)


def test_evaluate_takes_numpy_ints():
    """``evaluate``'s size arguments: numpy ints accepted (and passed on as Python ints)."""
    from jaxformers.training.trainer import evaluate
    from jaxformers.utils import init_params

    cfg = get_config("gpt", vocab_size=50, d_model=16, n_layer=1, n_head=2, max_seq_len=16)
    params = init_params(build(cfg), jax.random.PRNGKey(0))
    tokens = np.arange(400, dtype=np.int32) % 50
    out = evaluate((cfg, params), tokens, batch_size=np.int64(2), seq_len=np.int32(8), max_batches=np.int64(3))
    ref = evaluate((cfg, params), tokens, batch_size=2, seq_len=8, max_batches=3)
    assert out == ref
    json.dumps(out)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate("no-such-run", batch_size=np.bool_(True))
    with pytest.raises(ValueError, match="max_batches"):
        evaluate("no-such-run", max_batches=np.int64(0))


def test_batch_iterators_check_their_arguments_at_the_call():
    """``TokenLoader.iterate``, ``eval_batches``, ``iterate_rows`` and the sources' ``eval_batches``
    raised only at the first ``next()`` (generator functions): a bad argument passed far from
    where the batches are taken."""
    from jaxformers.data.loader import TokenLoader, eval_batches, iterate_rows
    from jaxformers.data.sources import open_data

    tokens = np.arange(200, dtype=np.int32) % 50
    loader = TokenLoader(tokens, 2, 8, seed=0)
    with pytest.raises(ValueError, match="start_step"):
        loader.iterate(-1)
    it = loader.iterate(3)
    np.testing.assert_array_equal(next(it), loader.batch_at(3))
    np.testing.assert_array_equal(next(it), loader.batch_at(4))
    with pytest.raises(ValueError, match="batch_size"):
        eval_batches(tokens, 0, 8)
    with pytest.raises(ValueError, match="max_batches"):
        eval_batches(tokens, 2, 8, max_batches=-1)
    with pytest.raises(ValueError, match="drop_last"):
        eval_batches(tokens, 2, 8, drop_last="yes")
    assert [b.shape for b in eval_batches(tokens, 8, 8, max_batches=2)] == [(8, 9), (8, 9)]
    assert [b.shape for b in eval_batches(tokens, 16, 8)] == [(16, 9), (8, 9)]
    with pytest.raises(ValueError, match="max_batches"):
        iterate_rows({"a": np.zeros((5, 2))}, 2, max_batches=-2)
    assert [b["a"].shape for b in iterate_rows({"a": np.zeros((5, 2))}, 2)] == [(2, 2), (2, 2), (1, 2)]
    with pytest.raises(ValueError, match="batch_size"):
        open_data("synthetic:copying").eval_batches(0, 16, 1)
    text = open_data(tokens)
    with pytest.raises(ValueError, match="batch_size"):
        text.eval_batches(0, 8, 1)
    assert len(list(text.eval_batches(2, 8, 3))) == 3


def test_domain_source_eval_batches_checks_at_the_call(tmp_path):
    from jaxformers.data.domains import DomainSource
    from jaxformers.data.sources import open_data

    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(("some text of domain " + name + ". ") * 200)
    src = open_data(f"domains:a={tmp_path / 'a.txt'}@1,b={tmp_path / 'b.txt'}@1")
    assert isinstance(src, DomainSource)
    with pytest.raises(ValueError, match="batch_size"):
        src.eval_batches(0, 16, 4)
    with pytest.raises(ValueError, match="max_batches"):
        src.eval_batches(2, 16, -3)
    assert list(src.eval_batches(2, 16, 0)) == []
    assert len(list(src.eval_batches(2, 16, 4))) == 4  # 2 per domain


def test_decode_refuses_a_batch_of_rows():
    """A ``[B, T]`` batch was flattened and decoded as one text (its rows run together)."""
    from jaxformers.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    assert tok.decode(np.asarray([104, 105])) == "hi" and tok.decode([104, 105]) == "hi"
    for batch in ([[104], [105]], np.asarray([[104, 105]])):
        with pytest.raises(ValueError, match=r"one sequence \[T\]"):
            tok.decode(batch)


def test_kernel_map_counts_outputs_from_what_the_kernel_returns():
    """One output named by a 1-tuple ``((names),)`` was taken for several outputs (``out_axes[0]``
    is a tuple) and failed inside ``eval_shape``'s result; what ``fn`` returns decides now."""
    from multidevice import run_on_devices

    script = r"""
import json
import jax, jax.numpy as jnp
from jaxformers.training.mesh import make_mesh, activate
from jaxformers.sharding import kernel_map, BATCH, ACT_HEADS
x = jnp.arange(4 * 3 * 4 * 2, dtype=jnp.float32).reshape(4, 3, 4, 2)
names = (BATCH, None, ACT_HEADS, None)
one = lambda a, b: a * b
two = lambda a, b: (a * b, a + b)
two_list = lambda a, b: [a * b, a + b]
out = {}
with activate(make_mesh("data=2,tensor=2")):
    for label, fn, out_axes in [("one", one, names), ("one_nested", one, (names,)), ("two", two, (names, names)),
                                ("two_flat", two, names), ("one_as_two", one, (names, names)),
                                ("two_list", two_list, [names, names]), ("two_mixed", two, (names, None))]:
        try:
            y = jax.jit(kernel_map(fn, (names, names), out_axes))(x, x)
            want = fn(x, x)
            ok = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(want)))
            out[label] = "ok" if ok and type(y) is type(want) else "wrong"
        except Exception as e:
            out[label] = f"{type(e).__name__}: {e}"
print("RESULT" + json.dumps(out))
"""
    out = run_on_devices(script, n=4)
    assert out["one"] == out["one_nested"] == out["two"] == out["two_list"] == "ok", out
    assert out["two_flat"].startswith("ValueError: kernel_map: the kernel returns 2 arrays, so out_axes must be a "
                                      "tuple of 2 tuples of names"), out["two_flat"]
    assert out["two_mixed"].startswith("ValueError: kernel_map: the kernel returns 2 arrays"), out["two_mixed"]
    assert out["one_as_two"].startswith("ValueError: kernel_map: in_axes / out_axes name 2 / 2 arrays, the "
                                        "kernel takes 2 and returns 1"), out["one_as_two"]


def test_kernel_map_refuses_out_axes_none():
    from jaxformers.sharding import kernel_map

    with pytest.raises(ValueError, match="out_axes must be a tuple"):
        kernel_map(lambda a: a, (("batch",),), None)


def test_throughput_refuses_a_step_before_the_interval():
    from jaxformers.training.metrics import Throughput

    t = Throughput(10, tokens_per_step=4)
    with pytest.raises(ValueError, match="done=9"):
        t.end_interval(9)
    assert t.train_tokens == 0
    assert t.end_interval(10) is None  # empty interval
    t.end_interval(12)
    assert t.train_tokens == 8
