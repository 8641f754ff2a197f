"""Audit 50: a new architecture added through the public hooks only, exercised end to end.

``MoEConfig`` / ``MoELM``: a tiny top-k mixture-of-experts MLP (router + stacked experts named on
the ``expert`` logical axis, a sown ``load_balance`` auxiliary loss) swapped in with
``Block.using(mlp=...)``; ``RecurLM``: a mixture-of-depths style recursion (the blocks applied
``n_recur`` times, each pass gated per token by a learned router) through ``run_blocks``, with
its own per-pass decoding caches (``init_layer_caches``).  Both are registered under new names
by a fixture that removes them again (the global registry is left as it was found).
"""
import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers import registry
from jaxformers.config import TransformerConfig
from jaxformers.layers import Block
from jaxformers.models.transformer import Transformer
from jaxformers.sharding import EMBED, EXPERT, MLP, param_init
from jaxformers.training import TrainConfig, evaluate, train
from jaxformers.training.rundir import read_metrics
from jaxformers.training.steps import loss_with_aux
from jaxformers.training.losses import cross_entropy

from multidevice import REPO, run_on_devices
from test_extension_points import _decode_matches_forward


# --------------------------------------------------------------- the architecture (user code)
@dataclasses.dataclass(frozen=True)
class MoEConfig(TransformerConfig):
    """A transformer whose MLPs are top-k mixtures of ``n_expert`` experts."""
    model: str = "audit50-moe"
    n_expert: int = 4
    top_k: int = 2

    def validate(self):
        super().validate()
        if not 1 <= self.top_k <= self.n_expert:
            raise ValueError(f"top_k must be in [1, n_expert={self.n_expert}], got {self.top_k}")

    def param_uses(self, path):  # each token runs top_k of the n_expert experts
        if path[-1] in ("w_in", "w_out"):
            return self.top_k / self.n_expert
        return super().param_uses(path)


class TopKMoE(nn.Module):
    """Top-k routed experts (dense compute, tiny sizes); sows a Switch-style load-balancing loss."""
    config: object

    @nn.compact
    def __call__(self, x):
        c = self.config
        e, d, f = c.n_expert, c.d_model, c.ff_dim
        init = nn.initializers.normal(c.init_std)
        router = self.param("router", param_init(init, (EMBED, None)), (d, e), jnp.float32)
        w_in = self.param("w_in", param_init(init, (EXPERT, EMBED, MLP)), (e, d, f), jnp.float32)
        w_out = self.param("w_out", param_init(init, (EXPERT, MLP, EMBED)), (e, f, d), jnp.float32)
        probs = jax.nn.softmax(x.astype(jnp.float32) @ router, axis=-1)      # [B, T, E]
        top, idx = jax.lax.top_k(probs, c.top_k)                             # [B, T, k]
        dispatch = jax.nn.one_hot(idx, e).sum(-2)                            # [B, T, E] in {0, 1}
        gates = dispatch * probs / jnp.sum(top, -1, keepdims=True)
        h = nn.gelu(jnp.einsum("btd,edf->btef", x, w_in.astype(x.dtype)))
        y = jnp.einsum("btef,efd,bte->btd", h, w_out.astype(x.dtype), gates.astype(x.dtype))
        frac = jnp.mean(dispatch, (0, 1)) / c.top_k                          # tokens per expert
        self.sow("losses", "load_balance", e * jnp.sum(frac * jnp.mean(probs, (0, 1))))
        return y


class MoELM(Transformer):
    def block_class(self):
        return Block.using(mlp=TopKMoE)


@dataclasses.dataclass(frozen=True)
class RecurConfig(TransformerConfig):
    model: str = "audit50-recur"
    n_recur: int = 2


class RecurLM(Transformer):
    """The blocks applied ``n_recur`` times; pass ``r`` of a token is kept with a learned gate
    ``sigmoid(router_r(x))`` (a soft, causal mixture of depths); sows the mean gate."""

    def setup(self):
        super().setup()
        self.routers = [nn.Dense(1, name=f"router_{r}") for r in range(self.config.n_recur)]

    def init_layer_caches(self, batch_size, max_len, dtype=None):
        # one set of layer caches per pass, each in the layout super().run_blocks reads (a list,
        # or one pytree stacked on [L] with scan_layers)
        one = super().init_layer_caches(batch_size, max_len, dtype)
        return [one] * self.config.n_recur

    def run_blocks(self, x, positions, segment_ids, layer_caches, cache_index):
        new = []
        for r, router in enumerate(self.routers):
            caches = None if layer_caches is None else layer_caches[r]
            y, caches = super().run_blocks(x, positions, segment_ids, caches, cache_index)
            gate = nn.sigmoid(router(x).astype(jnp.float32)).astype(x.dtype)
            self.sow("losses", "depth", jnp.mean(gate.astype(jnp.float32)))
            x = x + gate * (y - x)
            new.append(caches)
        return x, (None if layer_caches is None else new)


