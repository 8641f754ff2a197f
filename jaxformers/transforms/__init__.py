"""Transformations of trained models (no retraining): layer-parallel pairs and the layer
interventions of "Leveraging the true depth of LLMs" (:mod:`.layer_parallel`).

    from jaxformers.transforms import pair_layers, delete_layers, swap_layers, shuffle_layers
    pcfg, pparams = pair_layers(config, params, start=4, end=10)   # layers (4,5), (6,7), (8,9)
    logits = jaxformers.build(pcfg).apply({"params": pparams}, tokens)
"""
from .layer_parallel import (LayerParallelConfig, LayerParallelTransformer, ParallelPairBlock, delete_layers,
                             fuse_pair, pair_layers, reorder_layers, shuffle_layers, swap_layers)

__all__ = ["LayerParallelConfig", "LayerParallelTransformer", "ParallelPairBlock", "delete_layers",
           "fuse_pair", "pair_layers", "reorder_layers", "shuffle_layers", "swap_layers"]
