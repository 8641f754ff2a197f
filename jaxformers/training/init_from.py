"""Fine-tuning sources: start a run from a trained run directory or a Hugging Face checkpoint.

    model_config, tokenizer = source_config("runs/gpt-tiny")        # or a HF Llama / Mistral / Qwen / Mamba dir
    train(model_config, TrainConfig(init_from="runs/gpt-tiny", ...))  # params only, fresh optimizer

A source is

* a run directory of :func:`jaxformers.training.train` (``config.json`` with ``model`` and
  ``train``): its newest complete checkpoint;
* a Hugging Face ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` /
  ``MambaForCausalLM`` / ``Mamba2ForCausalLM``
  directory (``config.json`` with ``model_type`` + safetensors), through
  :mod:`jaxformers.convert`.

Parameters are returned as float32 numpy-backed arrays in the layer layout (stacked
``blocks`` under ``scan_layers`` or ``blocks_i``) of the model being trained.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Tuple

import jax
import numpy as np

__all__ = ["RUNTIME_FIELDS", "config_changes", "load_params", "source_config", "source_imports",
           "source_kind", "source_loss"]

log = logging.getLogger(__name__)


def source_kind(path, name: str = "init_from") -> str:
    """``"run"`` (a run directory trained here) or ``"hf"`` (a Hugging Face checkpoint
    directory), told apart by the content of their ``config.json``; ``ValueError`` naming
    ``name`` for anything else."""
    path = Path(path).expanduser()
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{name}={str(path)!r} is neither a run directory nor a Hugging Face "
                         "checkpoint directory (no config.json)")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}={str(path)!r}: cannot read {cfg} ({e})") from None
    if isinstance(data, dict) and "model" in data and "train" in data:
        return "run"
    if isinstance(data, dict) and "model_type" in data:
        return "hf"
    raise ValueError(f"{name}={str(path)!r}: {cfg} is neither a jaxformers run config nor a "
                     "Hugging Face config (no model_type)")


def source_loss(path) -> Optional[str]:
    """The registered loss a source run was trained with (e.g. a landmark run's
    ``landmark_cross_entropy``); ``None`` for a HF checkpoint."""
    path = Path(path).expanduser()
    if source_kind(path) != "run":
        return None
    return (json.loads((path / "config.json").read_text()).get("train") or {}).get("loss")


def source_imports(path) -> Tuple[str, ...]:
    """The modules a source run recorded (``train.imports``: its architecture or loss of your own,
    which a run fine-tuned from it needs too), imported (:func:`.rundir.import_run_modules`);
    ``()`` for a HF checkpoint or a run that records none."""
    from .rundir import import_run_modules

    path = Path(path).expanduser()
    if source_kind(path) != "run":
        return ()
    return import_run_modules(json.loads((path / "config.json").read_text()), path)


def source_config(path) -> Tuple[Any, Optional[str]]:
    """``(model config of the source, its tokenizer spec or None)``.

    The tokenizer of a run is its ``tokenizer`` spec when byte-level, else its saved
    ``tokenizer/`` directory (``hf:DIR``, so a fine-tuning corpus is encoded with the same
    vocabulary); of a HF checkpoint ``hf:DIR`` when it ships a ``tokenizer.json``.  A run's
    recorded modules (``train.imports``) are imported first (:func:`source_imports`).
    """
    from ..registry import config_from_dict

    path = Path(path).expanduser()
    kind = source_kind(path)
    data = json.loads((path / "config.json").read_text())
    if kind == "run":
        from .rundir import TOKENIZER_DIR, import_run_modules
        import_run_modules(data, path)  # its architecture of your own: the module that registers it
        config = config_from_dict(data["model"])
        tok = data["train"].get("tokenizer", "byte")
        saved_tok = path / TOKENIZER_DIR / "tokenizer.json"
        if tok != "byte" and not str(tok).startswith("hf:") and saved_tok.is_file():
            tok = f"hf:{path / TOKENIZER_DIR}"
        return config, tok
    from ..convert import config_from_hf, config_from_hf_mamba
    if data.get("model_type") in ("mamba", "mamba2"):
        config = config_from_hf_mamba(data)
    else:
        config = config_from_hf(data)
    return config, (f"hf:{path}" if (path / "tokenizer.json").is_file() else None)


def _relayout(params, abstract):
    """Stack / unstack the layers of ``params`` to match ``abstract`` (scan_layers or not)."""
    from ..convert import stack_layers, unstack_layers

    if "blocks" in abstract and "blocks" not in params and "blocks_0" in params:
        return stack_layers(params, "blocks")
    if "blocks_0" in abstract and "blocks_0" not in params and "blocks" in params:
        return unstack_layers(params, "blocks")
    return params


def _tree_difference(model, source, shown: int = 5) -> str:
    """The parameter paths only the model / only the source has (the first ``shown`` of each)."""
    def paths(tree):
        return [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]

    want, got = paths(model), paths(source)
    want_set, got_set = set(want), set(got)
    missing = [p for p in want if p not in got_set]
    extra = [p for p in got if p not in want_set]
    parts = []
    for what, names in (("missing from the source", missing), ("not in the model", extra)):
        if names:
            more = f" ... ({len(names)} in all)" if len(names) > shown else ""
            parts.append(f"{what}: {', '.join(names[:shown])}{more}")
    return "; ".join(parts) or f"model {jax.tree_util.tree_structure(model)}, source " \
                                f"{jax.tree_util.tree_structure(source)}"


#: Model-config fields that do not change what loaded parameters compute (precision, layout,
#: memory, the kernels and their tiles, dropout, initialisation, the optimizer's weight-decay
#: groups, the length limit): not reported by :func:`config_changes`.
RUNTIME_FIELDS = frozenset({"dtype", "param_dtype", "scan_layers", "remat", "attention_impl", "scan_impl",
                            "sparse_impl", "landmark_impl", "chunk_size", "block_q", "block_k", "dropout",
                            "attn_dropout", "embed_dropout", "init_std", "scale_residual_init",
                            "weight_decay_groups", "max_seq_len"})


def config_changes(path, model_config) -> list:
    """``["field: source -> model", ...]``: the architecture fields of ``model_config`` that differ
    from the source's config (:func:`source_config`) although the parameter tree matches (e.g.
    ``rope_theta``, ``window``, ``norm_eps``: the loaded weights then compute something else than
    they were trained for); fields in :data:`RUNTIME_FIELDS` are left out."""
    from .rundir import _json, config_diff

    source, _ = source_config(path)
    return config_diff(_json(source.to_dict()), _json(model_config.to_dict()), ignore=RUNTIME_FIELDS)


def load_params(path, abstract_params, model_config=None) -> Any:
    """The source's parameters (float32) laid out like ``abstract_params`` (the trained
    model's abstract tree); ``ValueError`` naming the first mismatching leaf.  With
    ``model_config`` (the trained model's config), a warning names the architecture fields
    that differ from the source's (:func:`config_changes`; a deliberate change such as a new
    ``rope_theta`` is allowed)."""
    path = Path(path).expanduser()
    changes = config_changes(path, model_config) if model_config is not None else []
    differ = f" (the model config differs from the source's in: {'; '.join(changes)})" if changes else ""
    if source_kind(path) == "run":
        from .rundir import load_run
        _, _, params = load_run(path)
    else:
        from ..convert import from_hf
        _, params = from_hf(str(path), dtype="float32")
    params = _relayout(jax.tree.map(lambda x: np.asarray(x, np.float32), params), abstract_params)
    want = jax.tree_util.tree_structure(abstract_params)
    got = jax.tree_util.tree_structure(params)
    if want != got:
        raise ValueError(f"init_from={str(path)!r}: its parameter tree does not match the model's "
                         f"({_tree_difference(abstract_params, params)}); the model config must be "
                         f"the source's{differ}")
    for (keypath, a), b in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                               jax.tree_util.tree_leaves(params)):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"init_from={str(path)!r}: parameter {jax.tree_util.keystr(keypath)} has "
                             f"shape {tuple(b.shape)}, the model expects {tuple(a.shape)}{differ}")
    if changes:  # only once the parameters fit: then the fields changed what they compute
        log.warning("init_from=%r: the model config differs from the source's in fields that keep the "
                    "parameter tree, so the loaded weights compute something else than they were "
                    "trained for: %s", str(path), "; ".join(changes))
    return params
