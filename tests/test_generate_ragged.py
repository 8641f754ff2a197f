"""``generate(prompt_lengths=...)``: prompts of different lengths in one batch.  Each row sees only
its own tokens (the shortest prompt is prefilled, longer rows are fed their remaining prompt
tokens one per step), so greedy decoding of a row equals the model's argmax over that row, for
every architecture, and uniform lengths give exactly what ``generate`` gives without them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.registry import build, get_config, list_models

PROMPTS = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (3, 9), 1, 200), np.int32)
LENGTHS = np.array([4, 9, 6], np.int32)
NEW = 5


def _model(name, **kw):
    config = get_config(name, "tiny", **kw)
    module = build(config)
    return module, {"params": jf.init_params(module, jax.random.PRNGKey(0))}


def _padded(prompts, lengths, value):
    """The prompts with every position past a row's length set to ``value`` (it must be ignored)."""
    return np.where(np.arange(prompts.shape[1])[None] < lengths[:, None], prompts, value)


def _check_layout(out, prompts, lengths, new, fill):
    """Row b: its prompt, ``new`` generated ids, then ``fill`` to the end."""
    assert out.shape == (len(lengths), prompts.shape[1] + new)
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(out[b, :n], prompts[b, :n])
        assert (out[b, n + new:] == fill).all(), (b, out[b])


@pytest.mark.parametrize("name", [n for n in list_models() if not n.startswith("test-")
                                  and n not in ("landmark", "adaptive_cotformer")])  # no generic decoding
def test_greedy_ragged_rows_are_the_models_argmax_over_each_row(name):
    """One forward pass over the generated rows (positions past a row's end are after its last
    token, so causality keeps them out) gives each generated token as its argmax: no row
    attended to (or scanned over) padding or another row's prompt tokens."""
    module, params = _model(name)
    out = np.asarray(jf.generate(module, params, _padded(PROMPTS, LENGTHS, 7), NEW, temperature=0.0,
                                 prompt_lengths=LENGTHS))
    _check_layout(out, PROMPTS, LENGTHS, NEW, 0)
    full = module.apply(params, jnp.asarray(out[:, :-1]))
    logits = np.asarray(full[0] if isinstance(full, tuple) else full)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(out[b, n:n + NEW], logits[b, n - 1:n - 1 + NEW].argmax(-1), err_msg=name)


@pytest.mark.parametrize("name", ["llama", "mamba2", "hybrid"])
def test_each_ragged_row_decodes_as_it_would_alone(name):
    module, params = _model(name)
    out = np.asarray(jf.generate(module, params, PROMPTS, NEW, temperature=0.0, prompt_lengths=LENGTHS))
    for b, n in enumerate(LENGTHS):
        alone = np.asarray(jf.generate(module, params, PROMPTS[b:b + 1, :n], NEW, temperature=0.0))
        np.testing.assert_array_equal(out[b, :n + NEW], alone[0])


def test_full_lengths_give_exactly_the_unragged_samples():
    """Same rng stream, same steps: sampling with temperature, top-k and eos is unchanged."""
    module, params = _model("gpt")
    kw = dict(temperature=1.0, top_k=20, rng=jax.random.PRNGKey(5), num_samples=2, eos_id=3)
    want = np.asarray(jf.generate(module, params, PROMPTS, NEW, **kw))
    got = np.asarray(jf.generate(module, params, PROMPTS, NEW, prompt_lengths=[9, 9, 9], **kw))
    np.testing.assert_array_equal(got, want)


def test_ragged_num_samples_and_eos_fill_with_pad():
    module, params = _model("llama")
    # greedy: find each row's first new token, then stop at it to check the eos bookkeeping
    greedy = np.asarray(jf.generate(module, params, PROMPTS, NEW, temperature=0.0, prompt_lengths=LENGTHS))
    eos = int(greedy[1, LENGTHS[1]])  # row 1 stops after its first new token
    out = np.asarray(jf.generate(module, params, PROMPTS, NEW, temperature=0.0, prompt_lengths=LENGTHS,
                                 num_samples=2, eos_id=eos, pad_id=1))
    assert out.shape == (6, 9 + NEW)
    for b, n in enumerate(LENGTHS):
        for r in (2 * b, 2 * b + 1):
            row, want = out[r], greedy[b]
            np.testing.assert_array_equal(row[:n], PROMPTS[b, :n])  # prompt tokens equal to eos stay
            new = want[n:n + NEW]
            stop = int(np.argmax(new == eos)) + 1 if (new == eos).any() else NEW
            np.testing.assert_array_equal(row[n:n + stop], new[:stop])
            assert (row[n + stop:] == 1).all(), (r, row)


