"""Train / eval step functions, and their jit-compiled, sharded form.

The step functions are pure and need nothing from :func:`~jaxformers.training.train`::

    import jax, optax, jaxformers as jf
    from jaxformers.training import get_loss, train_step, eval_step

    module = jf.build(jf.get_config("gpt", "tiny", vocab_size=257))
    params = jf.init_params(module, jax.random.PRNGKey(0))
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    batch = {"tokens": tokens}                       # int32 [B, T+1]; see losses.py for the keys
    step = jax.jit(lambda p, o, b, s, r: train_step(module, tx, get_loss("cross_entropy"), p, o, b, s, r))
    params, opt_state, metrics = step(params, opt_state, batch, 0, jax.random.PRNGKey(1))
    total, n = eval_step(module, get_loss("cross_entropy"), params, batch)   # mean = total / n

:class:`Program` is what the trainer runs: the same functions jitted with explicit
parameter / optimizer-state / batch shardings for a mesh, compiled ahead of time
(once per batch structure) under the logical axis rules.  :class:`CompileCache` is
an explicit, caller-owned cache of programs for processes that train or evaluate
many models (``train(..., cache=cache)``).
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from ..utils import int_arg
from . import mesh as mesh_lib
from .losses import (LossFn, aux_weight, collect_aux_losses, cross_entropy, merge_aux,
                     next_token_targets)

__all__ = [
    "CompileCache", "Program", "abstract_params", "compute_config", "eval_step", "loss_with_aux",
    "program_key", "resolve_dtype", "split_micro_batches", "train_step",
]


# ============================================================================ small helpers
def resolve_dtype(name: str) -> str:
    """Compute dtype for ``"auto"``: float32 on CPU, bfloat16 on GPU/TPU."""
    if name == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return name


def compute_config(model_config, dtype: str):
    """The model config the trainer builds: compute in ``dtype``, float32 parameters (the model
    config's own ``dtype`` / ``param_dtype`` are replaced: ``TrainConfig.dtype`` decides)."""
    return model_config.replace(dtype=dtype, param_dtype="float32")


def global_norm(tree) -> jax.Array:
    tree_lib = getattr(optax, "tree", None)
    if tree_lib is not None and hasattr(tree_lib, "norm"):
        return tree_lib.norm(tree)
    return optax.global_norm(tree)


def _init_tokens(module, rows: int = 1, length: int = 8):
    max_len = getattr(getattr(module, "config", None), "max_seq_len", length)
    return jnp.zeros((rows, min(length, max_len)), jnp.int32)


def abstract_params(module, rows: int = 1):
    """``(abstract params, logical PartitionSpecs)`` of ``module`` (no FLOPs, no memory)."""
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), _init_tokens(module, rows))
    return nn.unbox(boxed)["params"], nn.get_partition_spec(boxed)["params"]


# ============================================================================ pure step functions
def loss_with_aux(module, loss_fn: LossFn, params, batch, rng, aux_weights=None):
    """``(objective, metrics)``: the loss function's loss plus its weighted auxiliary losses.

    Every ``aux_losses`` that :func:`~jaxformers.training.losses.apply_model` produced
    inside ``loss_fn`` is summed by name and added as ``aux_weight(name) * value``
    (``aux_weights``: mapping or ``(name, weight)`` pairs, 1.0 for names not listed).
    ``metrics`` = the loss function's metrics + ``loss`` (its loss), ``aux/<name>``
    (unweighted) and, if there are auxiliary losses, ``total_loss`` (the objective).
    """
    with collect_aux_losses() as sink:
        loss, metrics = loss_fn(module, params, batch, rng)
    loss = jnp.asarray(loss, jnp.float32)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in dict(metrics).items()}
    aux = merge_aux(sink)
    total = loss
    for name in sorted(aux):
        weight = aux_weight(aux_weights, name)
        if not (isinstance(weight, (int, float)) and weight == 0):  # weight 0: logged only
            total = total + weight * aux[name]
        metrics[f"aux/{name}"] = aux[name]
    metrics["loss"] = loss
    if aux:
        metrics["total_loss"] = total
    return total, metrics


