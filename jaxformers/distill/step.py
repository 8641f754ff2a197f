"""Distillation: a KL loss on the teacher's logits, the teacher run inside the student's step.

    loss = kl_weight * tau^2 * KL(softmax(t / tau) || softmax(s / tau)) + ce_weight * CE(s, y)

per target token (``t`` / ``s``: teacher / student logits), averaged over the weighted
targets like :func:`~jaxformers.training.cross_entropy` (``loss_mask``, segments).

:class:`DistillStep` is a ``step_fn`` for :func:`~jaxformers.training.train`: the teacher's
parameters are the step's ``extra`` inputs (placed once, sharded by their logical axis names
like the student's), the teacher's logits are computed in the same compiled step (no
gradient) and added to the batch as ``teacher_logits`` ``[B, T, V]``, then the ordinary
:func:`~jaxformers.training.steps.train_step` runs with :func:`kd_loss` -- so gradient
accumulation, auxiliary losses and the optimizer work unchanged.  Evaluation stays the
student's next-token cross-entropy.

Deviation from the authors' code (MambaInLlama ``train_hybrid.py``): their KL is
``F.kl_div(..., reduction="batchmean")``, summed over the tokens of a sequence and
averaged over sequences, mixed as ``0.1 * KL_sum + 1.0 * CE``; ours is per token (the
same direction, normalised like the cross-entropy), default ``kl_weight=1, ce_weight=0``.
Their distillation stage also trains only the SSM mixers (``requires_grad=False`` on every
student parameter whose name lacks ``mamba``: embeddings, norms, MLPs, the kept attention
layers and the head stay the teacher's); here every student parameter is trained.
(:func:`align_loss` only reaches the converted layers, so its gradients are the SSM blocks'.)
"""
from __future__ import annotations

import functools
import json
import math
import numbers

import jax
import jax.numpy as jnp

from ..layers.common import dtype_of
from ..models.transformer import block_inputs
from ..training.losses import (apply_model, logits_cross_entropy, model_inputs, next_token_targets,
                               weighted_mean)
from ..training.steps import abstract_params, train_step
from .convert import check_params_tree

__all__ = ["DistillStep", "align_loss", "kd_loss", "kl_per_token", "teacher_hidden_states"]

STEP_FILE = "distill_step.json"  # a DistillStep run's stage, loss settings and teacher config


def kl_per_token(teacher_logits, student_logits, temperature: float = 1.0) -> jax.Array:
    """``tau^2 * KL(softmax(t / tau) || softmax(s / tau))`` over the last axis, float32 ``[B, T]``.

    A class the teacher gives probability 0 (a ``-inf`` teacher logit, e.g. a masked vocabulary
    entry) adds 0 (``0 log 0 = 0``), not NaN, whatever the student's logit there."""
    if isinstance(temperature, numbers.Real) and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    p = jnp.exp(t)
    return temperature ** 2 * jnp.sum(jnp.where(p > 0, p * (t - s), 0.0), axis=-1)


def kd_loss(module, params, batch, rng=None, *, temperature: float = 1.0, kl_weight: float = 1.0,
            ce_weight: float = 0.0):
    """The distillation loss of a batch dict with ``teacher_logits`` ``[B, T, V]``.
    Metrics: ``kl``, ``ce`` (the student's next-token cross-entropy), ``n_targets``."""
    if "teacher_logits" not in batch:
        raise ValueError("kd_loss needs batch['teacher_logits'] [B, T, V] (DistillStep adds it)")
    logits, _ = apply_model(module, params, batch, rng)
    if batch["teacher_logits"].shape != logits.shape:
        raise ValueError(f"teacher_logits {tuple(batch['teacher_logits'].shape)} must match the student's logits "
                         f"{tuple(logits.shape)} [B, T, V] (the same vocab_size as the teacher)")
    _, weights = next_token_targets(batch)
    kl, n = weighted_mean(kl_per_token(batch["teacher_logits"], logits, temperature), weights)
    ce, _ = logits_cross_entropy(logits, batch)  # (a counted target id outside [0, V): ValueError)
    return kl_weight * kl + ce_weight * ce, {"kl": kl, "ce": ce, "n_targets": n}


def _check_chained_blocks(module) -> None:
    """``ValueError`` unless ``module`` chains ``n_layer`` blocks plainly (``Transformer.run_blocks``:
    block ``i``'s output is block ``i + 1``'s input), the premise of the hidden states below:
    DenseFormer's depth-weighted averages or CoTFormer's repeats feed their blocks other inputs."""
    from ..models.transformer import Transformer

    if not isinstance(module, Transformer) or type(module).run_blocks is not Transformer.run_blocks \
            or len(module.layer_classes()) != module.config.n_layer:
        raise ValueError(f"hidden states (stage='align') need a teacher whose blocks are chained one after "
                         f"another (llama, gpt); model {getattr(module.config, 'model', None)!r} "
                         f"({type(module).__name__}) feeds its blocks other inputs")


