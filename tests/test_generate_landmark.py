"""``jf.generate`` on a landmark model (the ``forced_tokens`` hook of the shared sampler): raw
prompts in, raw tokens out (same contract as every model); the library inserts the landmarks at
``t % L == L - 1``, feeds them there, samples the token after a landmark from the logits *at* the
landmark, never samples the landmark id and removes the landmarks from the result.  Greedy tokens
are the full forward's argmax over the with-landmark sequence."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.decoding import max_raw_tokens
from jaxformers.models.landmark import LandmarkConfig, insert_landmarks
from jaxformers.training.rundir import CONFIG_FILE

L = 4                                                     # 3 raw tokens + landmark per block
V = 64                                                    # landmark id: V - 1 = 63
PROMPTS = np.random.default_rng(0).integers(0, V - 1, (8, 9)).astype(np.int32)
LENGTHS = np.array([1, 2, 3, 4, 5, 6, 7, 9], np.int32)    # prompt ends at every offset in a block
NEW = 10                                                  # crosses 3-4 landmark positions


def _model(**kw):
    cfg = jf.get_config("landmark", "tiny", d_model=32, n_head=2, n_layer=2, landmark_block=L,
                        vocab_size=V, max_seq_len=128, landmark_impl="reference", **kw)
    model = jf.build(cfg)
    return model, {"params": jax.jit(lambda r: jf.init_params(model, r))(jax.random.PRNGKey(0))}


@pytest.fixture(scope="module")
def tiny():
    model, params = _model()
    greedy = np.asarray(jf.generate(model, params, PROMPTS, NEW, temperature=0.0,
                                    prompt_lengths=LENGTHS))
    return model, params, greedy


def _pos(j):
    """The with-landmark position of raw token ``j``."""
    return j + j // (L - 1)


def _check_greedy(model, params, out, lengths):
    """Each new raw token is the argmax (landmark id excluded) of the full forward over the
    with-landmark sequence at the position before it: the landmark itself after a block end."""
    seq, is_lm = insert_landmarks(out, L, V - 1)
    logits = np.asarray(model.apply(params, jnp.asarray(seq)), np.float64)
    logits[..., V - 1] = -np.inf
    after_landmark = 0
    for b, n in enumerate(lengths):
        for j in range(n, n + NEW):
            t = _pos(j)
            assert not is_lm[b, t] and seq[b, t] == out[b, j]
            after_landmark += bool(is_lm[b, t - 1])
            assert out[b, j] == logits[b, t - 1].argmax(), (b, n, j)
    assert after_landmark >= 3 * len(lengths)


def test_greedy_is_the_full_forwards_argmax_over_the_landmark_sequence(tiny):
    model, params, out = tiny
    assert out.shape == (8, 9 + NEW) and out.dtype == np.int32
    for b, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(out[b, :n], PROMPTS[b, :n])
        assert (out[b, n + NEW:] == 0).all()                  # pad (default 0) after short rows
    _check_greedy(model, params, out, LENGTHS)
    assert not (out[:, 9:] == V - 1).any()


def test_scanned_layers_generate_the_same(tiny):
    """``scan_layers=True`` (the cache stacked per layer on axis 0; ``num_samples`` repeats it on
    axis 1): the same greedy tokens as the unrolled model with the same weights."""
    model, params, out = tiny
    scanned, _ = _model(scan_layers=True)
    blocks = [params["params"][f"blocks_{i}"] for i in range(2)]
    sparams = {k: v for k, v in params["params"].items() if not k.startswith("blocks_")}
    sparams["blocks"] = jax.tree.map(lambda *x: jnp.stack(x), *blocks)
    shapes = jax.eval_shape(lambda r: jf.init_params(scanned, r), jax.random.PRNGKey(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(sparams)
    got = np.asarray(jf.generate(scanned, {"params": sparams}, PROMPTS, NEW, temperature=0.0,
                                 prompt_lengths=LENGTHS, num_samples=2))
    np.testing.assert_array_equal(got[::2], out)
    np.testing.assert_array_equal(got[1::2], out)


@pytest.mark.parametrize("row", [0, 2])  # prompt length 1; 3 (= L - 1: ends at a landmark)
def test_ragged_rows_decode_as_alone(tiny, row):
    """Without ``prompt_lengths`` (the whole prompt prefilled) a row gives what it gives in the
    ragged batch."""
    model, params, out = tiny
    n = int(LENGTHS[row])
    alone = np.asarray(jf.generate(model, params, PROMPTS[row:row + 1, :n], NEW, temperature=0.0))
    assert alone.shape == (1, n + NEW)
    np.testing.assert_array_equal(alone[0], out[row, :n + NEW])


def test_num_samples_eos_and_pad(tiny):
    model, params, greedy = tiny
    eos = int(greedy[1, LENGTHS[1] + 2])                    # row 1 stops after its 3rd new token
    out = np.asarray(jf.generate(model, params, PROMPTS, NEW, temperature=0.0, prompt_lengths=LENGTHS,
                                 num_samples=2, eos_id=eos, pad_id=62))
    assert out.shape == (16, 9 + NEW)
    stopped = 0
    for b, n in enumerate(LENGTHS):
        new = greedy[b, n:n + NEW]
        stop = int(np.argmax(new == eos)) + 1 if (new == eos).any() else NEW
        stopped += stop < NEW
        for r in (2 * b, 2 * b + 1):
            np.testing.assert_array_equal(out[r, :n], PROMPTS[b, :n])
            np.testing.assert_array_equal(out[r, n:n + stop], new[:stop])
            assert (out[r, n + stop:] == 62).all(), (r, out[r])
    assert stopped >= 1


def test_sampling_follows_the_rng(tiny):
    model, params, _ = tiny
    def run(seed):
        return np.asarray(jf.generate(model, params, PROMPTS, NEW, temperature=1.0, prompt_lengths=LENGTHS,
                                      rng=jax.random.PRNGKey(seed)))

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for out in (a, c):
        assert out.shape == (8, 9 + NEW)
        for r, n in enumerate(LENGTHS):
            np.testing.assert_array_equal(out[r, :n], PROMPTS[r, :n])
            assert not (out[r, n:n + NEW] == V - 1).any()


def test_the_landmark_id_is_never_sampled():
    """Every logit 0 (final norm scale 0), landmark id 0: unmasked greedy would pick the
    landmark everywhere; the sampler masks it (whatever vocab_limit), so greedy picks 1 and
    temperature sampling draws from the other ids only."""
    model, params = _model(landmark_id=0)
    params["params"]["final_norm"]["scale"] = jnp.zeros_like(params["params"]["final_norm"]["scale"])
    prompt = PROMPTS[:2, :5] + 1
    greedy = np.asarray(jf.generate(model, params, prompt, 12, temperature=0.0))
    assert (greedy[:, 5:] == 1).all()
    hot = np.asarray(jf.generate(model, params, prompt, 12, temperature=1.0, num_samples=8,
                                 rng=jax.random.PRNGKey(3)))
    assert hot.shape == (16, 17) and not (hot[:, 5:] == 0).any() and len(np.unique(hot[:, 5:])) > 30
    with pytest.raises(ValueError, match="eos_id=0 is the token LandmarkTransformer forces"):
        jf.generate(model, params, prompt, 4, eos_id=0)


def test_hook_and_raw_capacity():
    model, _ = _model()
    assert model.forced_tokens() == (L, V - 1) and not hasattr(model, "check_generate")
    assert [max_raw_tokens(model, m) for m in (1, 3, 4, 7, 8, 128)] == [1, 3, 3, 6, 6, 96]
    gpt = jf.build(jf.get_config("gpt", "tiny"))
    assert max_raw_tokens(gpt, 128) == 128
    # the raw capacity is what it says: 96 raw tokens fill 128 positions, the last one included
    assert _pos(95) == 126 and _pos(96) == 128


@pytest.fixture(scope="module")
def landmark_run(tmp_path_factory):
    """A 2-step landmark run of the train CLI (byte tokenizer, L=4, max_seq_len=64, seq_len 24)."""
    from experiments import train as train_cli

    tmp_path = tmp_path_factory.mktemp("landmark_run")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    rng = np.random.default_rng(0)
    (corpus / "a.txt").write_text(" ".join(rng.choice(words, size=400)) + ".\n")
    run = tmp_path / "run"
    sets = ["d_model=32", "n_layer=1", "landmark_block=4", "max_seq_len=64",
            "landmark_impl=reference"]
    sets = [a for s in sets for a in ("--set", s)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
        assert train_cli.main(["--model", "landmark", "--preset", "tiny", *sets,
                               "--loss", "landmark_cross_entropy", "--data", str(corpus), "--steps", "2",
                               "--batch-size", "4", "--seq-len", "24", "--log-every", "1",
                               "--eval-every", "0", "--eval-batches", "1", "--checkpoint-every", "0",
                               "--no-compile-cache", "--quiet", "--out", str(run)]) == 0
    return run


def test_cli_generates_from_a_landmark_run(landmark_run, capsys):
    """A 2-step landmark run (byte tokenizer: the train CLI gives it vocab 258, so the landmark
    257 is no byte and not the end-of-text id 256) samples text without landmarks, also up to
    the end-of-text token."""
    from experiments import generate as gen_cli

    run = landmark_run
    model_config = json.loads((run / CONFIG_FILE).read_text())["model"]
    assert model_config["vocab_size"] == 258 and model_config["landmark_id"] is None
    rc = gen_cli.main(["--run", str(run), "--prompt", "the quick", "--max-new-tokens", "9",
                       "--num-samples", "2", "--seed", "1", "--json", "--stop-at-eos"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    got = json.loads(out.out)
    assert got["prompt"] == "the quick" and len(got["samples"]) == 2
    rc = gen_cli.main(["--run", str(run), "--prompt", "the quick", "--max-new-tokens", "9",
                       "--temperature", "0"])
    out = capsys.readouterr()
    assert rc == 0 and out.out.startswith("the quick"), out.err
    plain = out.out
    # 64 positions hold 48 raw tokens: the CLI's limit is in raw tokens
    rc = gen_cli.main(["--run", str(run), "--max-new-tokens", "48"])
    out = capsys.readouterr()
    assert rc == 2 and "must be < 48 (max_seq_len=64 less the landmark positions)" in out.err
    # through the retrieval memory: with every block retrieved, the same greedy text as the
    # full cache; past max_seq_len; bad options name themselves
    rc = gen_cli.main(["--run", str(run), "--prompt", "the quick", "--max-new-tokens", "9",
                       "--temperature", "0", "--memory-chunk", "8", "--memory-top-k", "14"])
    assert rc == 0 and capsys.readouterr().out == plain
    rc = gen_cli.main(["--run", str(run), "--max-new-tokens", "100", "--memory-chunk", "8", "--json"])
    out = capsys.readouterr()
    assert rc == 0 and len(json.loads(out.out)["samples"][0]) > 0, out.err
    for args, message in ((["--memory-chunk", "6"], "--memory-chunk must be a positive multiple of landmark_block=4"),
                          (["--memory-chunk", "64"], "more than max_seq_len=64"),
                          (["--memory-chunk", "8", "--memory-top-k", "0"], "--memory-top-k must be >= 1")):
        assert gen_cli.main(["--run", str(run), "--max-new-tokens", "4", *args]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gen_cli.main(["--run", str(run), "--memory-top-k", "2"])
    assert "--memory-top-k needs --memory-chunk" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--memory-chunk needs a landmark model"):
        gen_cli.with_memory_decoding(jf.get_config("gpt", "tiny"), 8, None)


def test_cli_evaluates_a_landmark_run_through_its_memory(landmark_run, tmp_path, monkeypatch, capsys):
    """``experiments.evaluate --memory-chunk``: with every block retrieved the run's own loss;
    windows past max_seq_len; a run whose config sets ``mem_chunk_len`` evaluates and generates
    through its memory without the option (no prompt cut)."""
    import shutil
    from experiments import evaluate as eval_cli
    from experiments import generate as gen_cli

    monkeypatch.setenv("JAXFORMERS_CACHE", str(landmark_run.parent / "cache"))  # the run's prepared corpus

    def evaluate(run, *args):
        rc = eval_cli.main(["--run", str(run), "--split", "train", "--max-batches", "2", *args])
        out = capsys.readouterr()
        assert rc == 0, out.err
        return json.loads(out.out)

    plain = evaluate(landmark_run)
    every_block = evaluate(landmark_run, "--memory-chunk", "8", "--memory-top-k", "14")
    assert every_block["val_tokens"] == plain["val_tokens"] == 2 * 4 * 24
    assert every_block["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)
    retrieved = evaluate(landmark_run, "--memory-chunk", "8", "--memory-top-k", "1")
    assert abs(retrieved["val_loss"] - plain["val_loss"]) > 1e-4           # top-1 of up to 5 blocks
    long = evaluate(landmark_run, "--seq-len", "150", "--memory-chunk", "8")  # 200 positions > 64
    assert long["val_tokens"] == 2 * 4 * 150 and np.isfinite(long["val_loss"])
    for args, message in ((["--memory-chunk", "6"], "--memory-chunk must be a positive multiple of landmark_block=4"),
                          (["--memory-chunk", "64"], "more than max_seq_len=64")):
        assert eval_cli.main(["--run", str(landmark_run), *args]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main(["--run", str(landmark_run), "--memory-top-k", "2"])
    assert "--memory-top-k needs --memory-chunk" in capsys.readouterr().err

    run = tmp_path / "memory_run"                  # the same run, mem_chunk_len in its config
    shutil.copytree(landmark_run, run)
    config = json.loads((run / CONFIG_FILE).read_text())
    config["model"].update(mem_chunk_len=8, mem_top_k=1)
    (run / CONFIG_FILE).write_text(json.dumps(config))
    assert evaluate(run)["val_loss"] == pytest.approx(retrieved["val_loss"], rel=1e-6)
    rc = gen_cli.main(["--run", str(run), "--max-new-tokens", "100", "--json"])  # no 48-token limit
    out = capsys.readouterr()
    assert rc == 0 and len(json.loads(out.out)["samples"][0]) > 0, out.err


def test_the_train_cli_adds_the_landmark_to_the_datas_vocabulary():
    """``vocab_size`` from the data: one more id for a landmark model (its default landmark
    ``vocab_size - 1`` is then no data token), none when ``landmark_id`` is given or for others."""
    assert LandmarkConfig.vocab_size_for_data(257, {}) == 258
    assert LandmarkConfig.vocab_size_for_data(257, {"landmark_id": 3}) == 257
    assert type(jf.get_config("gpt", "tiny")).vocab_size_for_data(257, {}) == 257