TINY = dict(vocab_size=257, d_model=32, n_layer=2, n_head=2, max_seq_len=32)


@pytest.fixture(scope="module")
def archs():
    """Register both architectures for this module's tests only (public register / unregister)."""
    registry.register("audit50-moe", MoEConfig, MoELM, {"tiny": TINY})
    registry.register("audit50-recur", RecurConfig, RecurLM, {"tiny": TINY})
    yield
    registry.unregister("audit50-moe")
    registry.unregister("audit50-recur")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit50")
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    (root / "corpus.txt").write_text(" ".join(rng.choice(words, size=3000)) + ".\n")
    return root


def _tokens(b=2, t=12, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 257)


def _tc(corpus, out, **kw):
    base = dict(steps=4, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1, data=str(corpus / "corpus.txt"),
                out_dir=str(out), log_every=1, eval_every=0, eval_batches=1, checkpoint_every=2,
                keep_checkpoints=3, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------- tests
@pytest.mark.parametrize("name,over", [("audit50-moe", {"scan_layers": True, "remat": "full"}),
                                       ("audit50-recur", {"scan_layers": True}),
                                       ("audit50-recur", {"scan_layers": True, "n_recur": 3})])
def test_forward_decode_and_aux(archs, name, over):
    """init/apply, decoding one token at a time == the full forward, sown aux losses per layer."""
    c = jf.get_config(name, "tiny", **over)
    m = jf.build(c)
    params = jf.init_params(m, jax.random.PRNGKey(0))
    tok = _tokens()
    _decode_matches_forward(m, params, tok, atol=3e-5)
    out = jf.generate(m, {"params": params}, tok[:, :4], 6, rng=0)
    assert out.shape == (2, 10)
    _, state = m.apply({"params": params}, tok, mutable=["losses"])
    n = sum(int(np.size(v)) for v in jax.tree.leaves(state["losses"]))
    assert n == (c.n_layer if name == "audit50-moe" else c.n_recur)


def test_weighted_aux_enters_the_gradient(archs):
    """The ``load_balance`` weight given in ``aux_loss_weights`` changes the router's gradient by
    exactly ``weight * grad(load_balance)``."""
    m = jf.build(jf.get_config("audit50-moe", "tiny"))
    params = jf.init_params(m, jax.random.PRNGKey(0))
    batch = {"tokens": _tokens(t=13)}
    grad = jax.jit(jax.grad(lambda p, w: loss_with_aux(m, cross_entropy, p, batch, None,
                                                       {"load_balance": w})[0]))
    g = {w: grad(params, jnp.float32(w)) for w in (0.0, 1.0, 3.0)}
    r = lambda t: t["blocks_0"]["mlp"]["router"]  # noqa: E731
    d1, d3 = r(g[1.0]) - r(g[0.0]), r(g[3.0]) - r(g[0.0])
    assert float(jnp.max(jnp.abs(d1))) > 1e-6
    np.testing.assert_allclose(d3, 3 * d1, rtol=1e-3, atol=1e-7)


def test_train_resume_evaluate(archs, corpus):
    """The trainer with the aux loss weighted in; a run stopped at step 2 and resumed equals an
    uninterrupted one; evaluate reproduces the run's val loss."""
    cfg = jf.get_config("audit50-moe", "tiny")
    ref = corpus / "ref"
    s = train(cfg, _tc(corpus, ref, aux_loss_weights={"load_balance": 0.1}), progress=False)
    rows = [r for r in read_metrics(ref) if "loss" in r]
    for r in rows:
        assert r["total_loss"] == pytest.approx(r["loss"] + 0.1 * r["aux/load_balance"], rel=1e-5)
    part = corpus / "part"
    train(cfg, _tc(corpus, part, aux_loss_weights={"load_balance": 0.1}), progress=False, stop_after=2)
    train(cfg, _tc(corpus, part, aux_loss_weights={"load_balance": 0.1}), progress=False, resume=True)
    rows2 = [r for r in read_metrics(part) if "loss" in r]
    assert [r["loss"] for r in rows2] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert evaluate(ref)["val_loss"] == pytest.approx(s["val_loss"], rel=1e-5)


def test_unsown_aux_weight_warns(archs, corpus, caplog):
    """A weight for a name no module sows (a typo: ``load_balanc``) used to be ignored without a word,
    leaving the real ``load_balance`` at weight 1.0; the trainer now warns, naming what is sown."""
    cfg = jf.get_config("audit50-moe", "tiny", n_layer=1)
    with caplog.at_level("WARNING", logger="jaxformers.training.trainer"):
        train(cfg, _tc(corpus, corpus / "typo", steps=1, eval_batches=0, checkpoint_every=0,
                       aux_loss_weights={"load_balanc": 0.01}), progress=False)
    assert "['load_balanc'], which the model does not sow (it sows ['load_balance'])" in caplog.text


USER_MODULE = """
from jaxformers.registry import register
from test_audit50_ext import MoEConfig, MoELM, TINY
register("audit50-moe", MoEConfig, MoELM, {"tiny": TINY})
"""

CLI_AND_MESH = """
import json, sys, jax
from experiments.train import main
rc = main(["--import", "audit50_user_arch", "--model", "audit50-moe",
           "--data", sys.argv[1], "--out", sys.argv[2],
           "--mesh", "data=2,expert=2", "--steps", "2", "--batch-size", "4", "--seq-len", "16",
           "--eval-batches", "1", "--log-every", "1", "--no-tensorboard", "--no-compile-cache", "--quiet",
           "--train-set", "aux_loss_weights=load_balance=0.1"])
import jaxformers as jf
from jaxformers.training.steps import Program
from jaxformers.training import mesh as mesh_lib
program = Program(jf.build(jf.get_config("audit50-moe", "tiny")), mesh_lib.make_mesh("data=2,expert=2"))
blocks = program.param_shardings["blocks_0"]["mlp"]
print("RESULT", json.dumps({"rc": rc, "w_in": str(blocks["w_in"].spec),
                           "router": str(blocks["router"].spec)}))
"""


def test_cli_import_and_expert_sharding(corpus):
    """``python -m experiments.train`` could not reach a user-registered architecture or loss (the
    README's ``--loss label_smoothed``: no way to import the user's code); ``--import MODULE`` now
    does.  On a 4-device CPU mesh ``data=2,expert=2`` the experts (``expert`` logical axis) are split
    over the ``expert`` mesh axis and the aux loss is logged."""
    (corpus / "audit50_user_arch.py").write_text(USER_MODULE)
    out = corpus / "cli"
    args = [str(corpus / "corpus.txt"), str(out)]  # the user's module dir on the path, as PYTHONPATH would
    res = run_on_devices(f"import sys; sys.argv[1:] = {args!r}; sys.path.insert(0, {str(corpus)!r})\n"
                         + CLI_AND_MESH, n=4)
    assert res["rc"] == 0
    assert "expert" in res["w_in"] and "expert" not in res["router"]
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 2 and all(r["total_loss"] == pytest.approx(r["loss"] + 0.1 * r["aux/load_balance"],
                                                                   rel=1e-5) for r in rows)
    bad = subprocess.run([sys.executable, "-m", "experiments.train", "--import", "no_such_module_audit50",
                          "--steps", "1", "--no-compile-cache"],
                         cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--import no_such_module_audit50: ModuleNotFoundError" in bad.stderr
    # the run evaluates with the same --import
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(corpus), str(REPO / "tests"), str(REPO)]))
    evaluate_cli = [sys.executable, "-m", "experiments.evaluate", "--run", str(out)]
    got = subprocess.run(evaluate_cli + ["--import", "audit50_user_arch"], cwd=str(REPO), env=env,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert json.loads(got.stdout)["val_loss"] == pytest.approx(read_metrics(out)[-1]["val_loss"], rel=1e-4)
    # audit 51: the run records the module (train.imports), so evaluate needs no --import
    # (tests/test_audit51_imports.py); where the module cannot be imported, the error names it
    env_missing = dict(env, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    missing = subprocess.run(evaluate_cli, cwd=str(REPO), env=env_missing, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "names module 'audit50_user_arch', which cannot be imported here" in missing.stderr
    assert "PYTHONPATH" in missing.stderr


def test_register_refuses_a_taken_name(archs):
    """``register`` used to replace any name without a word (``register("gpt", ...)`` silently swapped
    the built-in GPT for the caller's class); now a taken name needs ``override=True``, the same spec
    again is a no-op, and ``unregister`` removes a name."""
    with pytest.raises(ValueError, match="'gpt' is already registered.*override=True"):
        registry.register("gpt", MoEConfig, MoELM, {"tiny": TINY})
    assert registry.get_spec("gpt").module_cls is Transformer
    registry.register("audit50-moe", MoEConfig, MoELM, {"tiny": TINY})  # same spec: no-op
    registry.register("audit50-tmp", MoEConfig, MoELM, {"tiny": TINY})
    registry.register("audit50-tmp", MoEConfig, RecurLM, {"tiny": TINY}, override=True)
    assert registry.unregister("audit50-tmp").module_cls is RecurLM
    assert "audit50-tmp" not in jf.list_models()
    with pytest.raises(ValueError, match="unknown model name='audit50-tmp'"):
        registry.unregister("audit50-tmp")


class _BareMixer(nn.Module):  # returns y, not (y, cache): an array [B, ...] unpacks over its rows
    config: object

    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, cache=None, cache_index=None):
        return nn.Dense(x.shape[-1], name="v")(x)


class _TupleMLP(nn.Module):  # returns (y, aux) instead of sowing aux
    config: object

    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1], name="fc")(x), jnp.zeros(())