def teacher_hidden_states(module, params, tokens, **kwargs) -> jax.Array:
    """``[B, L + 1, T, D]``: the embedding output and every block's output of ``module``
    (a model built from ``Transformer`` that chains its blocks: llama, gpt, the students; a
    ``ValueError`` for DenseFormer / CoTFormer, whose blocks see other inputs), via flax's
    ``capture_intermediates``.  A teacher with
    ``scan_layers=True`` is run unrolled (its stacked ``blocks`` split per layer)."""
    from ..convert.layers import unstack_layers
    from ..layers import Block, Embed
    from ..registry import build

    _check_chained_blocks(module)
    if module.config.scan_layers:
        module = build(module.config.replace(scan_layers=False))
        params = unstack_layers(dict(params), n_layer=module.config.n_layer)

    def wanted(mdl, method_name):
        return method_name == "__call__" and isinstance(mdl, (Block, Embed))

    _, state = module.apply({"params": params}, tokens, capture_intermediates=wanted, mutable=["intermediates"],
                            **kwargs)
    inter = state["intermediates"]
    hidden = [inter["embed"]["__call__"][0]]
    hidden += [inter[f"blocks_{i}"]["__call__"][0][0] for i in range(module.config.n_layer)]
    return jnp.stack(hidden, axis=1)


def align_loss(module, params, batch, rng=None):
    """Layer-wise alignment: every converted (SSM) layer ``i`` of the student, applied to the
    teacher's input of layer ``i``, should give the teacher's output of layer ``i``:
    ``mean_i |S_i(h_i) - h_{i+1}|^2 / |h_{i+1}|^2`` over the student's SSM layers (squared
    norms over the batch's every input position), with
    ``batch["teacher_hidden"]`` ``[B, L + 1, T, D]`` (:func:`teacher_hidden_states`).
    The layers see the batch's ``segment_ids`` / ``positions`` (packed sequences stay
    separate, as in the teacher's run).  The normalisation is per batch: with
    ``grad_accum > 1`` the update is close to, not equal to, the whole batch's.
    Only the converted layers receive gradients (and :class:`DistillStep` updates only them).
    Metrics: ``align``, ``n_targets``."""
    if "teacher_hidden" not in batch:
        raise ValueError("align_loss needs batch['teacher_hidden'] [B, L+1, T, D] (DistillStep(stage='align') adds it)")
    hidden = batch["teacher_hidden"].astype(jnp.float32)
    attn = set(getattr(module.config, "attention_layers", ()))
    tokens, inputs = model_inputs(batch)
    want = (tokens.shape[0], module.config.n_layer + 1, tokens.shape[1], module.config.d_model)
    if hidden.shape != want:  # layer i of the student is aligned to the teacher's layer i
        raise ValueError(f"teacher_hidden {tuple(hidden.shape)} must be [B, L + 1, T, D] = {want}: the student "
                         "needs the teacher's n_layer and d_model (student_config(teacher_config, ...))")
    segment_ids, positions = block_inputs(tokens.shape, inputs.get("positions"), inputs.get("segment_ids"))
    terms = []
    for i, (cls, cfg) in enumerate(module.layer_specs()):
        if i in attn:
            continue
        # the block's input in the dtype of the model's residual stream (Embed: float32 under
        # residual_fp32), so that the layer computes here as it does in the student
        resid = jnp.float32 if getattr(cfg, "residual_fp32", False) else dtype_of(cfg.dtype)
        y, _ = cls(cfg).apply({"params": params[f"blocks_{i}"]}, hidden[:, i].astype(resid), positions,
                              segment_ids)
        target = hidden[:, i + 1]
        terms.append(jnp.mean((y.astype(jnp.float32) - target) ** 2) / (jnp.mean(target ** 2) + 1e-6))
    if not terms:
        raise ValueError("the student has no converted (SSM) layer to align")
    loss = sum(terms) / len(terms)
    _, weights = next_token_targets(batch)
    return loss, {"align": loss, "n_targets": jnp.sum(weights)}


def _teacher_tree(teacher, params):
    """The teacher's parameter tree from ``params`` (the tree, or the ``{"params": ...}``
    variables dict, boxed or not, as :func:`~jaxformers.distill.init_student` takes it);
    ``ValueError`` naming ``teacher_params`` unless its keys and shapes are ``teacher``'s
    (else a pytree-structure error when the trainer places it)."""
    import flax.linen as nn
    from flax.core import unfreeze

    tree = unfreeze(nn.unbox(params))
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    check_params_tree("teacher_params", teacher.config, tree, "teacher_config")
    return tree


