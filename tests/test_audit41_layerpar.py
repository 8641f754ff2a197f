"""Audit 41 (layer-parallel transforms): regression tests."""
import jax
import pytest

import jaxformers as jf
from jaxformers.transforms import delete_layers, pair_layers, reorder_layers, shuffle_layers, swap_layers


@pytest.mark.parametrize("bad", [None, [1, 2], 3])
def test_layer_transforms_name_params_that_are_not_a_tree(bad):
    cfg = jf.get_config("llama", "tiny", n_layer=4, d_model=32, n_head=4, vocab_size=64, max_seq_len=32)
    for fn in (lambda: pair_layers(cfg, bad, 1, 3), lambda: delete_layers(cfg, bad, [1]),
               lambda: swap_layers(cfg, bad, 1), lambda: shuffle_layers(cfg, bad, 0, 3),
               lambda: reorder_layers(cfg, bad, [1, 0])):
        with pytest.raises(ValueError, match="params must be"):
            fn()
