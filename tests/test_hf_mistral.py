"""HF Mistral interop: a Mistral checkpoint is a Llama with sliding-window attention in every
layer; it imports as a ``llama`` config with ``window=sliding_window`` and a windowed ``llama``
exports as ``MistralForCausalLM``.  Lengths exceed the window, so a wrong window (or one off by
one) moves the logits by far more than the tolerance."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxformers as jf  # noqa: E402
from jaxformers.convert import config_from_hf, config_to_hf, from_hf, to_hf  # noqa: E402
from jaxformers.utils import abstract_params  # noqa: E402
from test_convert_hf import (  # noqa: E402
    assert_export_round_trip, _edit_config, hf_logits, hf_model, jax_logits, load_auto, max_diff,
    stepwise_logits, tokens, TOL)

pytestmark = pytest.mark.hf

WINDOW, LENGTH = 5, 20  # each query past position 4 sees 5 keys, itself included


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """GQA (4 heads, 2 kv heads) and an explicit head_dim (32, not 64 / 4)."""
    model = hf_model(arch="mistral", sliding_window=WINDOW, head_dim=32)
    path = str(tmp_path_factory.mktemp("hf_mistral"))
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def test_the_window_means_the_same_keys_as_transformers_mask():
    """transformers: query i sees key j when ``j > i - sliding_window`` and ``j <= i``; jaxformers'
    ``window`` the same, so the import carries the number unchanged (no +-1)."""
    from transformers.masking_utils import sliding_window_causal_mask_function
    from jaxformers.ops.attention import attention_mask

    t = 12
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    for w in (1, 3, WINDOW, t + 2):
        theirs = sliding_window_causal_mask_function(w)(0, 0, i, j).numpy()
        ours = np.asarray(attention_mask(t, t, causal=True, window=w))
        np.testing.assert_array_equal(ours.reshape(t, t), theirs, err_msg=f"window {w}")
        assert theirs.sum(-1).max() == min(w, t)


def test_import_matches_transformers_past_the_window(mistral):
    model, path = mistral
    config, params = from_hf(path)
    assert (config.model, config.window, config.n_head, config.kv_heads, config.dim_head) == \
        ("llama", WINDOW, 4, 2, 32)
    assert params["blocks_0"]["attn"]["o"]["kernel"].shape == (4, 32, 64)
    toks = tokens(shape=(2, LENGTH))
    ref = hf_logits(model, toks)
    assert np.abs(ref).max() > 1.0
    assert max_diff(ref, jax_logits(config, params, toks)) < TOL
    for other in (None, WINDOW - 1, WINDOW + 1):  # the window matters, to the key
        assert max_diff(ref, jax_logits(config.replace(window=other), params, toks)) > 100 * TOL, other


def test_windowed_llama_exports_as_mistral_and_round_trips(tmp_path):
    config = jf.get_config("llama", "tiny", vocab_size=96, d_model=32, n_head=4, n_kv_head=1, head_dim=16,
                           d_ff=48, window=4, tie_embeddings=True, max_seq_len=64)
    rng = np.random.RandomState(0)  # random values, norm scales around 1 (numpy: no init to compile)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: np.float32(("scale" in jax.tree_util.keystr(path)) + 0.2 * rng.standard_normal(s.shape)),
        abstract_params(jf.build(config)))
    out = to_hf(config, params, str(tmp_path / "out"))
    hf = json.load(open(f"{out}/config.json"))
    assert (hf["model_type"], hf["architectures"], hf["sliding_window"]) == \
        ("mistral", ["MistralForCausalLM"], 4)
    assert "attention_bias" not in hf  # not a MistralConfig key
    model = load_auto(out)
    assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window == 4
    assert_export_round_trip(config, params, out, model)
    plain = config_to_hf(config.replace(window=None))  # no window: Llama as before
    assert plain["model_type"] == "llama" and "sliding_window" not in plain


def test_kv_cache_decoding_past_the_window_equals_the_forward(mistral):
    """Step-by-step decoding of the imported model reproduces its full forward at every position
    (prefill 3, then one token a step up to 2 * window + 4), and greedy ``jf.generate`` the tokens
    transformers' own generate (its sliding-window cache) picks."""
    model, path = mistral
    config, params = from_hf(path)
    toks = jnp.asarray(tokens(2, shape=(2, 2 * WINDOW + 4)))
    full = jax_logits(config, params, np.asarray(toks))
    np.testing.assert_allclose(stepwise_logits(config, params, toks), full, atol=2e-5, rtol=1e-5)

    prompt, new = np.asarray(toks[:, :3]), 2 * WINDOW
    ours = np.asarray(jf.generate(jf.build(config), {"params": params}, prompt, new, temperature=0.0))
    with torch.no_grad():
        no_eos = transformers.GenerationConfig(max_new_tokens=new, do_sample=False)  # every row runs to the end
        theirs = model.generate(torch.from_numpy(prompt.astype(np.int64)), generation_config=no_eos).numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("changes, key", [
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (dict(layer_types=["full_attention"] * 2), "layer_types"),  # full layers but a sliding_window: ambiguous
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=2.5), "sliding_window"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}), "rope_type"),
    (dict(intermediate_size=None), "intermediate_size"),
])
def test_a_config_jaxformers_cannot_compute_is_refused_naming_the_key(mistral, tmp_path, changes, key):
    _, path = mistral
    with pytest.raises(ValueError, match=key):
        from_hf(_edit_config(path, str(tmp_path / "bad"), **changes))