class DistillStep:
    """``train(student_config, tc, step_fn=DistillStep(teacher_config, teacher_params))``.

    ``teacher_params``: the teacher's parameter tree or its ``{"params": ...}`` variables dict
    (``ValueError`` unless it fits ``teacher_config``).  ``stage="kd"``: end-to-end distillation with :func:`kd_loss` (``temperature``,
    ``kl_weight``, ``ce_weight``); ``stage="align"``: layer-wise alignment
    (:func:`align_loss`, the teacher's hidden states in the batch; only the converted layers'
    parameters change: the embeddings, final norm, head and kept attention layers stay the
    teacher's, whatever the weight decay).  The teacher runs in its
    own compute dtype (``teacher_config.dtype``) under ``stop_gradient``.  The run directory's
    ``distill_step.json`` records the stage, the loss settings and the teacher's config:
    resuming with others is a ``ValueError``.
    """

    STAGES = ("kd", "align")

    def __init__(self, teacher_config, teacher_params, *, stage: str = "kd", temperature: float = 1.0,
                 kl_weight: float = 1.0, ce_weight: float = 0.0):
        from ..registry import build

        if stage not in self.STAGES:
            raise ValueError(f"stage must be one of {self.STAGES}, got {stage!r}")
        self.stage = stage

        for name, value in (("temperature", temperature), ("kl_weight", kl_weight), ("ce_weight", ce_weight)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if kl_weight < 0 or ce_weight < 0 or kl_weight + ce_weight == 0:
            raise ValueError(f"kl_weight and ce_weight must be >= 0 with a positive sum, got "
                             f"{kl_weight}, {ce_weight}")
        self.teacher_config = teacher_config
        self.teacher = build(teacher_config)
        if stage == "align":
            _check_chained_blocks(self.teacher)
        self.teacher_params = None if teacher_params is None else _teacher_tree(self.teacher, teacher_params)
        self.loss = functools.partial(kd_loss, temperature=float(temperature), kl_weight=float(kl_weight),
                                      ce_weight=float(ce_weight))
        self.settings = dict(stage=stage, temperature=float(temperature), kl_weight=float(kl_weight),
                             ce_weight=float(ce_weight))

    def __repr__(self) -> str:
        return f"DistillStep(teacher={self.teacher_config.model}, {self.settings})"

    def check_source(self, source, train_config) -> None:
        """``ValueError`` when the data's vocabulary exceeds the teacher's, or (a resume) when
        ``train_config.out_dir`` was trained with another stage, loss settings or teacher config
        (its ``distill_step.json``, written here for a new run)."""
        if source.vocab_size > self.teacher_config.vocab_size:
            raise ValueError(f"the data's vocab_size={source.vocab_size} exceeds the teacher's "
                             f"{self.teacher_config.vocab_size}")
        self._check_run_dir(train_config.out_dir)

    def record(self) -> dict:
        """What determines the run's objective (its ``distill_step.json``): the settings and the
        teacher's config fields (``teacher.<field>``; not the implementation fields)."""
        from ..training.rundir import IMPLEMENTATION_FIELDS

        teacher = {f"teacher.{k}": v for k, v in self.teacher_config.to_dict().items() if k not in IMPLEMENTATION_FIELDS}
        return json.loads(json.dumps({**self.settings, **teacher}))

    def _check_run_dir(self, out_dir) -> None:
        from ..training.rundir import check_step_settings, config_diff

        record = self.record()  # (teacher fields newer than a saved record: not compared)
        check_step_settings(out_dir, STEP_FILE, record, lambda old: config_diff(
            old, {k: v for k, v in record.items() if not k.startswith("teacher.") or k in old}), "DistillStep")

    def extra_inputs(self):
        """``(teacher params, their logical PartitionSpecs)``: sharded like a model's params."""
        if self.teacher_params is None:  # (a DistillStep built for its settings only)
            raise ValueError("DistillStep(teacher_config, teacher_params=None) cannot train: pass the teacher's "
                             "parameters")
        _, specs = abstract_params(self.teacher)
        return self.teacher_params, specs

    def teacher_logits(self, teacher_params, batch) -> jax.Array:
        tokens, kwargs = model_inputs(batch)
        logits = self.teacher.apply({"params": teacher_params}, tokens, **kwargs)
        return jax.lax.stop_gradient(logits.astype(jnp.float32))

    def __call__(self, module, tx, loss_fn, params, opt_state, batch, step, rng, *, extra=None,
                 **kw):
        if extra is None:
            raise ValueError("DistillStep needs the teacher params as extra inputs (Program passes them)")
        if self.stage == "align":
            tokens, kwargs = model_inputs(batch)
            hidden = jax.lax.stop_gradient(teacher_hidden_states(self.teacher, extra, tokens, **kwargs))
            new, opt_state, metrics = train_step(module, tx, align_loss, params, opt_state,
                                                 dict(batch, teacher_hidden=hidden), step, rng, **kw)
            # what the stage does not train stays as it was: weight decay (and the optimizer's
            # moments) would otherwise move the embeddings, head and kept attention layers
            attn = set(getattr(module.config, "attention_layers", ()))
            trained = {f"blocks_{i}" for i in range(module.config.n_layer) if i not in attn}
            return {k: v if k in trained else params[k] for k, v in new.items()}, opt_state, metrics
        batch = dict(batch, teacher_logits=self.teacher_logits(extra, batch))
        return train_step(module, tx, self.loss, params, opt_state, batch, step, rng, **kw)