def split_micro_batches(batch, n: int, sharding=None):
    """``[B, ...]`` -> ``[n, B / n, ...]`` for every array of the batch dict.

    Micro-batch ``a`` holds rows ``a, a + n, a + 2n, ...``: with the batch sharded on its
    leading axis, every device keeps its own rows (no data movement) as long as each
    device's share is divisible by ``n``.  ``ValueError`` naming ``grad_accum`` unless ``n`` is an
    int >= 1 that divides every leading axis.
    """
    n = int_arg("grad_accum", n, lo=1, where="split_micro_batches")

    def one(x):
        if x.shape[0] % n:
            raise ValueError(f"grad_accum={n} must divide the batch's leading axis, got shape {x.shape}")
        micro = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return micro if sharding is None else jax.lax.with_sharding_constraint(micro, sharding)

    return jax.tree.map(one, batch)


def train_step(module, tx, loss_fn: LossFn, params, opt_state, batch, step, rng, *, grad_accum: int = 1,
               aux_weights=None, schedule: Optional[Callable] = None, micro_sharding=None):
    """One optimizer update: ``(params, opt_state, metrics)``.  Pure; jit it (or use :class:`Program`).

    ``batch``: a batch dict (every array ``[B, ...]``, see :mod:`.losses`); ``step``:
    the int32 update count (the learning rate and the per-step rng derive from it);
    ``rng``: a PRNG key (``fold_in(rng, step)`` is what the loss function sees, split per
    micro-batch) or ``None``.  ``grad_accum=A`` splits the batch into ``A`` micro-batches
    (:func:`split_micro_batches`) run one after another in a ``lax.scan``; the loss's
    gradients and metrics are averaged weighted by its ``n_targets`` metric (equal weights if it
    has none), the auxiliary losses (``aux/<name>``) with equal weights (a per-token mean sown by a
    module covers all the micro-batch's tokens, masked or not), so the update equals the one of
    the whole batch; a micro-batch with ``n_targets == 0`` contributes nothing, not even its
    auxiliary losses (its loss may be NaN).  Clipping (in ``tx``) sees the accumulated gradient.
    ``metrics``: scalars -- those of :func:`loss_with_aux`, ``grad_norm`` (before
    clipping) and ``lr`` (``schedule(step)``, when a schedule is given).
    """
    grad_accum = int_arg("grad_accum", grad_accum, lo=1, where="train_step")
    step = jnp.asarray(step, jnp.int32)
    rng = None if rng is None else jax.random.fold_in(rng, step)
    grad_fn = jax.value_and_grad(
        lambda p, b, r: loss_with_aux(module, loss_fn, p, b, r, aux_weights), has_aux=True)
    if grad_accum == 1:
        (_, metrics), grads = grad_fn(params, batch, rng)
    else:
        micro = split_micro_batches(batch, grad_accum, micro_sharding)
        keys = None if rng is None else jax.random.split(rng, grad_accum)
        first = jax.tree.map(lambda x: x[0], micro)
        (_, metric_shapes), _ = jax.eval_shape(grad_fn, params, first, None if keys is None else keys[0])
        weighted = "n_targets" in metric_shapes
        aux_scale = 1.0
        if weighted and "total_loss" in metric_shapes:
            # the auxiliary losses weigh sum(n_targets) / A' in each of the A' micro-batches with targets
            # (1 / A' once divided by sum(n_targets)): every micro-batch's n_targets first (they come
            # from the batch: the model is dead code in this pass)
            counts = jax.lax.map(lambda x: loss_with_aux(module, loss_fn, params, x[0], x[1], aux_weights)[1]
                                 ["n_targets"], (micro, keys))
            aux_scale = jnp.sum(counts) / jnp.maximum(jnp.sum(counts > 0), 1)

        def objective(p, b, r):
            total, m = loss_with_aux(module, loss_fn, p, b, r, aux_weights)
            if not weighted:
                return total, m
            w = jax.lax.stop_gradient(m["n_targets"])
            if "total_loss" not in m:  # no auxiliary losses
                return w * total, m
            return w * m["loss"] + aux_scale * (total - m["loss"]), m

        def body(carry, xs):
            g_sum, m_sum, w_sum = carry
            mb, key = xs
            (obj, m), g = jax.value_and_grad(objective, has_aux=True)(params, mb, key)
            w = m["n_targets"] if weighted else jnp.ones((), jnp.float32)
            # a micro-batch without targets adds nothing (not 0 * NaN from a 0/0 mean)
            keep = (lambda x: jnp.where(w > 0, x, 0.0)) if weighted else (lambda x: x)

            def share(k):  # metric k's term of the sum that is divided by sum(w) below
                if k == "n_targets" or not weighted:
                    return m[k]
                if k == "total_loss":
                    return keep(obj)
                return keep((aux_scale if k.startswith("aux/") else w) * m[k])

            g_sum = jax.tree.map(lambda s, x: s + keep(x), g_sum, g)
            m_sum = {k: m_sum[k] + share(k) for k in m_sum}
            return (g_sum, m_sum, w_sum + w), None

        zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros_m = {k: jnp.zeros(v.shape, jnp.float32) for k, v in metric_shapes.items()}
        xs = (micro, keys) if keys is not None else (micro, None)
        (g_sum, m_sum, w_sum), _ = jax.lax.scan(body, (zeros_g, zeros_m, jnp.zeros((), jnp.float32)), xs,
                                                length=grad_accum)
        denom = jnp.where(w_sum > 0, w_sum, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, params)
        metrics = {k: (v if k == "n_targets" else v / denom) for k, v in m_sum.items()}
    metrics = dict(metrics)
    metrics["grad_norm"] = global_norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(step), jnp.float32)
    return params, opt_state, metrics


