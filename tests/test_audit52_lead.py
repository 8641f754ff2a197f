"""Regression tests of stop 52's lead audit (fixes outside the helpers' areas)."""
import numpy as np
import pytest

import jax

import jaxformers as jf


def test_init_from_warns_of_changed_fields_only_when_the_parameters_fit(tmp_path, caplog):
    """``--init-from`` with ``--set qk_norm=true`` warned that the changed fields "keep the
    parameter tree" right before refusing the tree that did not fit; now the refusal names the
    fields, and the warning comes only for a source that loads."""
    pytest.importorskip("safetensors")
    from jaxformers.convert import to_hf
    from jaxformers.training.init_from import load_params
    from jaxformers.utils import abstract_params

    config = jf.get_config("llama", "tiny", n_layer=1, d_model=32, n_head=2, n_kv_head=1, d_ff=64,
                           vocab_size=64, max_seq_len=32)
    params = jf.init_params(jf.build(config), jax.random.PRNGKey(0))
    src = to_hf(config, params, str(tmp_path / "hf"))

    norm = config.replace(qk_norm=True)  # adds q_norm / k_norm: another tree
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match=r"differs from the source's in: "
                                                                     r"qk_norm: False -> True"):
        load_params(src, abstract_params(jf.build(norm)), model_config=norm)
    assert "compute something else" not in caplog.text

    theta = config.replace(rope_theta=500.0)  # same tree, other computation: loads, with the warning
    with caplog.at_level("WARNING"):
        loaded = load_params(src, abstract_params(jf.build(theta)), model_config=theta)
    assert "compute something else" in caplog.text and "rope_theta: 10000.0 -> 500.0" in caplog.text
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