def test_omitted_and_null_keys_read_as_transformers_reads_them(mistral, tmp_path):
    """MistralConfig's own defaults: an omitted sliding_window is 4096 (null: no window), omitted
    num_key_value_heads 8, intermediate_size 14336, max_position_embeddings 131072; a uniform
    layer_types list that agrees with the window is accepted (a mixed one is refused above)."""
    sizes = dict(model_type="mistral", vocab_size=64, hidden_size=64, num_attention_heads=8,
                 num_hidden_layers=2)
    for extra, window in ((dict(), 4096), (dict(sliding_window=None), None),
                          (dict(sliding_window=7, layer_types=["sliding_attention"] * 2), 7),
                          (dict(sliding_window=None, layer_types=["full_attention"] * 2), None)):
        hf = {**sizes, **extra}
        ours = config_from_hf(hf)
        (tmp_path / "config.json").write_text(json.dumps(hf))
        theirs = transformers.AutoConfig.from_pretrained(str(tmp_path))
        # (AutoConfig reads a mistral config.json with layer_types as Ministral: per-layer windows)
        assert type(theirs).__name__ == ("MinistralConfig" if "layer_types" in extra else "MistralConfig")
        assert ours.window == theirs.sliding_window == window, extra
        assert (ours.kv_heads, ours.ff_dim, ours.max_seq_len) == (
            theirs.num_key_value_heads, theirs.intermediate_size, theirs.max_position_embeddings) == \
            (8, 14336, 131072)


def test_hf_directory_consumers_read_a_mistral_checkpoint(mistral, tmp_path, monkeypatch, capsys):
    """``experiments.evaluate --run MISTRAL_DIR``: the val loss of the imported (config, params);
    ``--init-from`` (source_config) sees the window."""
    from experiments import evaluate as eval_cli
    from jaxformers.training import evaluate
    from jaxformers.training.init_from import source_config

    model = hf_model(3, arch="mistral", vocab_size=260, sliding_window=WINDOW)  # byte tokens: 257 ids
    path = str(tmp_path / "mistral")
    model.save_pretrained(path)
    assert source_config(path)[0].window == WINDOW
    monkeypatch.setenv("JAXFORMERS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    config, params = from_hf(path)
    want = evaluate((config, params), str(corpus), tokenizer="byte", batch_size=2, seq_len=16,
                    max_batches=None)
    assert eval_cli.main(["--run", path, "--data", str(corpus), "--tokenizer", "byte", "--batch-size", "2",
                          "--seq-len", "16"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["val_tokens"] == want["val_tokens"]
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)
    assert got["val_loss"] != pytest.approx(evaluate((config.replace(window=None), params), str(corpus),
                                                     tokenizer="byte", batch_size=2, seq_len=16,
                                                     max_batches=None)["val_loss"], rel=1e-4)