def eval_step(module, loss_fn: LossFn, params, batch) -> Tuple[jax.Array, jax.Array]:
    """``(sum of loss, n_targets)`` for one batch: ``loss * n_targets`` and ``n_targets`` (the
    loss's metric, else the sum of the next-token weights), so that a dataset's mean loss is
    ``sum(totals) / sum(counts)`` however its batches are masked or padded.  No auxiliary
    losses; ``rng`` is ``None``."""
    loss, metrics = loss_fn(module, params, batch, None)
    n = metrics.get("n_targets") if isinstance(metrics, Mapping) else None
    if n is None:
        n = jnp.sum(next_token_targets(batch)[1])
    n = jnp.asarray(n, jnp.float32)
    # a batch of weight 0 adds nothing, even when the loss's mean over it is 0 / 0 = NaN
    return jnp.where(n > 0, jnp.asarray(loss, jnp.float32) * n, 0.0), n


# ============================================================================ compiled program
def _batch_signature(batch) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def _check_trainable(abstract_params) -> None:
    """``ValueError`` naming them when some parameters are not floating point (a QuaRot
    ``int_linears`` model's integer weights): training them failed inside ``jax.grad`` ("grad
    requires real- or complex-valued inputs")."""
    ints = [f"{jax.tree_util.keystr(k)} ({a.dtype})" for k, a in jax.tree_util.tree_leaves_with_path(abstract_params)
            if not jnp.issubdtype(a.dtype, jnp.inexact)]
    if ints:
        raise ValueError(f"{len(ints)} parameter(s) are not floating point, e.g. {', '.join(ints[:2])} "
                         "(quantized integer weights): they cannot be trained; train the float model and "
                         "quantize it after (e.g. a quarot config with int_linears=False)")


