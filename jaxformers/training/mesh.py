"""Device meshes, logical->mesh shardings and multi-host start-up.

The mesh always has the four axes of :data:`jaxformers.sharding.MESH_AXES`:
``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and
optimizer state sharded over ``embed``), ``expert`` (expert parallelism for
mixture-of-experts parameters; data parallelism for everything else) and
``tensor`` (Megatron-style model parallelism over heads / MLP / vocab).
``--mesh "data=2,fsdp=2,tensor=2"`` gives their sizes; a missing axis has size 1;
``None`` puts every device on ``data``.  The product must equal the global
device count.

Parameters carry logical axis names (``nn.LogicallyPartitioned``); the rules in
:data:`jaxformers.sharding.DEFAULT_RULES` map them onto the mesh.  Batches are
sharded on their leading axis over :data:`BATCH_AXES` = ``("data", "fsdp",
"expert")``, so the global batch (per micro-batch) must be divisible by
``data * fsdp * expert`` (:func:`batch_parallelism`).

Activation constraints inside the model (``nn.with_logical_constraint``) only
take effect while a mesh *and* axis rules are active during tracing; use
:func:`activate` (``with activate(mesh): ...``) around everything that traces
model code.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, Optional

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from ..sharding import BATCH_MESH_AXES, DEFAULT_RULES, MESH_AXES

log = logging.getLogger(__name__)

BATCH_AXES = BATCH_MESH_AXES  # ("data", "fsdp", "expert")


def parse_mesh(spec: Optional[str]) -> Dict[str, int]:
    """``"data=2,expert=2,tensor=2"`` -> ``{"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}`` (missing axes = 1).

    ``None``/``""`` -> ``{}`` (meaning: everything on ``data``).  Raises
    ``ValueError`` for unknown axes, repeated axes, or sizes that are not
    positive integers.
    """
    if spec is None or not str(spec).strip():
        return {}
    sizes: Dict[str, int] = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(
                f"mesh={spec!r}: bad entry {part!r}; expected AXIS=SIZE with AXIS one of {list(MESH_AXES)}, "
                "e.g. 'data=2,fsdp=2,tensor=2' or 'data=2,expert=2,tensor=2'")
        if name in sizes:
            raise ValueError(f"mesh={spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(f"mesh={spec!r}: size of {name!r} must be a positive int, got {value.strip()!r}")
        sizes[name] = size
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def mesh_shape(spec: Optional[str], n_devices: int) -> Dict[str, int]:
    """Axis sizes for ``spec`` on ``n_devices`` devices (ValueError if the product differs)."""
    sizes = parse_mesh(spec)
    if not sizes:
        return {axis: (n_devices if axis == "data" else 1) for axis in MESH_AXES}
    product = int(np.prod(list(sizes.values())))
    if product != n_devices:
        raise ValueError(
            f"mesh={spec!r} has {product} devices ({'*'.join(MESH_AXES)}) but {n_devices} are available; "
            f"the product of the axis sizes must equal the device count")
    return sizes


def make_mesh(spec: Optional[str] = None, devices=None) -> jax.sharding.Mesh:
    """A ``Mesh`` over :data:`MESH_AXES` (data, fsdp, expert, tensor) with Auto axis types
    (GSPMD-style partitioning)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:  # topology-aware ordering where jax knows the hardware (TPU/GPU slices)
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - e.g. CPU or an unusual device count: plain order
        grid = np.asarray(devices, dtype=object).reshape(shape)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        try:
            return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(axis_type.Auto,) * len(MESH_AXES))
        except TypeError:
            pass
    return jax.sharding.Mesh(grid, MESH_AXES)


