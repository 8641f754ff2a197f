"""Audit 55 (lead): regression tests for carry-overs fixed this stop."""
import jax.numpy as jnp
import pytest

import jaxformers as jf
from jaxformers.training import TrainConfig


def _tiny():
    return jf.get_config("gpt", "tiny", vocab_size=300)


# ----------------------------------------------------------------------------- step_fn metrics
def test_a_step_fn_without_the_lr_metric_is_a_value_error_after_its_first_step(tmp_path):
    """A custom step_fn whose metrics lacked 'lr' raised a bare KeyError: 'lr' when the first
    row was logged; now a ValueError naming step_fn and the missing metric, at the first step."""
    from jaxformers.training import train
    from jaxformers.training.steps import train_step

    class NoLr:
        def __call__(self, *args, **kwargs):
            params, opt_state, metrics = train_step(*args, **kwargs)
            return params, opt_state, {k: v for k, v in metrics.items() if k != "lr"}

    tc = TrainConfig(steps=3, log_every=3, batch_size=2, seq_len=8, data="synthetic:copying",
                     eval_every=0, out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"step_fn=NoLr.*missing \['lr'\]"):
        train(_tiny(), tc, step_fn=NoLr(), progress=False)


# ----------------------------------------------------------------------------- lr's message
def test_a_negative_lr_message_gives_an_open_interval_at_inf():
    """lr=-1 said 'lr must be in (0.0, inf]', yet inf is refused: now '(0.0, inf)'."""
    with pytest.raises(ValueError, match=r"lr must be in \(0\.0, inf\),"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        TrainConfig(lr=float("inf"))


# ----------------------------------------------------------------------------- eval_step NaN
def test_eval_step_of_a_batch_of_weight_zero_adds_zero_even_for_a_nan_mean():
    """A custom loss whose mean over a batch of weight 0 is 0 / 0 = NaN made eval_step's total
    NaN (loss * 0), and so the whole evaluation's mean; a batch of weight 0 now adds 0."""
    from jaxformers.training.steps import eval_step

    def loss_fn(module, params, batch, rng):
        w = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(w) / jnp.sum(w), {"n_targets": jnp.sum(w)}

    batch = {"tokens": jnp.zeros((2, 8), jnp.int32), "loss_mask": jnp.zeros((2, 8), jnp.int32)}
    total, n = eval_step(None, loss_fn, None, batch)
    assert float(n) == 0.0 and float(total) == 0.0
    batch["loss_mask"] = jnp.ones((2, 8), jnp.int32)
    total, n = eval_step(None, loss_fn, None, batch)
    assert (float(total), float(n)) == (16.0, 16.0)

    def nan_loss(module, params, batch, rng):  # a NaN with targets stays NaN
        return jnp.float32(jnp.nan), {"n_targets": jnp.float32(4)}
    total, _ = eval_step(None, nan_loss, None, batch)
    assert jnp.isnan(total)


# ----------------------------------------------------------------------------- config.json values
@pytest.mark.parametrize("key,bad", [("use_bias", "false"), ("tie_word_embeddings", 1),
                                     ("residual_in_fp32", "no"), ("state_size", 16.7),
                                     ("conv_kernel", True), ("n_groups", "1")])
def test_hf_mamba_config_values_of_the_wrong_type_are_refused_naming_the_key(key, bad):
    """config_from_hf_mamba read bool("false") as True, int(16.7) as 16 and True as 1: a silently
    different model.  Now a ValueError naming the key."""
    from jaxformers.convert.hf_mamba import config_from_hf_mamba, config_to_hf_mamba
    hf = config_to_hf_mamba(jf.get_config("mamba2", "tiny"))
    config_from_hf_mamba(hf)  # the export reads back
    with pytest.raises(ValueError, match=f"config.json {key}="):
        config_from_hf_mamba({**hf, key: bad})


@pytest.mark.parametrize("key,bad", [("tie_word_embeddings", "false"), ("hidden_size", 64.5),
                                     ("num_key_value_heads", True), ("head_dim", "16"),
                                     ("max_position_embeddings", 2048.5)])
def test_hf_llama_config_values_of_the_wrong_type_are_refused_naming_the_key(key, bad):
    from jaxformers.convert.hf_llama import config_from_hf, config_to_hf
    hf = config_to_hf(jf.get_config("llama", "tiny"))
    assert config_from_hf(hf) == config_from_hf({**hf, "hidden_size": float(hf["hidden_size"])})
    with pytest.raises(ValueError, match=f"config.json {key}="):
        config_from_hf({**hf, key: bad})


# ----------------------------------------------------------------------------- tokenizers
def test_hf_tokenizer_refuses_to_save_into_its_own_source_directory(tmp_path):
    """HFTokenizer.save(tok.directory) replaced the checkpoint's tokenizer_config.json (its eos /
    chat settings) with jaxformers' own; now a ValueError naming directory."""
    from jaxformers.data.tokenizer import HFTokenizer, get_tokenizer
    src = tmp_path / "src"
    bpe = get_tokenizer("bpe:270")
    bpe.train(["hello world, a tiny text " * 20])
    bpe.save(src)
    (src / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "chat_template": "x"}')
    tok = HFTokenizer(src)
    with pytest.raises(ValueError, match="directory.*source directory"):
        tok.save(str(src) + "/")
    assert "chat_template" in (src / "tokenizer_config.json").read_text()
    out = tok.save(tmp_path / "copy")
    assert HFTokenizer(out).encode("hello world") == tok.encode("hello world")


def test_decode_arithmetic_refuses_float_rows():
    """decode_arithmetic read 5.0 (and 5.7 -> an error about id 5.7 only by luck) as id 5."""
    from jaxformers.data import synthetic
    row = [synthetic.BOS, synthetic.N_SPECIAL + 1, synthetic.EOS]
    assert synthetic.decode_arithmetic(row) == "^" + synthetic.ARITH_CHARS[1] + "$"
    with pytest.raises(ValueError, match="row must hold integer ids"):
        synthetic.decode_arithmetic([float(t) for t in row])
    assert synthetic.decode_arithmetic([]) == ""


# ----------------------------------------------------------------------------- attention heads
def test_attention_with_no_query_heads_is_a_value_error():
    """q with 0 heads and k/v with 1 returned an empty [B, T, 0, D] output; now a ValueError."""
    from jaxformers.ops.attention import attention
    q = jnp.zeros((1, 4, 0, 8))
    kv = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match=r"query heads \(0\) must be a positive multiple"):
        attention(q, kv, kv, implementation="xla")


