"""Regression tests of stop 33's own small fixes (validation of public arguments)."""
import importlib

import jax
import jax.numpy as jnp
import pytest

from jaxformers.ops.attention import position_causal_attention, select_implementation
from jaxformers.training import TrainConfig

attn_mod = importlib.import_module("jaxformers.ops.attention")   # the module (the package re-exports the function)


def _qkv(b=2, tq=4, tk=6, h=2, d=8):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return (jax.random.normal(ks[0], (b, tq, h, d)), jax.random.normal(ks[1], (b, tk, h, d)),
            jax.random.normal(ks[2], (b, tk, h, d)))


@pytest.mark.parametrize("bad, match", [
    (dict(q_pos=jnp.zeros((2, 5), jnp.int32)), "q_pos must have shape"),
    (dict(kv_pos=jnp.zeros((6,), jnp.int32)), "kv_pos must have shape"),
    (dict(kv_pos=jnp.zeros((2, 6), jnp.float32)), "kv_pos must be integers"),
    (dict(implementation="flash"), "implementation='flash' is not allowed"),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), "segment_ids must be a"),
    (dict(segment_ids=(jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 5), jnp.int32))), r"kv_ids\) must have shape"),
    (dict(q_key_index=jnp.zeros((2, 3), jnp.int32), implementation="pallas"), "q_key_index must have shape"),
])
def test_position_causal_attention_names_the_bad_argument(bad, match):
    q, k, v = _qkv()
    kw = dict(q_pos=jnp.broadcast_to(jnp.arange(4) + 2, (2, 4)), kv_pos=jnp.broadcast_to(jnp.arange(6), (2, 6)),
              implementation="xla")
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        position_causal_attention(q, k, v, **kw)


def test_position_causal_attention_valid_call_unchanged():
    q, k, v = _qkv()
    pos = jnp.broadcast_to(jnp.arange(4) + 2, (2, 4))
    o = position_causal_attention(q, k, v, q_pos=pos, kv_pos=jnp.broadcast_to(jnp.arange(6), (2, 6)),
                                  implementation="xla")
    ref = attn_mod.attention(q, k, v, causal=True, implementation="xla")   # queries aligned with the last keys
    assert jnp.allclose(o, ref, atol=1e-5)


def test_seed_beyond_32_bits_refused():
    # PRNGKey keeps the low 32 bits: seed 2**32 used to train exactly like seed 0
    assert (jax.random.PRNGKey(2**32) == jax.random.PRNGKey(0)).all()
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        TrainConfig(seed=2**32)
    TrainConfig(seed=2**32 - 1)


def test_cudnn_not_chosen_for_mixed_dtypes(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    k = jnp.zeros((1, 128, 2, 64), jnp.float32)
    assert attn_mod._cudnn_reason(q, k, None, None, None) is not None
    with pytest.raises(ValueError, match="one dtype"):
        select_implementation(q, k, implementation="cudnn")
    assert attn_mod._cudnn_reason(q, k.astype(jnp.bfloat16), None, None, None) is None


def _tiny_gpt():
    import jaxformers as jf
    config = jf.get_config("gpt", "tiny", n_layer=1, d_model=32, n_head=2)
    module = jf.build(config)
    params = {"params": jf.init_params(module, jax.random.PRNGKey(0))}
    return jf, module, params


def test_generate_eos_pads_after_each_rows_first_eos():
    import numpy as np
    jf, module, params = _tiny_gpt()
    prompt = jnp.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], jnp.int32)
    kw = dict(temperature=1.0, rng=jax.random.PRNGKey(3))
    plain = np.asarray(jf.generate(module, params, prompt, 24, **kw))
    new = plain[:, 3:]
    eos = int(new[0, 5])                                  # a token row 0 samples (maybe earlier too)
    for pad in (None, 0):
        out = np.asarray(jf.generate(module, params, prompt, 24, eos_id=eos, pad_id=pad, **kw))
        assert out.shape == plain.shape
        for r in range(3):
            hits = np.nonzero(new[r] == eos)[0]
            end = hits[0] + 1 if len(hits) else new.shape[1]
            np.testing.assert_array_equal(out[r, :3 + end], plain[r, :3 + end])
            assert (out[r, 3 + end:] == (eos if pad is None else pad)).all()


def test_generate_eos_stops_when_every_row_is_done():
    import numpy as np
    jf, module, params = _tiny_gpt()
    prompt = jnp.array([[1, 2, 3], [1, 2, 3]], jnp.int32)
    first = int(jf.generate(module, params, prompt, 1, temperature=0.0)[0, -1])   # greedy: both rows sample it
    out = np.asarray(jf.generate(module, params, prompt, 16, temperature=0.0, eos_id=first, pad_id=7))
    assert (out[:, 3] == first).all() and (out[:, 4:] == 7).all()


@pytest.mark.parametrize("kw, match", [
    (dict(eos_id=-1), "eos_id must be None or a token id"),
    (dict(eos_id=10**6), "eos_id must be None or a token id"),
    (dict(eos_id=1.5), "eos_id must be None or a token id"),
    (dict(eos_id=1, pad_id=10**6), "pad_id must be None or a token id"),
    (dict(pad_id=0), "pad_id needs eos_id"),
])
def test_generate_eos_arguments_checked(kw, match):
    jf, module, params = _tiny_gpt()
    with pytest.raises(ValueError, match=match):
        jf.generate(module, params, jnp.ones((1, 2), jnp.int32), 4, **kw)


