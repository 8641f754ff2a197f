"""DoGE: domain reweighting with generalization estimation (Fan, Pagliardini & Jaggi, 2023).

A small proxy model learns the domain sampling weights ``alpha`` (``[K]``, on the simplex) by
a bi-level rule.  At proxy step ``t``, with one equal micro-batch per domain:

* per-domain gradients ``g_k = grad L_k(theta_t)`` (one compiled step: ``vmap`` over the K
  micro-batches) and their Gram matrix ``G_ij = <g_i, g_j>``;
* the generalization-estimation score of each training domain ``i``

  - universal generalization (no target given; every domain is both trained on and a
    target):  ``W_i = lr_t * sum_{j != i} G_ij``
  - out-of-domain (``targets``: domains held out of training whose loss is the goal):
    ``W_i = lr_t * sum_{o in targets} G_io``

  divided by the mean gradient norm of the training domains and clipped to
  ``[lr_t * dw_min, lr_t * dw_max]``;
* a multiplicative-weights (mirror-descent) update of the log-weights:
  ``log alpha_t = log alpha_{t-1} + W / mu``, ``alpha_t = softmax`` over the training
  domains (targets get weight 0), optionally smoothed towards uniform (``smoothing``);
* the model update with the reweighted gradient ``sum_i alpha_t,i g_i`` through the usual
  optimizer chain (global-norm clipping, AdamW, the learning-rate schedule).

The output is the average of ``alpha_t`` over the run (``avg_weight``), which then drives the
sampling of a larger base model's batches (``domains:...@w`` specs, :mod:`jaxformers.data.domains`).

Use::

    step = DogeStep(domains=("comedies", "python", ...), mu=0.01)
    summary = train(model_config, train_config.replace(data=step.data_spec()), step_fn=step)
    weights = doge_weights(run_dir)

:class:`DogeStep` is a ``step_fn`` for :func:`~jaxformers.training.train`
(:class:`~jaxformers.training.steps.Program`): its state (current weights, their running sum,
the update count) lives in the optimizer state (:meth:`DogeStep.wrap_optimizer`), so it is
sharded, checkpointed and restored with it -- a killed and resumed proxy run reproduces the
weights of an uninterrupted one.  The step's settings (domains, targets, ``mu``, clip,
smoothing) are recorded in the run directory's ``doge.json``; resuming with other settings is a
``ValueError``.  Logged every ``log_every`` steps (and at the last): ``doge/weight/<d>``,
``doge/avg_weight/<d>``, ``doge/score/<d>``, ``doge/grad_norm/<d>`` and ``loss/<d>`` (each
domain's micro-batch loss).

Deviations from the authors' code (Olivia-fsm/DoGE, ``src/trainer.py``):

* Universal mode scores each domain against the *other* training domains (their code's
  ``set(train_ids) == set(tgt_ids)`` branch).  Their released universal config
  (``config/doge.json``) instead targets ``mix``, an extra held-out domain mixing all seven
  equally, so there ``W_i = lr <g_i, g_mix>`` includes (about ``1/K`` of) the domain's own
  gradient; here ``W_i`` has no self term.  (Their out-of-domain configs also use ``mu=0.05``.)

* Their per-domain backward passes accumulate into the same ``.grad`` buffers (no
  ``zero_grad`` between domains) and clip the running sum, so "domain k's gradient" there is
  the clipped sum of domains ``0..k``.  We use each domain's own unclipped gradient, as the
  paper defines the score; clipping applies to the reweighted update, as in normal training.
* The proxy batch holds exactly one micro-batch per domain (``sample=stratified``), where
  theirs samples domains at random per row (uniform weights) and skips domains absent from a
  batch.
* A domain whose micro-batch has no targets (its ``n_targets`` is 0: only with masks that a
  custom loss or batch brings) has gradient 0 that step -- it adds nothing to the update or to
  the others' scores, is left out of the mean norm, and logs ``loss/<d>`` 0 -- where theirs
  leaves it out of the update but scores it with its last seen gradient.
* ``loss`` in the metrics is the reweighted objective ``sum_i alpha_i L_i`` (the loss whose
  gradient is applied); the uniform average is ``sum_d loss/<d> / K``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import warnings
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..config import plain_scalars
from .steps import global_norm, loss_with_aux, split_micro_batches

DOGE_FILE = "doge.json"  # the DogeStep settings of a proxy run, in its run directory

__all__ = ["DogeState", "DogeStep", "doge_scores", "doge_weights", "doge_weight_history",
           "update_weights"]


class DogeState(NamedTuple):
    """DoGE's state inside the optimizer state: ``inner`` (the wrapped optimizer's state),
    ``weights`` float32 ``[K]`` (current alpha), ``weight_sum`` float32 ``[K]`` (sum of alpha
    over the updates so far) and ``n_updates`` (int32)."""
    inner: Any
    weights: jax.Array
    weight_sum: jax.Array
    n_updates: jax.Array


def doge_scores(gram: jax.Array, lr, train_mask, target_mask, dw_min: float, dw_max: float,
                present=None) -> jax.Array:
    """The generalization-estimation scores ``W`` (``[K]``; 0 outside the training domains).

    ``gram``: ``[K, K]`` gradient inner products; ``train_mask`` / ``target_mask``: ``[K]``
    bools.  Universal mode (the targets are the training domains): ``W_i = lr * sum_{j != i,
    j in train} G_ij``; out-of-domain: ``W_i = lr * sum_{o in targets} G_io``; both divided by
    the mean norm of the training domains' gradients and clipped to ``lr * [dw_min, dw_max]``.
    ``present``: optional ``[K]`` bools (may be traced), the domains that had targets this step:
    the mean norm is over the present training domains only (absent ones have gradient 0).
    """
    train = jnp.asarray(train_mask, jnp.float32)
    target = jnp.asarray(target_mask, jnp.float32)
    universal = np.array_equal(np.asarray(train_mask), np.asarray(target_mask))
    cross = gram @ target
    if universal:
        cross = cross - jnp.diagonal(gram) * target
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    counted = train if present is None else train * jnp.asarray(present, jnp.float32)
    mean_norm = jnp.sum(norms * counted) / jnp.maximum(jnp.sum(counted), 1.0)
    scores = lr * cross / (mean_norm + 1e-6)
    scores = jnp.clip(scores, lr * dw_min, lr * dw_max)
    return scores * train


def update_weights(weights: jax.Array, scores: jax.Array, train_mask, mu: float,
                   smoothing: float = 0.0) -> jax.Array:
    """``softmax(log weights + scores / mu)`` over the training domains (0 elsewhere), then
    ``(1 - smoothing) * alpha + smoothing / K_train``."""
    train = jnp.asarray(train_mask, bool)
    logits = jnp.where(train, jnp.log(jnp.maximum(weights, 1e-30)) + scores / mu, -jnp.inf)
    new = jax.nn.softmax(logits)
    n_train = jnp.sum(train.astype(jnp.float32))
    new = (1.0 - smoothing) * new + jnp.where(train, smoothing / n_train, 0.0)
    return jnp.where(train, new, 0.0)


def _weighted_sum(weights, tree):
    return jax.tree.map(lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), tree)


def _gram(grads) -> jax.Array:
    """``[K, K]`` float32 inner products of the stacked (leading axis K) gradient pytrees."""
    def one(g):
        g = g.astype(jnp.float32)
        axes = tuple(range(1, g.ndim))
        return jnp.tensordot(g, g, axes=(axes, axes))
    return sum(jax.tree.leaves(jax.tree.map(one, grads)))


@dataclasses.dataclass(frozen=True)
class DogeStep:
    """The DoGE proxy step (a ``step_fn`` for :func:`~jaxformers.training.train`).

    ``domains``: the names of the K domains, in the order of the data spec.  ``targets``:
    the out-of-domain target domains (excluded from training, weight 0); ``()`` = universal
    generalization (every domain is a training domain and a target).  ``mu``: the step size's
    inverse (the authors' default 0.01; 0.05 in their out-of-domain configs).  ``dw_min`` /
    ``dw_max``: the score clip, in units of the learning rate (authors: 0 and 5).
    ``smoothing``: mixing of the new weights with uniform (authors' ``reweight_eps``, 0).
    Universal mode needs >= 3 domains: with 2, both scores are ``lr <g_1, g_2> / norm`` (the
    Gram matrix is symmetric), so the weights stay uniform whatever the data (a warning).
    """

    domains: Tuple[str, ...]
    targets: Tuple[str, ...] = ()
    mu: float = 0.01
    dw_min: float = 0.0
    dw_max: float = 5.0
    smoothing: float = 0.0

    def __post_init__(self):
        plain_scalars(self)  # np.float32(0.05) from a sweep -> 0.05: results.json stays JSON
        for name in ("domains", "targets"):  # a single string would be split into its characters
            value = getattr(self, name)
            value = None if isinstance(value, str) or not hasattr(value, "__iter__") else tuple(value)
            if value is None or not all(isinstance(d, str) for d in value):
                raise ValueError(f"{name} must be a sequence of domain names (strings), got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        for name in ("mu", "dw_min", "dw_max", "smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(self.mu) and self.mu > 0):  # mu = inf: weights that never move
            raise ValueError(f"mu must be a finite number > 0, got {self.mu}")
        if len(self.domains) < 2 or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be >= 2 distinct names, got {self.domains!r}")
        unknown = [t for t in self.targets if t not in self.domains]
        if unknown:
            raise ValueError(f"targets {unknown} are not among domains {self.domains}")
        if len(self.targets) >= len(self.domains):
            raise ValueError(f"targets={self.targets!r} leave no training domain")
        if not self.dw_min <= self.dw_max:
            raise ValueError(f"need dw_min <= dw_max, got dw_min={self.dw_min}, dw_max={self.dw_max}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if not self.targets and len(self.domains) == 2:
            warnings.warn(f"DogeStep(domains={self.domains}) in universal mode: with 2 domains both scores are "
                          "<g_1, g_2>, so the weights stay uniform whatever the data; use >= 3 domains or "
                          "an out-of-domain target", stacklevel=3)

    # ------------------------------------------------------------------ domains
    @property
    def n_domains(self) -> int:
        return len(self.domains)

    @property
    def train_mask(self) -> np.ndarray:
        return np.asarray([d not in self.targets for d in self.domains])

    @property
    def target_mask(self) -> np.ndarray:
        if not self.targets:
            return self.train_mask
        return np.asarray([d in self.targets for d in self.domains])

    @property
    def train_domains(self) -> Tuple[str, ...]:
        return tuple(d for d in self.domains if d not in self.targets)

    def initial_weights(self) -> np.ndarray:
        m = self.train_mask.astype(np.float32)
        return m / m.sum()

    def data_spec(self, sources: Optional[Sequence[Optional[str]]] = None, **options) -> str:
        """The proxy run's data spec: these domains, one micro-batch each (``sample=stratified``)."""
        from ..data.domains import domain_spec

        if "sample" in options:  # (the proxy's batches are one micro-batch per domain)
            raise ValueError(f"sample={options['sample']!r} is not allowed: the DoGE proxy samples 'stratified'")
        return domain_spec(self.domains, sources, sample="stratified", **options)

    def check_source(self, source, train_config) -> None:
        """``ValueError`` unless ``source`` gives one micro-batch per domain in this order, and
        (a resume) unless ``train_config.out_dir`` was trained with these settings (``doge.json``,
        written here for a new run)."""
        names = tuple(getattr(source, "names", ()))
        parsed = getattr(source, "parsed", None)
        if names != self.domains or parsed is None or parsed.sample != "stratified":
            raise ValueError(
                f"DogeStep needs data='domains:...:sample=stratified' with the domains {self.domains} in "
                f"this order (DogeStep.data_spec() writes it); got data={getattr(source, 'spec', source)!r}")
        if train_config.batch_size % self.n_domains:
            raise ValueError(f"batch_size={train_config.batch_size} must be a multiple of the "
                             f"{self.n_domains} domains (one equal micro-batch per domain)")
        if train_config.grad_accum != 1:
            raise ValueError(f"DogeStep supports grad_accum=1 only, got {train_config.grad_accum}")
        self._check_run_dir(train_config.out_dir)

    def settings(self) -> Dict[str, Any]:
        """What determines the weights' trajectory (recorded in the run directory's ``doge.json``)."""
        return {"domains": list(self.domains), "targets": list(self.targets), "mu": float(self.mu),
                "dw_min": float(self.dw_min), "dw_max": float(self.dw_max), "smoothing": float(self.smoothing)}

    def run_changes(self, run_dir) -> list:
        """How the settings ``run_dir`` was trained with (its ``doge.json``; all of them when it has
        none) differ from these: ``["mu: 0.01 -> 0.05", ...]``, empty when equal.  A ``step_fn``
        hook: ``experiments.common.check_reuse`` compares finished runs with it."""
        path = Path(run_dir).expanduser() / DOGE_FILE
        return self._changes(json.loads(path.read_text()) if path.is_file() else {})

    def _changes(self, saved: dict) -> list:
        return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in self.settings().items() if saved.get(k) != v]

    def _check_run_dir(self, out_dir) -> None:
        """A resume must have been trained with these settings; a new run records them (``doge.json``)."""
        from .rundir import check_step_settings

        check_step_settings(out_dir, DOGE_FILE, self.settings(), self._changes, "DogeStep")

    # ------------------------------------------------------------------ optimizer state
    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """``tx`` with :class:`DogeState` around its state (updates pass through ``tx``)."""
        w0 = self.initial_weights()

        def init(params):
            return DogeState(tx.init(params), jnp.asarray(w0), jnp.zeros_like(jnp.asarray(w0)),
                             jnp.zeros((), jnp.int32))

        def update(updates, state, params=None):
            updates, inner = tx.update(updates, state.inner, params)
            return updates, state._replace(inner=inner)

        return optax.GradientTransformation(init, update)

    # ------------------------------------------------------------------ the step
    def __call__(self, module, tx, loss_fn, params, opt_state, batch, step, rng, *, grad_accum: int = 1,
                 aux_weights=None, schedule=None, micro_sharding=None):
        """One proxy update: ``(params, opt_state, metrics)`` (the signature of ``train_step``)."""
        if grad_accum != 1:
            raise ValueError(f"DogeStep supports grad_accum=1 only, got {grad_accum}")
        if schedule is None:
            raise ValueError("DogeStep needs the learning-rate schedule (the score scales with lr_t)")
        if not isinstance(opt_state, DogeState):
            raise ValueError("opt_state is not a DogeState: build the optimizer with DogeStep.wrap_optimizer "
                             "(train(..., step_fn=DogeStep(...)) does)")
        k = self.n_domains
        step = jnp.asarray(step, jnp.int32)
        rng = None if rng is None else jax.random.fold_in(rng, step)
        micro = split_micro_batches(batch, k, micro_sharding)  # [K, B/K, ...]: micro-batch d = domain d
        grad_fn = jax.value_and_grad(
            lambda p, b, r: loss_with_aux(module, loss_fn, p, b, r, aux_weights), has_aux=True)
        keys = None if rng is None else jax.random.split(rng, k)
        (_, metrics), grads = jax.vmap(grad_fn, in_axes=(None, 0, None if keys is None else 0))(
            params, micro, keys)
        present = None
        if "n_targets" in metrics:  # a domain without targets adds nothing (not NaN from a 0/0 mean)
            present = metrics["n_targets"] > 0
            grads = jax.tree.map(lambda g: jnp.where(present.reshape((k,) + (1,) * (g.ndim - 1)), g, 0), grads)
            metrics = {key: v if key == "n_targets" else jnp.where(present, v, 0.0) for key, v in metrics.items()}

        lr = jnp.asarray(schedule(step), jnp.float32)
        gram = _gram(grads)
        scores = doge_scores(gram, lr, self.train_mask, self.target_mask, self.dw_min, self.dw_max, present)
        weights = update_weights(opt_state.weights, scores, self.train_mask, self.mu, self.smoothing)
        update = _weighted_sum(weights, grads)
        update = jax.tree.map(lambda u, p: u.astype(p.dtype), update, params)

        updates, opt_state = tx.update(update, opt_state, params)
        params = optax.apply_updates(params, updates)
        weight_sum = opt_state.weight_sum + weights
        n = opt_state.n_updates + 1
        opt_state = opt_state._replace(weights=weights, weight_sum=weight_sum, n_updates=n)

        out: Dict[str, jax.Array] = {}
        for key, value in metrics.items():  # [K] per domain -> reweighted (counts: summed)
            out[key] = jnp.sum(value) if key == "n_targets" else jnp.sum(weights * value)
        out["grad_norm"] = global_norm(update)
        out["lr"] = lr
        avg = weight_sum / n.astype(jnp.float32)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        for i, name in enumerate(self.domains):
            out[f"loss/{name}"] = metrics["loss"][i]
            out[f"doge/weight/{name}"] = weights[i]
            out[f"doge/avg_weight/{name}"] = avg[i]
            out[f"doge/score/{name}"] = scores[i]
            out[f"doge/grad_norm/{name}"] = norms[i]
        return params, opt_state, out


# ============================================================================ reading results
def _metrics_rows(run_dir) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl: not a run directory (or not trained yet)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


#: The per-domain series a DoGE proxy run logs (``doge/<kind>/<domain>``).
WEIGHT_HISTORY_KINDS = ("weight", "avg_weight", "score", "grad_norm")


def doge_weight_history(run_dir, kind: str = "weight") -> Tuple[list, Dict[str, list]]:
    """``(steps, {domain: [value per logged step]})`` of ``doge/<kind>/<domain>`` in a proxy
    run's ``metrics.jsonl`` (``kind``: ``weight``, ``avg_weight``, ``score``, ``grad_norm``)."""
    if kind not in WEIGHT_HISTORY_KINDS:
        raise ValueError(f"kind must be one of {list(WEIGHT_HISTORY_KINDS)}, got {kind!r}")
    prefix = f"doge/{kind}/"
    rows = [r for r in _metrics_rows(run_dir) if any(k.startswith(prefix) for k in r)]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no {prefix}* values: not a DoGE proxy run")
    names = [k[len(prefix):] for k in rows[-1] if k.startswith(prefix)]
    return [r["step"] for r in rows], {n: [r.get(prefix + n) for r in rows] for n in names}


def doge_weights(run_dir, *, allow_unfinished: bool = False) -> Dict[str, float]:
    """The DoGE output of a proxy run: the average weights over the run (its last logged
    ``doge/avg_weight/<domain>``; the last step of a run is always logged).

    ``ValueError`` when the run is not finished (stopped or killed before its ``steps``: its
    last logged average is of an earlier step, not the run's output) unless
    ``allow_unfinished`` (then: the average up to the last logged step)."""
    steps, history = doge_weight_history(run_dir, "avg_weight")
    from .rundir import read_config

    total = ((read_config(run_dir) or {}).get("train") or {}).get("steps")
    if not allow_unfinished and total is not None and steps[-1] < total:
        raise ValueError(f"{run_dir} is not finished: its last logged DoGE weights are of step {steps[-1]} "
                         f"of {total}; resume it (train(..., resume=True) with the same DogeStep) or pass "
                         "allow_unfinished=True")
    return {name: float(values[-1]) for name, values in history.items()}
