"""Strided ("sliding-window") perplexity: ``evaluate(..., stride=S)`` / ``experiments.evaluate --stride S``
(Hugging Face's "Perplexity of fixed-length models": windows of T tokens every S tokens, each scoring
only the targets the previous window did not)."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.data import open_data
from jaxformers.data.loader import eval_batches, strided_eval_batches, strided_windows
from jaxformers.training import CompileCache, TrainConfig, load_run
from jaxformers.training import evaluate as _evaluate
from jaxformers.training import train
from corpora import word_corpus

CACHE = CompileCache(max_entries=4)
evaluate = functools.partial(_evaluate, cache=CACHE)
T = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny byte-level GPT trained 120 steps on a small repetitive corpus (context helps)."""
    root = tmp_path_factory.mktemp("stride")
    corpus = word_corpus(root / "corpus")
    model = jf.get_config("gpt", "tiny", vocab_size=257, d_model=32, n_layer=1, n_head=4, max_seq_len=T)
    tc = TrainConfig(steps=120, batch_size=8, seq_len=T, lr=1e-2, warmup_steps=2, data=str(corpus),
                     out_dir=str(root / "run"), log_every=40, eval_every=120, eval_batches=2,
                     checkpoint_every=120)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXFORMERS_CACHE", str(root / "cache"))
        summary = train(model, tc, progress=False, cache=CACHE)
        yield {"dir": root / "run", "corpus": str(corpus), "summary": summary}


# ----------------------------------------------------------------------------- windows (numpy only)
@pytest.mark.parametrize("n_tokens,seq_len,stride,max_windows", [
    (1000, 32, 32, None), (1000, 32, 8, None), (1000, 32, 7, None), (1000, 32, 1, None),
    (33, 32, 5, None), (100, 32, 31, None), (1000, 32, 12, 3), (1000, 32, 32, 5)])
def test_every_target_is_scored_exactly_once(n_tokens, seq_len, stride, max_windows):
    tokens = np.arange(n_tokens, dtype=np.int32)
    n_full = (n_tokens - 1) // seq_len if max_windows is None else min((n_tokens - 1) // seq_len, max_windows)
    counts = np.zeros(n_tokens, int)
    for batch in strided_eval_batches(tokens, 5, seq_len, stride, max_windows=max_windows):
        rows, mask = batch["tokens"], batch["loss_mask"]
        assert rows.shape == mask.shape and rows.shape[1] == seq_len + 1 and not mask[:, 0].any()
        for row, m in zip(rows, mask):  # tokens are positions: row[t] is token row[0] + t
            start = int(row[0])
            for t in np.flatnonzero(m):
                counts[start + t] += 1
                assert t >= seq_len - stride or start == 0  # >= seq_len - stride tokens of context
    assert (counts[1:n_full * seq_len + 1] == 1).all() and counts.sum() == n_full * seq_len


def test_stride_equal_to_seq_len_is_the_non_overlapping_windows():
    tokens = (np.arange(1000) * 7 % 257).astype(np.int32)
    old = list(eval_batches(tokens, 5, 32, None))
    new = list(strided_eval_batches(tokens, 5, 32, 32))
    assert len(old) == len(new) == 7
    for a, b in zip(old, new):
        np.testing.assert_array_equal(a, b["tokens"])
        assert (b["loss_mask"][:, 1:] == 1).all()
    # max_batches limits the batches (of strided windows)
    assert len(list(strided_eval_batches(tokens, 5, 32, 8, 2))) == 2


@pytest.mark.parametrize("stride", [0, -1, 33, 2.5])
def test_bad_stride_is_refused_naming_it(stride):
    with pytest.raises(ValueError, match=r"stride must be .*1 <= stride <= seq_len"):
        strided_windows(1000, 32, stride)


# ----------------------------------------------------------------------------- evaluate
def test_stride_seq_len_is_todays_result(run):
    base = evaluate(run["dir"])
    assert base["val_loss"] == pytest.approx(run["summary"]["val_loss"], rel=1e-5)
    same = evaluate(run["dir"], stride=T)
    assert same == base and same["stride"] == T
    whole = evaluate(run["dir"], max_batches=None)
    assert evaluate(run["dir"], max_batches=None, stride=T) == whole


def _direct_strided_loss(model_config, params, tokens, seq_len, stride):
    """HF's recipe, window by window with the model's own apply: (mean NLL, scored positions)."""
    module = jf.build(model_config)
    n_end = (len(tokens) - 1) // seq_len * seq_len  # the tokens the non-overlapping windows score
    begins = list(range(0, n_end - seq_len, stride)) + [n_end - seq_len]
    total, scored, prev_end = 0.0, [], 0
    for begin in begins:
        end = begin + seq_len
        trg_len = end - prev_end  # the targets not scored by the previous window
        logits = module.apply({"params": params}, jnp.asarray(tokens[None, begin:end]))
        logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
        targets = tokens[begin + 1:end + 1]
        nll = -np.take_along_axis(np.asarray(logp), targets[:, None].astype(np.int64), axis=1)[:, 0]
        total += float(nll[-trg_len:].sum())
        scored += list(range(end + 1 - trg_len, end + 1))
        prev_end = end
    return total / len(scored), scored