def _session_commands():
    """``(module, argv)`` of every ``python -m experiments.X`` stage in scripts/gpu_session.sh."""
    import pathlib
    import re
    import shlex

    text = (pathlib.Path(__file__).resolve().parents[1] / "scripts" / "gpu_session.sh").read_text()
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = re.search(r"python -m experiments\.(\w+)(.*?)(;;|$)", line)
        if m:
            out.append((m.group(1), shlex.split(m.group(2).replace('"$WORK', '"/tmp/w'))))
    return out


def test_gpu_session_training_stages_parse_and_reuse():
    """Every experiment stage of scripts/gpu_session.sh passes its parser's checks (the stages
    are only ever run on the device), and the training stages pass --reuse (a stage rerun on a
    warm machine keeps its finished runs and continues the one a time limit stopped)."""
    from experiments.common import parse_experiment_args

    commands = _session_commands()
    assert len(commands) >= 15
    checked = 0
    for module, argv in commands:
        mod = importlib.import_module(f"experiments.{module}")
        if not hasattr(mod, "_parser"):
            continue
        ap = mod._parser()
        if not hasattr(mod, "_check_args"):  # a benchmark: argparse alone
            ap.parse_args(argv)
            checked += 1
            continue
        args = parse_experiment_args(ap, argv + ["--no-compile-cache"], check=mod._check_args,
                                     data_specs=module == "layer_parallel")
        if "reuse" in vars(args):
            assert args.reuse, (module, argv)
        checked += 1
    assert checked >= 10


def test_generate_cli_stop_at_eos(tmp_path, monkeypatch, capsys):
    """``--stop-at-eos``: each sample is the plain sample cut before its first end-of-text token."""
    import json

    import numpy as np

    import jaxformers as jf
    import jaxformers.training as training
    from experiments import generate as gen_cli
    from jaxformers.data import ByteTokenizer
    from jaxformers.training.rundir import TOKENIZER_DIR

    cfg = jf.get_config("gpt", "tiny", d_model=32, n_layer=1, vocab_size=257, max_seq_len=64)
    params = jf.init_params(jf.build(cfg), jax.random.PRNGKey(0))
    tok = ByteTokenizer()
    tok.save(tmp_path / TOKENIZER_DIR)
    monkeypatch.setattr(training, "load_run", lambda run, **kw: (cfg, None, params))
    argv = ["--run", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "40", "--temperature", "3.0",
            "--num-samples", "4", "--json"]
    assert gen_cli.main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["samples"]
    assert gen_cli.main(argv + ["--stop-at-eos"]) == 0
    cut = json.loads(capsys.readouterr().out)["samples"]
    ids = np.asarray(jf.generate(jf.build(cfg), {"params": params}, np.asarray([tok.encode("ab")], np.int32), 40,
                                 temperature=3.0, rng=jax.random.PRNGKey(0), num_samples=4))[:, 2:]
    ended = [bool((row == tok.eos_id).any()) for row in ids]
    assert ended == [False, True, False, False]   # seed 0: one sample reaches end-of-text
    for row, p, c in zip(ids, plain, cut):
        hits = np.nonzero(row == tok.eos_id)[0]
        assert c == (tok.decode(row[:hits[0]]) if len(hits) else p)
        assert c == p or len(c) < len(p)


def test_rotary_matches_its_formula_without_torch():
    """RoPE, rotate-half layout (GPT-NeoX / Llama): pair (i, i + D/2) rotated by p * theta^(-2i/D).
    Written with numpy loops, so the layout and the frequencies are pinned without the HF parity
    tests (which need torch); the relative-position property is checked too."""
    import numpy as np

    from jaxformers.layers.rotary import apply_rotary, rotary_angles

    d, theta = 8, 500.0
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, d)), np.float64)
    pos = np.array([[0, 5, 17]])
    got = np.asarray(apply_rotary(jnp.asarray(x, jnp.float32), *rotary_angles(jnp.asarray(pos), d, theta)))
    want = np.empty_like(x)
    for t in range(3):
        for i in range(d // 2):
            a = pos[0, t] * theta ** (-2 * i / d)
            x1, x2 = x[0, t, :, i], x[0, t, :, i + d // 2]
            want[0, t, :, i] = x1 * np.cos(a) - x2 * np.sin(a)
            want[0, t, :, i + d // 2] = x2 * np.cos(a) + x1 * np.sin(a)
    np.testing.assert_allclose(got, want, atol=2e-5)   # float32 angles up to 17 rad
    # <rope(q, m), rope(k, n)> depends on m - n only
    q, k = jnp.asarray(x[:, :1], jnp.float32), jnp.asarray(x[:, 1:2], jnp.float32)
    dot = lambda m, n: float(jnp.sum(apply_rotary(q, *rotary_angles(jnp.array([[m]]), d, theta))  # noqa: E731
                                     * apply_rotary(k, *rotary_angles(jnp.array([[n]]), d, theta))))
    assert abs(dot(7, 3) - dot(14, 10)) < 1e-4