class Program:
    """The step functions of one module on one mesh: shardings, init, compiled train/eval steps.

    ``tx``/``schedule`` (from :func:`~jaxformers.training.make_optimizer`) are needed for
    training only.  Parameters are sharded by their logical axis names
    (:data:`jaxformers.sharding.DEFAULT_RULES`, indivisible dimensions kept whole), the
    optimizer state like the parameters, and every batch array on its leading axis over
    ``data x fsdp x expert``.  Steps are compiled ahead of time on first use for each batch
    structure (keys, shapes, dtypes) -- :meth:`compile_train_step` compiles explicitly.
    """

    def __init__(self, module, mesh, *, loss_fn: LossFn = cross_entropy, tx=None, schedule=None,
                 grad_accum: int = 1, aux_weights=None, step_fn: Optional[Callable] = None):
        self.module, self.mesh, self.loss_fn = module, mesh, loss_fn
        # step_fn: a replacement for train_step (same signature and keywords); if it has a
        # ``wrap_optimizer(tx)`` method, the optimizer it returns carries the step's own state
        # (e.g. DoGE's domain weights) in ``opt_state``: sharded, checkpointed and restored
        # with it.
        # If it has ``extra_inputs()`` -> ``(tree, logical PartitionSpecs)``, that tree (frozen
        # arrays, e.g. a distillation teacher's params) is placed once, sharded by its logical
        # axis names, and passed to every train step as ``extra=``.
        self.step_fn = train_step if step_fn is None else step_fn
        if tx is not None and hasattr(self.step_fn, "wrap_optimizer"):
            tx = self.step_fn.wrap_optimizer(tx)
        self.extra = self.extra_shardings = None
        self.tx, self.schedule, self.grad_accum = tx, schedule, int(grad_accum)
        self.aux_weights = tuple(sorted(dict(aux_weights or {}).items()))
        # Parameter creation runs without logical rules: flax's DenseGeneral reshapes boxed
        # kernels (unbox -> with_logical_constraint on the flat shape), which fails under rules.
        # Parameter shardings come from the jit out_shardings instead.
        self._tokens0 = _init_tokens(module, mesh_lib.batch_parallelism(mesh))
        self.abstract_params, self.logical_specs = abstract_params(module, self._tokens0.shape[0])
        wanted = mesh_lib.logical_to_sharding(self.logical_specs, mesh)
        self.param_shardings = mesh_lib.fit_shardings(wanted, self.abstract_params)
        # the parameter dimensions the rules would split but the mesh axes do not divide
        self.unfit_params = mesh_lib.unfit_report(wanted, self.abstract_params)
        self.replicated = mesh_lib.replicated(mesh)
        self.batch_sharding = mesh_lib.batch_sharding(mesh, None)  # leading axis of every array
        self.micro_sharding = NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES))
        self.abstract_opt = self.opt_shardings = None
        if tx is not None:
            _check_trainable(self.abstract_params)
            self.abstract_opt = jax.eval_shape(tx.init, self.abstract_params)
            self.opt_shardings = mesh_lib.fit_shardings(
                mesh_lib.opt_state_shardings(tx, self.abstract_opt, self.param_shardings, mesh),
                self.abstract_opt)
        self._compiled: Dict[Any, Any] = {}
        if hasattr(self.step_fn, "extra_inputs"):
            tree, specs = self.step_fn.extra_inputs()
            self.extra_shardings = mesh_lib.fit_shardings(mesh_lib.logical_to_sharding(specs, mesh), tree)
            self.extra = jax.device_put(tree, self.extra_shardings)

    # ------------------------------------------------------------------ abstract trees
    @staticmethod
    def with_shardings(tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    def abstract_state(self):
        """``(abstract params, abstract opt_state)`` with their shardings (restore targets)."""
        opt = None if self.tx is None else self.with_shardings(self.abstract_opt, self.opt_shardings)
        return self.with_shardings(self.abstract_params, self.param_shardings), opt

    def abstract_batch(self, batch):
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
                for k, v in batch.items()}

    def compile(self, jitted, args):
        """Lower + compile under the mesh and the logical axis rules (activation constraints on)."""
        with mesh_lib.activate(self.mesh):
            return jitted.lower(*args).compile()

    # ------------------------------------------------------------------ init
    def init(self, seed: int):
        """Freshly initialised ``(params, opt_state)`` (``opt_state`` None without ``tx``),
        created directly with their shardings."""
        if "init" not in self._compiled:
            module, tx, tokens0 = self.module, self.tx, self._tokens0

            def init_fn(rng):
                params = nn.unbox(module.init(rng, tokens0))["params"]
                return params, (None if tx is None else tx.init(params))

            fn = jax.jit(init_fn, out_shardings=(self.param_shardings, self.opt_shardings))
            key = jax.random.PRNGKey(0)
            with mesh_lib.use_mesh(self.mesh):  # no logical rules here: see __init__
                self._compiled["init"] = fn.lower(jax.ShapeDtypeStruct(key.shape, key.dtype)).compile()
        return self._compiled["init"](jax.random.PRNGKey(seed))

    def init_opt_state(self, params):
        """A fresh optimizer state for ``params`` (placed with :attr:`param_shardings`), sharded
        like :meth:`init`'s (fine-tuning from given parameters)."""
        if self.tx is None:
            raise ValueError("this Program has no optimizer (tx=None): it can only evaluate")
        fn = jax.jit(self.tx.init, in_shardings=(self.param_shardings,), out_shardings=self.opt_shardings)
        with mesh_lib.use_mesh(self.mesh):
            return fn(params)

    def check_params(self, params, what: str = "params") -> None:
        """``ValueError`` (naming ``what``) unless ``params`` have exactly this module's parameter
        tree and shapes."""
        want = jax.tree_util.tree_structure(self.abstract_params)
        got = jax.tree_util.tree_structure(params)
        if want != got:
            raise ValueError(f"{what} do not match the model's parameter tree:\n  model: {want}\n  given: {got}")
        bad = [f"{jax.tree_util.keystr(path)}: model {a.shape}, given {np.shape(p)}"
               for (path, a), p in zip(jax.tree_util.tree_leaves_with_path(self.abstract_params),
                                       jax.tree.leaves(params)) if tuple(a.shape) != tuple(np.shape(p))]
        if bad:
            raise ValueError(f"{what} have the wrong shapes: " + "; ".join(bad[:5]))

    def init_from(self, params):
        """``(params, fresh opt_state)`` starting from given ``params`` (converted or pretrained
        weights of exactly this module's tree), placed with the parameter shardings.  Always a copy
        on the devices: :meth:`train_step` donates the arrays it is given, and ``params`` stay the
        caller's (``device_put`` may return a jax array's own buffer, on one device or on every
        device of a replicated sharding, even with ``may_alias=False``: the first step deleted it,
        and ``train(..., init_params=p)`` left ``p`` deleted).  Host (numpy) params go to the
        devices straight from the host, each device receiving its shard (no whole copy on one
        device, no second on-device copy)."""
        self.check_params(params, "init params")
        on_device = any(isinstance(p, jax.Array) for p in jax.tree.leaves(params))

        def cast(a, p):  # host arrays stay on the host: device_put sends each device its shard only
            # (through jnp.asarray the whole tree would first land on one device)
            if isinstance(p, jax.Array):
                return p if p.dtype == a.dtype else p.astype(a.dtype)
            return np.asarray(p, a.dtype)

        params = jax.device_put(jax.tree.map(cast, self.abstract_params, params), self.param_shardings)
        if on_device:  # device_put may have kept the caller's buffers: copy them (see above)
            copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), in_shardings=(self.param_shardings,),
                           out_shardings=self.param_shardings)
            with mesh_lib.use_mesh(self.mesh):
                params = copy(params)
        return params, (None if self.tx is None else self.init_opt_state(params))

    # ------------------------------------------------------------------ train step
    def compile_train_step(self, batch):
        """The compiled train step for batches shaped like ``batch`` (arrays or ShapeDtypeStructs)."""
        if self.tx is None:
            raise ValueError("this Program has no optimizer (tx=None): it can only evaluate")
        key = ("train", _batch_signature(batch))
        if key not in self._compiled:
            module, tx, loss_fn, update = self.module, self.tx, self.loss_fn, self.step_fn
            kw = dict(grad_accum=self.grad_accum, aux_weights=self.aux_weights, schedule=self.schedule,
                      micro_sharding=self.micro_sharding)

            def step_fn(params, opt_state, batch, step, rng, extra):
                more = {} if extra is None else {"extra": extra}
                return update(module, tx, loss_fn, params, opt_state, batch, step, rng, **kw, **more)

            jitted = jax.jit(
                step_fn,
                in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding,
                              self.replicated, self.replicated, self.extra_shardings),
                out_shardings=(self.param_shardings, self.opt_shardings, self.replicated),
                donate_argnums=(0, 1))
            rng = jax.random.PRNGKey(0)
            params, opt = self.abstract_state()
            extra = None if self.extra is None else self.with_shardings(self.extra, self.extra_shardings)
            args = (params, opt, self.abstract_batch(batch),
                    jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated),
                    jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=self.replicated), extra)
            self._compiled[key] = self.compile(jitted, args)
        return self._compiled[key]

    def train_step(self, params, opt_state, batch, step, rng):
        """``(params, opt_state, metrics)``; ``batch`` as placed by :meth:`put_batch`; donates
        ``params`` and ``opt_state``."""
        fn = self.compile_train_step(batch)
        return fn(params, opt_state, batch, jnp.asarray(step, jnp.int32), rng, self.extra)

    # ------------------------------------------------------------------ eval step
    def eval_step(self, params, batch):
        """``(sum of loss, n_targets)`` (replicated scalars), see :func:`eval_step`."""
        key = ("eval", _batch_signature(batch))
        if key not in self._compiled:
            module, loss_fn = self.module, self.loss_fn
            jitted = jax.jit(lambda p, b: eval_step(module, loss_fn, p, b),
                             in_shardings=(self.param_shardings, self.batch_sharding),
                             out_shardings=(self.replicated, self.replicated))
            args = (self.with_shardings(self.abstract_params, self.param_shardings),
                    self.abstract_batch(batch))
            self._compiled[key] = self.compile(jitted, args)
        return self._compiled[key](params, batch)

    # ------------------------------------------------------------------ data placement
    def put_batch(self, local: Mapping[str, np.ndarray], global_rows: int) -> Dict[str, jax.Array]:
        """This process's rows of every batch array -> global arrays sharded on the leading axis
        (over the mesh's batch axes, :data:`~jaxformers.training.mesh.BATCH_AXES`); ``ValueError``
        unless ``global_rows`` is a positive int those axes divide."""
        global_rows = int_arg("global_rows", global_rows, lo=1, where="Program.put_batch")
        ways = mesh_lib.batch_parallelism(self.mesh)
        if global_rows % ways:
            sizes = ", ".join(f"{a}={self.mesh.shape[a]}" for a in mesh_lib.BATCH_AXES)
            raise ValueError(f"Program.put_batch: global_rows={global_rows} is not divisible by the mesh's "
                             f"batch axes ({sizes}: {ways} ways); give a multiple of {ways}")
        return {k: jax.make_array_from_process_local_data(
                    self.batch_sharding, np.ascontiguousarray(v), (global_rows, *np.shape(v)[1:]))
                for k, v in local.items()}


