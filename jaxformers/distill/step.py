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
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from ..training.losses import apply_model, model_inputs, next_token_targets, weighted_mean
from ..training.steps import abstract_params, train_step

__all__ = ["DistillStep", "kd_loss", "kl_per_token"]


def kl_per_token(teacher_logits, student_logits, temperature: float = 1.0) -> jax.Array:
    """``tau^2 * KL(softmax(t / tau) || softmax(s / tau))`` over the last axis, float32 ``[B, T]``."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return temperature ** 2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def kd_loss(module, params, batch, rng=None, *, temperature: float = 1.0, kl_weight: float = 1.0,
            ce_weight: float = 0.0):
    """The distillation loss of a batch dict with ``teacher_logits`` ``[B, T, V]``.
    Metrics: ``kl``, ``ce`` (the student's next-token cross-entropy), ``n_targets``."""
    if "teacher_logits" not in batch:
        raise ValueError("kd_loss needs batch['teacher_logits'] [B, T, V] (DistillStep adds it)")
    logits, _ = apply_model(module, params, batch, rng)
    targets, weights = next_token_targets(batch)
    kl, n = weighted_mean(kl_per_token(batch["teacher_logits"], logits, temperature), weights)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce, _ = weighted_mean(-jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], weights)
    return kl_weight * kl + ce_weight * ce, {"kl": kl, "ce": ce, "n_targets": n}


class DistillStep:
    """``train(student_config, tc, step_fn=DistillStep(teacher_config, teacher_params))``.

    ``temperature``, ``kl_weight``, ``ce_weight``: see :func:`kd_loss`.  The teacher runs in
    its own compute dtype (``teacher_config.dtype``) under ``stop_gradient``.
    """

    def __init__(self, teacher_config, teacher_params, *, temperature: float = 1.0, kl_weight: float = 1.0,
                 ce_weight: float = 0.0):
        from ..registry import build

        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if kl_weight < 0 or ce_weight < 0 or kl_weight + ce_weight == 0:
            raise ValueError(f"kl_weight and ce_weight must be >= 0 with a positive sum, got "
                             f"{kl_weight}, {ce_weight}")
        self.teacher_config = teacher_config
        self.teacher = build(teacher_config)
        self.teacher_params = teacher_params
        self.loss = functools.partial(kd_loss, temperature=float(temperature), kl_weight=float(kl_weight),
                                      ce_weight=float(ce_weight))
        self.settings = dict(temperature=float(temperature), kl_weight=float(kl_weight), ce_weight=float(ce_weight))

    def __repr__(self) -> str:
        return f"DistillStep(teacher={self.teacher_config.model}, {self.settings})"

    def check_source(self, source, train_config) -> None:
        if source.vocab_size > self.teacher_config.vocab_size:
            raise ValueError(f"the data's vocab_size={source.vocab_size} exceeds the teacher's "
                             f"{self.teacher_config.vocab_size}")

    def extra_inputs(self):
        """``(teacher params, their logical PartitionSpecs)``: sharded like a model's params."""
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
        batch = dict(batch, teacher_logits=self.teacher_logits(extra, batch))
        return train_step(module, tx, self.loss, params, opt_state, batch, step, rng, **kw)
