"""Regression tests of the layer-parallel / landmark / SCFA audit (experiments.layer_parallel,
jaxformers.models.scfa)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf


def test_layer_parallel_evaluator_counts_only_the_loss_mask_targets():
    # the Evaluator averaged over every target: with --run R --data synthetic:TASK its val_ppl /
    # val_acc included the task's random filler, not the answer tokens the run was validated on
    from experiments.layer_parallel import Evaluator
    from jaxformers.data import open_data
    from jaxformers.training.losses import cross_entropy

    data = "synthetic:copying"
    src = open_data(data, "byte")
    cfg = jf.get_config("llama", "tiny", vocab_size=src.vocab_size, d_model=32, n_layer=2, n_head=4,
                        max_seq_len=64)
    model = jf.build(cfg)
    params = jax.jit(lambda r: jf.init_params(model, r))(jax.random.PRNGKey(0))
    got = Evaluator(data, "byte", 4, 32, 2, "float32")(cfg, params)
    loss = jax.jit(lambda p, b: cross_entropy(model, p, b)[0])
    nll = n = 0.0
    for b in src.eval_batches(4, 32, 2, drop_last=True):
        b = {k: jnp.asarray(v) for k, v in b.items()}
        w = float(jnp.sum(b["loss_mask"][:, 1:]))
        nll, n = nll + float(loss(params, b)) * w, n + w
    assert got["val_tokens"] == int(n) < 4 * 2 * 32
    np.testing.assert_allclose(got["val_loss"], nll / n, rtol=1e-5)


def test_layer_parallel_experiment_keeps_the_rows_measured_before_an_interruption(tmp_path, monkeypatch):
    # results.json was first written after every pair AND the whole study: a stage killed by its
    # timeout during the quality part lost every number it had measured
    from experiments import layer_parallel as exp

    cfg = jf.get_config("llama", "tiny", vocab_size=257, d_model=32, n_layer=4, n_head=4, n_kv_head=2,
                        d_ff=64, max_seq_len=64)
    params = jax.device_get(jax.jit(lambda r: jf.init_params(jf.build(cfg), r))(jax.random.PRNGKey(0)))
    monkeypatch.setattr(exp, "load_model", lambda args, preset, out: (cfg, params, "default", "byte",
                                                                      {"source": "test"}))
    calls, real = [], exp.Evaluator.__call__

    def evaluate(self, c, p):
        calls.append(c)
        if len(calls) == 4:  # baseline, (1,3) own, (1,3) mean, then the study's first delete
            raise KeyboardInterrupt
        return real(self, c, p)

    monkeypatch.setattr(exp.Evaluator, "__call__", evaluate)
    out = tmp_path / "lp"
    with pytest.raises(KeyboardInterrupt):
        exp.main(["--preset", "tiny", "--out", str(out), "--eval-batches", "1", "--seq-len", "16",
                  "--batch-size", "2", "--decode-tokens", "3", "--iters", "1", "--no-compile-cache"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] is False and saved["baseline"]["val_ppl"] > 1
    assert [(r["start"], r["end"], r["mlp_norm"]) for r in saved["pairs"]] == [(1, 3, "own"), (1, 3, "mean")]
    assert all(r["rel_ppl_increase"] == r["val_ppl"] / saved["baseline"]["val_ppl"] - 1 for r in saved["pairs"])
    assert saved["study"] == {"delete": [], "swap": [], "shuffle": []}


@pytest.mark.parametrize("bad", [1, {0}, "0"])
def test_scfa_sparse_layers_must_be_a_list_or_tuple(bad):
    # an int gave a bare TypeError ("'int' object is not iterable"); a set was accepted, then the
    # config could not be hashed (jit / lru caches); a string was iterated character by character
    with pytest.raises(ValueError, match="sparse_layers must be None or a list / tuple"):
        jf.get_config("hash_sparse", "tiny", sparse_layers=bad)
    assert jf.get_config("hash_sparse", "tiny", sparse_layers=[0]).sparse_layers == (0,)


def test_swap_layers_refuses_a_no_op_swap():
    # swap_layers(c, p, 2, 2) returned the unmodified model (shuffle_layers refuses the identity)
    from jaxformers.transforms import swap_layers

    cfg = jf.get_config("gpt", "tiny", n_layer=4, d_model=32, n_head=4, vocab_size=64, max_seq_len=32)
    params = jax.jit(lambda r: jf.init_params(jf.build(cfg), r))(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="i=2, j=2: a swap needs two different layers"):
        swap_layers(cfg, params, 2, 2)
    assert swap_layers(cfg, params, 2, 0)[0] == cfg