def test_qk_sparse_rows_prefill_their_own_samples():
    """qk_sparse draws keep masks per row: with ragged prompts and num_samples each sample's
    greedy tokens are still the model's argmax over that sample's row."""
    module, params = _model("qk_sparse")
    out = np.asarray(jf.generate(module, params, PROMPTS, NEW, temperature=0.0, prompt_lengths=LENGTHS,
                                 num_samples=2))
    logits = np.asarray(module.apply(params, jnp.asarray(out[:, :-1])))
    for r in range(6):
        n = LENGTHS[r // 2]
        np.testing.assert_array_equal(out[r, n:n + NEW], logits[r, n - 1:n - 1 + NEW].argmax(-1))


@pytest.mark.parametrize("lengths,match", [
    ([4, 9], "prompt_lengths must be 3 ints"),
    ([0, 9, 6], r"prompt_lengths must be in \[1, P=9\]"),
    ([4, 10, 6], r"prompt_lengths must be in \[1, P=9\]"),
    ([4.0, 9, 6], "prompt_lengths must be 3 ints"),
    ([[4, 9, 6]], "prompt_lengths must be 3 ints"),
])
def test_bad_prompt_lengths_name_the_argument(lengths, match):
    module, params = _model("gpt")
    with pytest.raises(ValueError, match=match):
        jf.generate(module, params, PROMPTS, 2, prompt_lengths=lengths)


def test_traced_prompt_lengths_and_bad_ids_are_refused():
    module, params = _model("gpt")
    with pytest.raises(ValueError, match="prompt_lengths must be known outside jit"):
        jax.jit(lambda n: jf.generate(module, params, PROMPTS, 2, prompt_lengths=n))(jnp.asarray(LENGTHS))
    bad = PROMPTS.copy()
    bad[0, 1] = -1  # inside row 0's prompt
    with pytest.raises(ValueError, match="prompt_tokens must be ids"):
        jf.generate(module, params, bad, 2, prompt_lengths=LENGTHS)
    # pad_id alone is fine with ragged prompts (it fills the short rows' tails)
    out = np.asarray(jf.generate(module, params, _padded(PROMPTS, LENGTHS, -1), 2, temperature=0.0,
                                 prompt_lengths=LENGTHS, pad_id=2))
    _check_layout(out, PROMPTS, LENGTHS, 2, 2)
    with pytest.raises(ValueError, match="pad_id needs eos_id or prompt_lengths"):
        jf.generate(module, params, PROMPTS, 2, pad_id=2)


def _cli(tmp_path, monkeypatch, capsys, argv):
    """experiments.generate on a run of a random tiny gpt with the byte tokenizer (greedy)."""
    import jaxformers.training as training
    from experiments import generate as gen_cli
    from jaxformers.data.tokenizer import get_tokenizer
    from jaxformers.training.rundir import TOKENIZER_DIR

    tok = get_tokenizer("byte")
    run = tmp_path / "run"
    if not (run / TOKENIZER_DIR).exists():
        tok.save(run / TOKENIZER_DIR)
    config = get_config("gpt", "tiny", vocab_size=tok.vocab_size, max_seq_len=64)
    params = jf.init_params(build(config), jax.random.PRNGKey(0))
    monkeypatch.setattr(training, "load_run", lambda r, **kw: (config, None, params))
    capsys.readouterr()
    rc = gen_cli.main(["--run", str(run), "--max-new-tokens", "6", "--temperature", "0", "--json"] + argv)
    out = capsys.readouterr()
    return rc, out


def test_cli_prompt_file_samples_each_prompt_as_alone(tmp_path, monkeypatch, capsys):
    import json
    prompts = ["To be", "", "ROMEO: what light", "a"]
    (tmp_path / "p.txt").write_text("To be\n\nROMEO: what light\r\na\n   \n")  # blank lines skipped
    rc, out = _cli(tmp_path, monkeypatch, capsys, ["--prompt-file", str(tmp_path / "p.txt"),
                                                    "--num-samples", "2"])
    assert rc == 0, out.err
    got = json.loads(out.out)
    kept = [p for p in prompts if p]
    assert got["prompts"] == kept and [len(s) for s in got["samples"]] == [2, 2, 2]
    for prompt, samples in zip(kept, got["samples"]):
        rc, alone = _cli(tmp_path, monkeypatch, capsys, ["--prompt", prompt])
        assert rc == 0 and samples == [json.loads(alone.out)["samples"][0]] * 2, prompt


def test_cli_prompt_file_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "blank.txt").write_text("\n  \n")
    rc, out = _cli(tmp_path, monkeypatch, capsys, ["--prompt-file", str(tmp_path / "blank.txt")])
    assert rc == 2 and "has no prompt" in out.err
    rc, out = _cli(tmp_path, monkeypatch, capsys, ["--prompt-file", str(tmp_path / "missing.txt")])
    assert rc == 2 and "--prompt-file" in out.err
    with pytest.raises(SystemExit):
        _cli(tmp_path, monkeypatch, capsys, ["--prompt-file", str(tmp_path / "blank.txt"), "--prompt", "x"])