# ============================================================================ explicit compile cache
def program_key(model_config, mesh, train_config=None, loss_fn=None, step_fn=None) -> tuple:
    """What determines a :class:`Program` built by the trainer: the compute model config, the
    mesh, the loss function, and for training the optimizer fields, ``grad_accum``, the
    auxiliary-loss weights and the step function (not paths, seeds, data or intervals)."""
    from .optim import optimizer_key

    train_part = None
    if train_config is not None:
        train_part = (optimizer_key(train_config), train_config.grad_accum, train_config.aux_loss_weights,
                      step_fn)
    return (model_config, mesh, loss_fn, train_part)


class CompileCache:
    """A caller-owned cache of :class:`Program` s (with their compiled steps).

    ``train(..., cache=cache)`` / ``evaluate(..., cache=cache)`` reuse the program of an
    earlier call whose :func:`program_key` is equal, skipping the compilation.  Keeps the
    ``max_entries`` most recently used programs.  Nothing is cached unless a cache is
    passed.
    """

    def __init__(self, max_entries: int = 4):
        self.max_entries = int_arg("max_entries", max_entries, lo=1, where="CompileCache")
        self._entries: "collections.OrderedDict[Any, Program]" = collections.OrderedDict()
        self.hits = self.misses = 0

    def get(self, key, build: Callable[[], Program]) -> Program:
        """The program stored under ``key``, or ``build()`` stored under it."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        program = build()
        self._entries[key] = program
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return program

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"CompileCache({len(self)}/{self.max_entries} programs, hits={self.hits}, "
                f"misses={self.misses})")