class _NoCacheMixer(_BareMixer):  # no init_cache, returns no cache
    @nn.compact
    def __call__(self, x, positions=None, segment_ids=None, cache=None, cache_index=None):
        return nn.Dense(x.shape[-1], name="v")(x), None


class _ForgetfulMixer(_NoCacheMixer):  # has init_cache, but its decoding path returns no cache
    @staticmethod
    def init_cache(config, batch_size, max_len, dtype=None):
        return {"sum": jnp.zeros((batch_size, config.d_model))}


def _lm(mixer=None, mlp="config"):
    cls = Block.using(mixer=mixer, mlp=mlp)
    return type("HookLM", (Transformer,), {"block_class": lambda self: cls})(
        jf.get_config("gpt", "tiny", vocab_size=64, d_model=16, n_layer=1, n_head=2))


def test_wrong_hook_outputs_are_named():
    """A mixer returning a bare ``y`` used to be unpacked over its batch rows (B=2: row 0 became every
    row's output, row 1 the "cache": silently wrong); an MLP returning a tuple failed in ``x + h``;
    decoding a mixer without ``init_cache`` was an AttributeError, one whose cache path returns no
    cache decoded on without the past.  Each is now a ValueError naming the hook's class."""
    tok = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"mixer _BareMixer must return \(y \[B, T, D\], new_cache"):
        jf.init_params(_lm(mixer=_BareMixer), jax.random.PRNGKey(0), tok)
    with pytest.raises(ValueError, match=r"mlp _TupleMLP must return y shaped like its input \(2, 4, 16\)"):
        jf.init_params(_lm(mlp=_TupleMLP), jax.random.PRNGKey(0), tok)
    m = _lm(mixer=_NoCacheMixer)
    params = jf.init_params(m, jax.random.PRNGKey(0), tok)
    with pytest.raises(ValueError, match=r"cannot decode: mixer\(s\) \['_NoCacheMixer'\] have no static"):
        jf.generate(m, {"params": params}, tok, 2)
    with pytest.raises(ValueError, match="mixer _ForgetfulMixer returned no cache for a decoding call"):
        jf.generate(_lm(mixer=_ForgetfulMixer), {"params": params}, tok, 2)


class _CacheDroppingLM(Transformer):
    """A run_blocks that ignores the caches (a block applied twice, as a first draft would)."""

    def run_blocks(self, x, positions, segment_ids, layer_caches, cache_index):
        for block in self.blocks:
            for _ in range(2):
                x, _ = block(x, positions, segment_ids)
        return x, None


def test_run_blocks_that_drops_caches_refuses_decoding():
    """``generate`` on a model whose ``run_blocks`` returns no caches used to sample silently: every
    step after the prefill saw only its own token.  It is now a ValueError naming run_blocks."""
    m = _CacheDroppingLM(jf.get_config("gpt", "tiny", vocab_size=64, d_model=16, n_layer=1, n_head=2))
    params = jf.init_params(m, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="_CacheDroppingLM.run_blocks returned no layer caches"):
        jf.generate(m, {"params": params}, jnp.zeros((1, 3), jnp.int32), 2)
