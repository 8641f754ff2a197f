"""Stop 51 (lead): ``train()`` records the module that registered a run's architecture or loss.

``TrainConfig.imports`` (``--import``) is recorded with a run and imported again wherever it is
loaded (tests/test_audit51_imports.py).  A library user who registers an architecture in a module
of their own and calls ``train()`` without naming it in ``imports`` got a run that no other process
could load ("unknown model name").  The registry now remembers which module called ``register`` /
``register_loss``, and ``train()`` adds it to the run's ``imports`` when it is not jaxformers' own;
a registration made by the running script (``__main__``), which no other process can import, is a
warning saying how to make the run loadable.
"""
import json
import logging
import sys

import pytest

from jaxformers import registry
from jaxformers.training import TrainConfig, train
from jaxformers.training import losses as losses_lib

OWNER = '''
from jaxformers.config import TransformerConfig
from jaxformers.models.transformer import Transformer
from jaxformers.registry import register
from jaxformers.training.losses import cross_entropy, register_loss


class Audit51OwnedLM(Transformer):
    pass


register("audit51-owned", TransformerConfig, Audit51OwnedLM,
         {"tiny": dict(vocab_size=32, d_model=16, n_layer=1, n_head=2, max_seq_len=16)})


@register_loss("audit51_owned_ce")
def owned_ce(module, params, batch, rng=None):
    return cross_entropy(module, params, batch, rng)
'''


def _tc(tmp_path, name, **kw):
    return TrainConfig(steps=1, batch_size=2, seq_len=8, data="synthetic:copying:vocab=32", warmup_steps=0,
                       eval_batches=0, checkpoint_every=0, tensorboard=False, out_dir=str(tmp_path / name), **kw)


@pytest.fixture
def owner_module(tmp_path, monkeypatch):
    (tmp_path / "audit51_owner.py").write_text(OWNER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import audit51_owner  # noqa: F401
    yield "audit51_owner"
    sys.modules.pop("audit51_owner", None)
    registry.unregister("audit51-owned")
    losses_lib._LOSSES.pop("audit51_owned_ce", None)
    losses_lib._LOSS_MODULES.pop("audit51_owned_ce", None)


def test_registry_remembers_the_registering_module(owner_module):
    assert registry.get_spec("audit51-owned").module == owner_module
    assert registry.get_spec("gpt").module == "jaxformers.models.gpt"
    assert losses_lib.loss_module("audit51_owned_ce") == owner_module
    assert losses_lib.loss_module("cross_entropy") == "jaxformers.training.losses"
    # the same spec registered again from elsewhere is still the same spec (a no-op)
    spec = registry.get_spec("audit51-owned")
    registry.register("audit51-owned", spec.config_cls, spec.module_cls, spec.presets)
    assert registry.get_spec("audit51-owned").module == owner_module


def test_train_records_the_owning_modules(owner_module, tmp_path):
    config = registry.get_config("audit51-owned", "tiny")
    train(config, _tc(tmp_path, "arch"), progress=False)
    assert json.loads((tmp_path / "arch" / "config.json").read_text())["train"]["imports"] == [owner_module]
    # a built-in architecture trained with a loss of your own records the loss's module
    gpt = registry.get_config("gpt", "tiny", vocab_size=32, d_model=16, n_layer=1, n_head=2, max_seq_len=16)
    train(gpt, _tc(tmp_path, "loss", loss="audit51_owned_ce"), progress=False)
    assert json.loads((tmp_path / "loss" / "config.json").read_text())["train"]["imports"] == [owner_module]
    # nothing of your own: nothing recorded
    train(gpt, _tc(tmp_path, "plain"), progress=False)
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["train"]["imports"] == []


def test_a_script_registration_is_a_warning(tmp_path, caplog):
    code = OWNER.replace("audit51-owned", "audit51-script").replace("audit51_owned_ce", "audit51_script_ce")
    exec(compile(code, "<script>", "exec"), {"__name__": "__main__"})  # as `python my_script.py` runs it
    try:
        assert registry.get_spec("audit51-script").module == "__main__"
        with caplog.at_level(logging.WARNING, logger="jaxformers.training.trainer"):
            train(registry.get_config("audit51-script", "tiny"), _tc(tmp_path, "script"), progress=False)
        assert json.loads((tmp_path / "script" / "config.json").read_text())["train"]["imports"] == []
        assert "architecture 'audit51-script' is registered by the script being run (__main__)" in caplog.text
    finally:
        registry.unregister("audit51-script")
        losses_lib._LOSSES.pop("audit51_script_ce", None)
        losses_lib._LOSS_MODULES.pop("audit51_script_ce", None)


def test_init_from_sends_host_params_from_the_host(monkeypatch):
    """``Program.init_from`` of numpy params cast them with ``jnp.asarray`` (the whole tree on one
    device first: a model sharded because it does not fit one device could not start from host
    weights) and then copied them once more on the devices (the copy only protects a caller's jax
    arrays from the donating train step).  Host params now reach ``device_put`` as host arrays,
    cast to the parameter dtype there; the values and the first step are those of jax params."""
    import jax
    import numpy as np
    import optax
    import jaxformers as jf
    from jaxformers.training import Program, make_mesh

    module = jf.build(registry.get_config("gpt", "tiny", vocab_size=32, d_model=16, n_layer=1, n_head=2,
                                          max_seq_len=16, param_dtype="bfloat16"))
    params = jf.init_params(module, jax.random.PRNGKey(0))
    host = jax.tree.map(lambda a: np.asarray(a, np.float32), params)  # e.g. converted weights
    prog = Program(module, make_mesh("data=1"), tx=optax.sgd(0.1))
    seen = []
    real = jax.device_put

    def spy(x, *a, **kw):
        seen.extend(type(leaf) for leaf in jax.tree.leaves(x))
        return real(x, *a, **kw)

    monkeypatch.setattr(jax, "device_put", spy)
    p_host, o_host = prog.init_from(host)
    monkeypatch.undo()
    assert seen and all(t is np.ndarray for t in seen), set(seen)
    assert {a.dtype for a in jax.tree.leaves(p_host)} == {np.dtype(jax.numpy.bfloat16)}
    p_dev, o_dev = prog.init_from(params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, p_host), jax.tree.map(np.asarray, p_dev))
    batch = prog.put_batch({"tokens": np.ones((2, 9), np.int32)}, 2)
    out_host = prog.train_step(p_host, o_host, batch, 0, jax.random.PRNGKey(1))
    out_dev = prog.train_step(p_dev, o_dev, batch, 0, jax.random.PRNGKey(1))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, out_host[0]),
                 jax.tree.map(np.asarray, out_dev[0]))