# ----------------------------------------------------------------------------- CLI: --extend-steps
def test_extend_steps_with_a_train_set_steps_is_refused(tmp_path):
    """--extend-steps 50 with --train-set steps=500 trained to 500 (the later --train-set won
    without a word, where --steps is refused); now refused, naming both."""
    import json
    from experiments.train import CLIError, _parser, build_configs
    out = tmp_path / "run"
    out.mkdir()
    saved = {"model": jf.get_config("gpt", "tiny", vocab_size=300).to_dict(),
             "train": TrainConfig(steps=100, data="synthetic:copying", out_dir=str(out)).to_dict()}
    (out / "config.json").write_text(json.dumps(saved))
    _, tc = build_configs(_parser().parse_args(["--out", str(out), "--extend-steps", "50"]))
    assert tc.steps == 150
    for argv in (["--train-set", "steps=500"], ["--steps", "500"]):
        with pytest.raises(CLIError, match="--extend-steps.*not both"):
            build_configs(_parser().parse_args(["--out", str(out), "--extend-steps", "50", *argv]))


# ----------------------------------------------------------------------------- DenseFormer sizes
def test_denseformer_validation_of_a_huge_n_layer_does_not_build_a_list_of_layers():
    """The dilation / period check built list(range(1, n_layer + 1)): n_layer=10**29 raised
    OverflowError (a large one allocated the list); now a range test.  (Since stop 57 a size of
    2**31 or more is refused by the shared config check, naming it.)"""
    cfg = jf.get_config("denseformer", "tiny", n_layer=2**31 - 1)
    assert cfg.n_layer == 2**31 - 1
    with pytest.raises(ValueError, match=r"n_layer=10+ cannot be represented"):
        jf.get_config("denseformer", "tiny", n_layer=10**29)
    with pytest.raises(ValueError, match=r"dwa_period=9 .* \[1, n_layer\] = \[1, 2\]"):
        jf.get_config("denseformer", "tiny", dwa_period=9)
