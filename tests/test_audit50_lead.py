"""Audit 50 (lead): regression tests for items stop 49 left open (numpy scalars in namedtuples and
in the DoGE step, kernel_map's output names, WSD without decay, the synthetic split's seq_len)."""
import collections
import dataclasses
import json

import numpy as np
import pytest

from jaxformers.config import plain_scalars
from jaxformers.training.config import TrainConfig
from jaxformers.training.optim import lr_at


def test_plain_scalars_rebuilds_namedtuples_with_their_fields():
    """Before: ``type(value)(items)`` called a namedtuple with one list argument (a TypeError
    about missing fields) when one of its fields was a numpy scalar."""
    Pair = collections.namedtuple("Pair", "a b")

    @dataclasses.dataclass(frozen=True)
    class Holder:
        pair: tuple
        seq: tuple

    h = Holder(pair=Pair(np.int64(2), 3.0), seq=(np.float32(0.5), 1))
    plain_scalars(h)
    assert h.pair == Pair(2, 3.0) and type(h.pair) is Pair and type(h.pair.a) is int
    assert h.seq == (0.5, 1) and type(h.seq[0]) is float
    kept = Pair(1, 2)
    h2 = Holder(pair=kept, seq=())
    plain_scalars(h2)
    assert h2.pair is kept  # nothing to convert: the same object


def test_doge_step_stores_python_numbers():
    """A sweep's ``np.float32`` mu was kept as numpy (run files then need a numpy-aware encoder)."""
    from jaxformers.training.doge import DogeStep

    d = DogeStep(domains=("a", "b", np.str_("c")), mu=np.float32(0.5), dw_max=np.int64(4))
    assert type(d.mu) is float and type(d.dw_max) is int and type(d.domains[2]) is str
    json.dumps(dataclasses.asdict(d))
    with pytest.raises(ValueError, match="mu must be a number"):
        DogeStep(domains=("a", "b", "c"), mu=np.bool_(True))


def test_wsd_with_decay_fraction_zero_never_decays():
    """``decay_fraction=0`` used to decay over one step anyway: every update at ``lr``, then a drop
    to ``lr * min_lr_ratio`` right after ``steps`` (an extended run continued at the floor)."""
    tc = TrainConfig(steps=10, lr=1.0, min_lr_ratio=0.1, warmup_steps=2, schedule="wsd", decay_fraction=0.0)
    assert [lr_at(tc, s) for s in range(2, 15)] == [1.0] * 13
    assert lr_at(tc, 0) == pytest.approx(0.5)  # the warmup is unchanged
    # a small fraction still decays over at least one step, reaching the floor at `steps`
    small = tc.replace(decay_fraction=0.01, warmup_steps=0)
    assert [lr_at(small, s) for s in (0, 9)] == [1.0, 1.0] and lr_at(small, 10) == pytest.approx(0.1)
    tenth = tc.replace(decay_fraction=0.2, warmup_steps=0)
    assert lr_at(tenth, 9) == pytest.approx(0.55) and lr_at(tenth, 10) == pytest.approx(0.1)


def test_synthetic_split_rows_names_seq_len():
    """``split_rows(0)`` said ``row_len must be >= 2, got 1`` (a name the caller never used)."""
    from jaxformers.data.sources import open_data

    source = open_data("synthetic:copying")
    for bad, match in ((0, "seq_len must be >= 1, got 0"), (2.5, "seq_len must be an int"),
                       (True, "seq_len must be an int")):
        with pytest.raises(ValueError, match=match):
            source.split_rows(bad)
    rows = source.split_rows(np.int64(8))
    assert rows["tokens"].shape[1] == 9
    assert source.split_rows(8) is rows  # the same cache entry for numpy and Python ints


def test_position_causal_attention_checks_sm_scale_on_every_path():
    """The ``"xla"`` path used any ``sm_scale`` as given (0, -1, NaN: a silent wrong or NaN output)
    while the kernel path refused it; both follow :func:`attention`'s rule now."""
    import jax.numpy as jnp
    from jaxformers.ops.attention import position_causal_attention

    q = jnp.ones((1, 3, 2, 4))
    pos = jnp.arange(3)[None]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sm_scale"):
            position_causal_attention(q, q, q, q_pos=pos, kv_pos=pos, sm_scale=bad, implementation="xla")
    got = position_causal_attention(q, q, q, q_pos=pos, kv_pos=pos, sm_scale=0.25, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), 1.0, rtol=1e-6)


def test_info_imports_a_module_of_your_own(tmp_path, monkeypatch, capsys):
    """``experiments.info`` lists a user-registered architecture with ``--import MODULE`` (as the
    train / evaluate / generate CLIs do); a module that fails to import is a usage error naming it."""
    from experiments import info
    from jaxformers import registry

    (tmp_path / "audit50_info_arch.py").write_text(
        "from jaxformers.registry import register\n"
        "from jaxformers.config import TransformerConfig\n"
        "from jaxformers.models.transformer import Transformer\n"
        "register('audit50-info', TransformerConfig, Transformer, "
        "{'tiny': dict(vocab_size=64, d_model=32, n_layer=1, n_head=2, max_seq_len=16)})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        rows = info.main(["--import", "audit50_info_arch", "--model", "audit50-info", "--json"])
        assert [r["preset"] for r in rows] == ["tiny"] and rows[0]["model"] == "audit50-info"
    finally:
        registry.unregister("audit50-info")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        info.main(["--import", "audit50_no_such_module", "--model", "gpt"])
    assert e.value.code == 2 and "--import audit50_no_such_module: ModuleNotFoundError" in capsys.readouterr().err


def test_training_integer_weights_is_refused_by_name():
    """A QuaRot ``int_linears`` model (integer weights) given an optimizer failed inside ``jax.grad``
    ("grad requires real- or complex-valued inputs ... uint8"); ``Program`` names the parameters.
    Without an optimizer (evaluation, generation) it still builds."""
    import optax
    import jaxformers as jf
    from jaxformers.training import Program, make_mesh

    config = jf.get_config("quarot", "tiny", int_linears=True, n_layer=1, d_model=32, n_head=2, vocab_size=64)
    module = jf.build(config)
    with pytest.raises(ValueError, match=r"parameter\(s\) are not floating point, e\.g\. .*cannot be trained"):
        Program(module, make_mesh("data=1"), tx=optax.sgd(0.1))
    Program(module, make_mesh("data=1"))