def describe(mesh: jax.sharding.Mesh) -> str:
    return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh):
    """Make ``mesh`` the ambient mesh, with whichever API this jax version has.

    jax >= 0.7: ``jax.set_mesh``; some versions: ``jax.sharding.use_mesh``; old
    versions: ``with mesh:`` (flax looks the mesh up through
    ``jax.sharding.get_abstract_mesh()``, which the first two set).
    """
    if hasattr(jax, "set_mesh"):
        with jax.set_mesh(mesh):
            yield mesh
    elif hasattr(jax.sharding, "use_mesh"):
        with jax.sharding.use_mesh(mesh):
            yield mesh
    else:  # pragma: no cover - old jax
        with mesh:
            yield mesh


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """Mesh + logical axis rules: turns the model's activation constraints on."""
    with use_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def logical_to_sharding(logical_specs, mesh, rules=DEFAULT_RULES):
    """Pytree of logical ``PartitionSpec``s -> pytree of ``NamedSharding``s.

    Leaves without logical names (``None`` or an empty spec) are replicated.
    """
    def one(spec):
        if spec is None:
            return NamedSharding(mesh, P())
        return nn.logical_to_mesh_sharding(spec, mesh, rules)

    return jax.tree.map(one, logical_specs, is_leaf=lambda x: x is None or isinstance(x, P))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over :data:`BATCH_AXES` (``data``, ``fsdp``, ``expert``), the rest
    replicated.  ``ndim=None``: a spec of the leading axis only, valid for arrays of any rank
    >= 1 (e.g. every array of a batch dict)."""
    if ndim is None:
        return NamedSharding(mesh, P(BATCH_AXES))
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_parallelism(mesh) -> int:
    """How many ways a batch is split: ``data * fsdp * expert``."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def opt_state_shardings(tx, abstract_opt_state, param_shardings, mesh):
    """Optimizer-state shardings: parameter-shaped leaves (Adam moments, ...) follow the
    parameters' shardings; everything else (step counters) is replicated."""
    import optax

    return optax.tree_map_params(
        tx, lambda _leaf, sharding: sharding, abstract_opt_state, param_shardings,
        transform_non_params=lambda _leaf: replicated(mesh))


# ----------------------------------------------------------------------------- multi-host
_MULTI_HOST_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # generic: set with JAX_NUM_PROCESSES / JAX_PROCESS_ID
    "COORDINATOR_ADDRESS",
)


def _multi_host_reason() -> Optional[str]:
    env = os.environ
    for name in _MULTI_HOST_ENV:
        if env.get(name):
            return name
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return "SLURM_NTASKS>1"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "OMPI_COMM_WORLD_SIZE>1"
    # Multi-host Cloud TPU slices: the TPU runtime lists every worker.
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if hosts and len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "TPU_WORKER_HOSTNAMES"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "MEGASCALE_COORDINATOR_ADDRESS"
    return None


_INITIALIZED = False


def maybe_initialize_distributed(force: Optional[bool] = None) -> bool:
    """Call ``jax.distributed.initialize()`` when the environment says multi-host.

    Multi-host is detected from (any of): ``JAX_COORDINATOR_ADDRESS`` (with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; jax reads them itself),
    ``COORDINATOR_ADDRESS``, a SLURM job with ``SLURM_NTASKS > 1``, an Open MPI
    launch with ``OMPI_COMM_WORLD_SIZE > 1``, or a multi-host Cloud TPU slice
    (``TPU_WORKER_HOSTNAMES`` lists more than one worker).  On SLURM / TPU / MPI
    ``jax.distributed.initialize()`` finds the coordinator and process ids by
    itself.  Set ``JAXFORMERS_DISTRIBUTED=0`` to skip, ``=1`` to force.  Must run
    before anything touches the devices; returns whether it initialized.
    """
    global _INITIALIZED
    if _INITIALIZED:
        return True
    if force is None:
        flag = os.environ.get("JAXFORMERS_DISTRIBUTED", "").strip().lower()
        force = {"1": True, "true": True, "0": False, "false": False}.get(flag)
    reason = "JAXFORMERS_DISTRIBUTED=1" if force else (None if force is False else _multi_host_reason())
    if reason is None:
        return False
    kwargs = {}
    if os.environ.get("COORDINATOR_ADDRESS") and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["COORDINATOR_ADDRESS"]
        if os.environ.get("NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["NUM_PROCESSES"])
        if os.environ.get("PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["PROCESS_ID"])
    log.info("multi-host environment detected (%s): calling jax.distributed.initialize()", reason)
    jax.distributed.initialize(**kwargs)
    _INITIALIZED = True
    return True


def fit_sharding(sharding: NamedSharding, shape) -> NamedSharding:
    """Drop mesh axes from dimensions they do not divide (those dimensions are replicated).

    e.g. a byte-level vocabulary of 257 cannot be split over ``tensor=2``; jit
    refuses indivisible argument/output shardings, so such a dimension is kept whole.
    """
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    changed = False
    for dim, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        kept = []
        for name in names:  # keep the longest prefix whose product divides the dimension
            size = int(np.prod([sharding.mesh.shape[n] for n in kept + [name]]))
            if shape[dim] % size:
                break
            kept.append(name)
        if len(kept) != len(names):
            changed = True
            spec[dim] = None if not kept else (kept[0] if len(kept) == 1 else tuple(kept))
    if not changed:
        return sharding
    return NamedSharding(sharding.mesh, P(*spec))


def fit_shardings(shardings, abstract):
    """:func:`fit_sharding` over matching pytrees of shardings and arrays/ShapeDtypeStructs."""
    return jax.tree.map(lambda s, a: fit_sharding(s, a.shape), shardings, abstract,
                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