@pytest.mark.parametrize("stride", [8, 13])
def test_strided_loss_matches_a_direct_computation(run, stride):
    model_config, _, params = load_run(run["dir"])
    params = jax.device_get(params)
    tokens = np.asarray(open_data(run["corpus"], "byte").split_tokens("val"))
    expect, scored = _direct_strided_loss(model_config, params, tokens, T, stride)
    assert sorted(scored) == list(range(1, len(scored) + 1))  # each target once
    got = evaluate((model_config, params), run["corpus"], batch_size=8, max_batches=None, stride=stride)
    assert got["val_tokens"] == len(scored) == (len(tokens) - 1) // T * T
    assert got["stride"] == stride
    assert got["val_loss"] == pytest.approx(expect, rel=2e-5)
    assert got["val_ppl"] == pytest.approx(np.exp(expect), rel=1e-4)


def test_smaller_stride_scores_the_same_tokens_with_more_context(run):
    out = {s: evaluate(run["dir"], stride=s) for s in (T, T // 2, T // 4)}
    # the run's evaluation tokens (max_batches=-1) whatever the stride
    assert len({r["val_tokens"] for r in out.values()}) == 1
    # more context is better (by ~0.03 nats here: 0.616 -> 0.588); 16 vs 24 tokens of context is
    # a wash on this random-word corpus (a word is < 8 bytes), hence only "not worse" there
    assert out[T // 2]["val_loss"] < out[T]["val_loss"] - 0.01
    assert out[T // 4]["val_loss"] < out[T]["val_loss"] - 0.01
    assert out[T // 4]["val_loss"] <= out[T // 2]["val_loss"] + 1e-3
    # --max-batches counts strided batches: one batch of 8 windows scores T + 7 * stride tokens
    one = evaluate(run["dir"], max_batches=1, stride=T // 4)
    assert one["val_tokens"] == T + 7 * (T // 4)


def test_evaluate_refuses_bad_strides(run):
    for bad in (0, -3, T + 1, 1.5):
        with pytest.raises(ValueError, match="stride must be"):
            evaluate(run["dir"], stride=bad)
    model_config, _, params = load_run(run["dir"])
    with pytest.raises(ValueError, match=r"stride=8 needs text data"):
        evaluate((model_config, params), "synthetic:copying", seq_len=T, stride=8)


# ----------------------------------------------------------------------------- CLI
def test_cli_stride(run, capsys):
    from experiments import evaluate as cli
    assert cli.main(["--run", str(run["dir"]), "--stride", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = evaluate(run["dir"], stride=8)
    assert out["stride"] == 8 and out["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)
    assert out["val_tokens"] == ref["val_tokens"]
    assert cli.main(["--run", str(run["dir"])]) == 0
    assert json.loads(capsys.readouterr().out)["stride"] == T
    for argv in (["--stride", "0"], ["--seq-len", "16", "--stride", "17"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["--run", str(run["dir"])] + argv)
        assert e.value.code == 2 and "--stride" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # past the run's seq_len: the flag and its range, not the parameter
        cli.main(["--run", str(run["dir"]), "--stride", str(T + 1)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--stride must be 1 <= S <= --seq-len = {T} (the default: the run's" in err


def test_landmark_memory_evaluation_with_a_stride():
    """--memory-chunk with --stride: each window is read through the memory on its own, its loss_mask
    (the targets it scores) carried to the landmark loss; any stride fits."""
    from jaxformers.models.landmark import landmark_cross_entropy
    from jaxformers.training import get_loss
    L, V, seq = 4, 50, 40
    cfg = jf.get_config("landmark", "tiny", d_model=32, n_head=4, n_kv_head=2, n_layer=1, landmark_block=L,
                        vocab_size=V, max_seq_len=32, landmark_impl="reference", mem_chunk_len=8, mem_top_k=2)
    model = jf.build(cfg)
    params = jax.jit(lambda r: jf.init_params(model, r))(jax.random.PRNGKey(0))
    params = params["params"] if "params" in params else params
    tokens = np.random.default_rng(0).integers(0, V - 1, 200).astype(np.int32)
    n_end = (len(tokens) - 1) // seq * seq
    for stride in (seq, 7):
        got = evaluate((cfg, params), tokens, seq_len=seq, batch_size=3, max_batches=None, stride=stride,
                       loss_fn=get_loss("landmark_cross_entropy"))
        begins = list(range(0, n_end - seq, stride)) + [n_end - seq]
        total, count, prev_end = 0.0, 0.0, 0
        for begin in begins:  # HF's trg_len, one window at a time
            mask = np.zeros((1, seq + 1), np.float32)
            mask[0, seq + 1 - (begin + seq - prev_end):] = 1
            loss, m = landmark_cross_entropy(model, params, {"tokens": jnp.asarray(tokens[None, begin:begin + seq + 1]),
                                                             "loss_mask": jnp.asarray(mask)})
            total += float(loss) * float(m["n_targets"])
            count += float(m["n_targets"])
            prev_end = begin + seq
        assert got["val_tokens"] == count == n_end
        assert got["val_loss"] == pytest.approx(total / count, rel=2e-5)
