"""AdamW with global-norm clipping and warmup + cosine / WSD / constant schedules.

Weight-decay rule: a parameter is decayed iff it has at least two axes other
than the stacked ``layers`` axis (of ``scan_layers``), a ``heads|kv_heads, head_dim``
pair counting as one (the attention's features split per head) -- i.e. matmul kernels
and embedding tables (as in GPT-2 / nanoGPT, where the tied embedding is also
the output layer).  Norm scales, biases (a parameter named ``bias`` never is, whatever its
shape: Mamba's ``in_proj`` bias ``[2, d_inner]`` is nn.Linear's 1-D bias split in two) and
scalar/vector mixing weights (e.g. DenseFormer's averaging weights) are not decayed.  Parameters without
logical axis names fall back to ``ndim >= 2``.  A model family names the parameters it
never decays, whatever their shape, in its config's ``no_weight_decay`` (the trainer passes
it as ``no_decay``): e.g. ``MambaConfig``'s ``A_log``, ``D``, ``dt_bias``, which the Mamba
authors mark ``_no_weight_decay`` (Mamba-1's ``A_log`` is ``[d_inner, d_state]``).  Under
``weight_decay_groups="nanogpt"`` (nanoGPT / llm-baselines' groups: the DenseFormer and
CoTFormer defaults) the embedding tables are never decayed either, and the names a family
builds as linear layers are always decayed (``decay``): e.g. DenseFormer's DWA weights
(``ModelConfig.weight_decay_names`` gives both lists).

Schedules (``count`` = number of completed updates, so the first update uses
``lr(0)``): linear warmup ``lr * (count + 1) / warmup`` for ``count < warmup``
(``TrainConfig.warmup``: ``warmup_steps``, or by default 10% of the schedule), then

* ``cosine``: cosine from ``lr`` down to ``lr * min_lr_ratio`` at ``steps``;
* ``wsd`` (warmup-stable-decay): ``lr`` until the last ``decay_fraction`` of the
  steps (rounded, at least one), then linear decay reaching ``lr * min_lr_ratio`` at ``steps``;
  ``decay_fraction=0``: no decay, ``lr`` throughout and past the end (the stable phase alone,
  to branch decays from its checkpoints with a longer ``schedule_steps``);
* ``constant``: ``lr``.

``steps`` here is ``TrainConfig.schedule_length``; past it every schedule holds its
final value (how an extended run continues, see :func:`lr_at`): ``lr * min_lr_ratio``, or
``lr`` when there is no decay (the warmup lasts the whole schedule, ``warmup == steps``, or
``wsd`` with ``decay_fraction=0``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from ..sharding import HEAD_DIM, HEADS, KV_HEADS, LAYERS


# The TrainConfig fields that make_schedule / make_optimizer read: two configs that agree on
# them (and on grad_accum) give the same compiled train step (see steps.program_key).
OPTIMIZER_FIELDS = ("steps", "lr", "min_lr_ratio", "warmup_steps", "warmup_fraction", "schedule",
                    "decay_fraction", "schedule_steps", "weight_decay", "beta1", "beta2", "eps", "grad_clip")
#: The fields that decide the learning rate at a given step (a resume that changes them is checked).
SCHEDULE_FIELDS = ("steps", "lr", "min_lr_ratio", "warmup_steps", "warmup_fraction", "schedule",
                   "decay_fraction", "schedule_steps")


#: The schedule fields only some schedules read: field -> those schedules (the others ignore it).
SCHEDULES_USING = {"min_lr_ratio": ("cosine", "wsd"), "decay_fraction": ("wsd",)}


def optimizer_key(tc) -> tuple:
    """``((field, value), ...)`` of :data:`OPTIMIZER_FIELDS`: everything the optimizer depends on."""
    return tuple((name, getattr(tc, name)) for name in OPTIMIZER_FIELDS)


def make_schedule(tc):
    """``count -> learning rate`` for a :class:`TrainConfig` (jit-friendly)."""
    peak = float(tc.lr)
    floor = peak * float(tc.min_lr_ratio)
    warmup = int(tc.warmup)
    total = int(tc.schedule_length)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.minimum(1.0, (count + 1.0) / max(warmup, 1))
        if tc.schedule == "constant":
            after = jnp.asarray(peak, jnp.float32)
        elif tc.schedule == "cosine":
            span = max(total - warmup, 1)
            # no decay when the warmup fills the schedule: it ends (and stays) at the peak
            frac = jnp.clip((count - warmup) / span, 0.0, 1.0) if total > warmup else jnp.zeros_like(count)
            after = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * frac))
        elif tc.schedule == "wsd":
            decay_steps = max(int(round(total * float(tc.decay_fraction))), 1)
            start = max(total - decay_steps, warmup)
            frac = (jnp.clip((count - start) / max(total - start, 1), 0.0, 1.0)
                    if total > start and tc.decay_fraction > 0 else jnp.zeros_like(count))
            after = peak + (floor - peak) * frac
        else:  # validated in TrainConfig
            raise ValueError(f"unknown schedule {tc.schedule!r}")
        lr = jnp.where(count < warmup, warm, after) if warmup > 0 else after
        return lr.astype(jnp.float32)

    return schedule


def lr_at(tc, step: int) -> float:
    """The learning rate ``tc``'s schedule gives update ``step`` (a Python float); ``ValueError``
    naming ``step`` unless it is an int >= 0 (the schedule would give -1 a zero LR, 2.5 a value
    between two updates)."""
    from ..utils import int_arg

    return float(make_schedule(tc)(int_arg("step", step, lo=0, where="lr_at")))


def decay_mask(logical_specs, abstract_params, no_decay=(), decay=()):
    """Boolean pytree: which parameters get weight decay (see module docstring); ``no_decay``:
    parameter names (a path's last key) never decayed (a config's ``no_weight_decay``);
    ``decay``: names always decayed, whatever their shape (``ModelConfig.weight_decay_names``).
    ``ValueError`` for a name in both, or a bare string (a tuple of names is expected)."""
    for what, names in (("no_decay", no_decay), ("decay", decay)):
        if isinstance(names, str):
            raise ValueError(f"decay_mask: {what} must be a tuple of parameter names, got the string "
                             f"{names!r} (write ({names!r},))")
    no_decay, decay = frozenset(no_decay), frozenset(decay)
    if no_decay & decay:
        raise ValueError(f"decay_mask: parameter name(s) {sorted(no_decay & decay)} are in both no_decay "
                         "and decay")

    def one(path, spec, leaf):
        last = path[-1] if path else None
        name = str(getattr(last, "key", getattr(last, "name", "")))
        if name in no_decay:
            return False
        if name in decay:
            return True
        if name == "bias":  # a linear layer's bias, however its output features are split (Mamba's
            return False    # in_proj bias [2, d_inner]: z and x halves): a vector, never decayed
        if isinstance(spec, PartitionSpec) and len(spec) == leaf.ndim:
            axes = [name for name in spec if name != LAYERS]
            if HEAD_DIM in axes and (HEADS in axes or KV_HEADS in axes):  # [H, Dh]: one feature axis split
                axes.remove(HEAD_DIM)  # per head (q/k/v biases, per-head q/k norm scales are vectors)
            return len(axes) >= 2
        return leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(one, logical_specs, abstract_params,
                                            is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))


def make_optimizer(tc, mask=None):
    """``(optax transformation, schedule)`` for a :class:`TrainConfig`.

    ``mask`` is the weight-decay mask (:func:`decay_mask`); ``None`` decays everything.
    """
    schedule = make_schedule(tc)
    parts = []
    if tc.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(tc.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(tc.beta1), b2=float(tc.beta2), eps=float(tc.eps),
                             weight_decay=float(tc.weight_decay), mask=mask))
    return optax.chain(*parts), schedule
