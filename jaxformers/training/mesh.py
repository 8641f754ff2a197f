"""Device meshes, logical->mesh shardings and multi-host start-up.

The mesh always has the four axes of :data:`jaxformers.sharding.MESH_AXES`:
``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and
optimizer state sharded over ``embed``), ``expert`` (expert parallelism for
mixture-of-experts parameters; data parallelism for everything else) and
``tensor`` (Megatron-style model parallelism over heads / MLP / vocab).
``--mesh "data=2,fsdp=2,tensor=2"`` gives their sizes; a missing axis has size 1;
``None`` (or a blank spec) puts every device on ``data``.  The product must equal the global
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
from typing import Dict, Optional, Tuple

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels._common import check_flag

from ..sharding import BATCH_MESH_AXES, DEFAULT_RULES, MESH_AXES, dividing_prefix, unknown_names
from ..utils import plain_int

log = logging.getLogger(__name__)

BATCH_AXES = BATCH_MESH_AXES  # ("data", "fsdp", "expert")


def parse_mesh(spec: Optional[str]) -> Dict[str, int]:
    """``"data=2,expert=2,tensor=2"`` -> ``{"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}`` (missing axes = 1).

    ``None`` or a blank spec (``""``, ``" "``) -> ``{}`` (meaning: everything on ``data``).  One axis may be ``-1``
    (``"data=-1,tensor=2"``, as MaxText's ``-1``): it takes the devices the other axes leave,
    resolved by :func:`mesh_shape` (kept as ``-1`` here).  Raises ``ValueError`` for unknown
    axes, repeated axes, sizes that are neither positive integers nor ``-1``, ``-1`` on more
    than one axis, or a spec of separators only (``","``).
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
        digits = value.strip()
        # ASCII digits only: int() would also take "1_6" (16), "+2" and non-ASCII digits
        size = -1 if digits == "-1" else (plain_int(digits) or 0)
        if size == 0:
            raise ValueError(f"mesh={spec!r}: size of {name!r} must be a positive int (or -1: the devices "
                             f"the other axes leave), got {value.strip()!r}")
        if size == -1 and -1 in sizes.values():
            raise ValueError(f"mesh={spec!r}: only one axis may be -1 (it takes the devices the others leave)")
        sizes[name] = size
    if not sizes:  # e.g. "," -- not the same as None (every device on data)
        raise ValueError(f"mesh={spec!r} names no axis; expected AXIS=SIZE entries with AXIS one of "
                         f"{list(MESH_AXES)}, e.g. 'data=2,fsdp=2,tensor=2' (or no mesh: every device on "
                         "data)")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def mesh_shape(spec: Optional[str], n_devices: int) -> Dict[str, int]:
    """Axis sizes for ``spec`` on ``n_devices`` devices (ValueError if the product differs); an
    axis given as ``-1`` takes ``n_devices`` over the product of the others (ValueError if that
    product does not divide ``n_devices``)."""
    sizes = parse_mesh(spec)
    if not sizes:
        return {axis: (n_devices if axis == "data" else 1) for axis in MESH_AXES}
    fill = [axis for axis, size in sizes.items() if size == -1]
    if fill:
        others = int(np.prod([size for size in sizes.values() if size != -1]))
        if n_devices % others:
            raise ValueError(
                f"mesh={spec!r}: the axes other than {fill[0]!r} take {others} devices, which does not divide "
                f"the {n_devices} available, so {fill[0]}=-1 has no size")
        sizes = dict(sizes, **{fill[0]: n_devices // others})
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
    if not devices:  # was a mesh of size 0 (spec None or data=-1): an IndexError when an array is put on it
        raise ValueError(f"make_mesh: devices is empty; give the devices of the mesh (default: "
                         f"jax.devices()), mesh={spec!r}")
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

    Leaves without logical names (``None`` or an empty spec) are replicated.  ``ValueError``
    naming the leaf for a logical name that no rule covers (flax would replicate that dimension
    silently; a ``(name, None)`` rule asks for replication), or for a name inside a tuple
    dimension (mesh axes as they stand) that is not a mesh axis of the rules.
    """
    def one(path, spec):
        if spec is None:
            return NamedSharding(mesh, P())
        where = jax.tree_util.keystr(path) or "spec"
        try:
            unknown = unknown_names(spec, rules)
        except ValueError as e:  # an entry that is not a name, or a bare mesh axis: name the leaf
            raise ValueError(f"{where}: {e}") from None
        if unknown:
            raise ValueError(f"{where} {spec}: logical axis name(s) "
                             f"{list(unknown)} have no rule (inside a tuple: are not mesh axes of the rules); "
                             f"known: {sorted({n for n, _ in rules})}")
        return nn.logical_to_mesh_sharding(spec, mesh, rules)

    return jax.tree_util.tree_map_with_path(one, logical_specs,
                                            is_leaf=lambda x: x is None or isinstance(x, P))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over :data:`BATCH_AXES` (``data``, ``fsdp``, ``expert``), the rest
    replicated.  ``ndim=None``: a spec of the leading axis only, valid for arrays of any rank
    >= 1 (e.g. every array of a batch dict).  ``ValueError`` for an ``ndim`` that is not a
    positive int (a scalar has no batch axis to split)."""
    if ndim is None:
        return NamedSharding(mesh, P(BATCH_AXES))
    if isinstance(ndim, bool) or not isinstance(ndim, (int, np.integer)) or ndim < 1:
        raise ValueError(f"batch_sharding: ndim must be a positive int (the rank of the batch arrays, "
                         f"whose leading axis is split) or None (any rank >= 1), got {ndim!r}")
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
# Launches that start several processes, and what ``jax.distributed.initialize`` is given:
#
# * ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (jax itself reads
#   only the address; we read all three and pass them explicitly);
# * ``COORDINATOR_ADDRESS`` + ``NUM_PROCESSES`` + ``PROCESS_ID`` (this project's names; the
#   ``JAX_`` names win where both are set);
# * SLURM (``srun``): jax reads ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``,
#   ``SLURM_PROCID`` and ``SLURM_LOCALID`` (``JAX_COORDINATOR_PORT`` overrides the port it
#   derives from the job id);
# * Open MPI (``mpirun``): jax reads ``OMPI_MCA_orte_hnp_uri`` (the coordinator's host),
#   ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_RANK`` and ``OMPI_COMM_WORLD_LOCAL_RANK``;
# * a multi-worker Cloud TPU slice: the TPU runtime's variables (``TPU_WORKER_HOSTNAMES``, ...).
#
# ``JAXFORMERS_HEARTBEAT_TIMEOUT`` (seconds, jax's default 100) bounds how long the surviving
# processes wait after one died before they stop; ``JAXFORMERS_INIT_TIMEOUT`` (seconds, default
# 300) how long a process waits for the others to connect.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI_VARS = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"


def _env_int(env, name: str, minimum: int = 0) -> int:
    """``env[name]`` as an int >= ``minimum``: plain ASCII digits only (``int()`` also read
    ``"1_6"`` as 16, ``"+2"`` and non-ASCII digits); ``ValueError`` naming the variable."""
    value = env[name].strip()
    number = plain_int(value)
    if number is None or number < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum} (plain digits)")
    return number


def _first_set(env, *names) -> Optional[str]:
    return next((n for n in names if env.get(n, "").strip()), None)


def _explicit_launch(env, coordinator: Optional[str]) -> Optional[Dict[str, object]]:
    """``coordinator_address`` / ``num_processes`` / ``process_id`` from the ``JAX_`` or the project's
    variables; ``None`` when neither names a process count or id.  ``ValueError`` (naming the
    variable) when the launch is half-configured."""
    num_var = _first_set(env, "JAX_NUM_PROCESSES", "NUM_PROCESSES")
    pid_var = _first_set(env, "JAX_PROCESS_ID", "PROCESS_ID")
    jax_style = coordinator == "JAX_COORDINATOR_ADDRESS" or (num_var or "").startswith("JAX_") or \
        (pid_var or "").startswith("JAX_")
    prefix = "JAX_" if jax_style else ""
    if coordinator is None:
        # the JAX_ names are unambiguous; the project's generic names only count together
        if any(env.get(n, "").strip() for n in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
            raise ValueError(
                f"{num_var or pid_var} is set but JAX_COORDINATOR_ADDRESS is not: set it to host:port of "
                "process 0 (the same value on every process)")
        return None
    kwargs: Dict[str, object] = {"coordinator_address": env[coordinator].strip()}
    # a port that is not a number (or none: "host:") aborted every process after the init timeout
    host, _, port = str(kwargs["coordinator_address"]).rpartition(":")
    if not host or not 0 < (plain_int(port) or 0) < 65536:
        raise ValueError(f"{coordinator}={kwargs['coordinator_address']!r} must be host:port "
                         "(port 1..65535, e.g. 10.0.0.1:1234)")
    if num_var is None or pid_var is None:
        if _cluster_launch(env) is not None:  # SLURM / Open MPI / TPU fill in the rest
            return {**kwargs, **({"num_processes": _env_int(env, num_var, 1)} if num_var else {}),
                    **({"process_id": _env_int(env, pid_var)} if pid_var else {})}
        missing = [f"{prefix}NUM_PROCESSES" if num_var is None else None,
                   f"{prefix}PROCESS_ID" if pid_var is None else None]
        raise ValueError(f"{coordinator} is set but {' and '.join(m for m in missing if m)} "
                         f"{'is' if None in missing else 'are'} not: every process needs the process "
                         f"count ({prefix}NUM_PROCESSES, the same on all) and its own id "
                         f"({prefix}PROCESS_ID, 0 .. count-1)")
    kwargs["num_processes"] = _env_int(env, num_var, 1)
    kwargs["process_id"] = _env_int(env, pid_var)
    if not kwargs["process_id"] < kwargs["num_processes"]:
        raise ValueError(f"{pid_var}={kwargs['process_id']} must be smaller than "
                         f"{num_var}={kwargs['num_processes']}")
    return kwargs


def _cluster_launch(env) -> Optional[str]:
    """The cluster launcher jax can read the layout from (``slurm``, ``ompi``, ``tpu``) or ``None``;
    ``ValueError`` naming the missing variables of a half-visible SLURM / Open MPI launch."""
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS", "").strip() and _env_int(env, "SLURM_NTASKS", 1) > 1:
        missing = [v for v in _SLURM_VARS if not env.get(v, "").strip()]
        if missing:
            raise ValueError(
                f"SLURM job with SLURM_NTASKS={env['SLURM_NTASKS']} but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set: start one process per task with "
                "`srun python -m experiments.train ...` (inside sbatch), or set JAX_COORDINATOR_ADDRESS, "
                "JAX_NUM_PROCESSES and JAX_PROCESS_ID")
        return "slurm"
    if env.get("OMPI_COMM_WORLD_SIZE", "").strip() and _env_int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        missing = [v for v in _OMPI_VARS if not env.get(v, "").strip()]
        if not env.get(_OMPI_URI) and not env.get("JAX_COORDINATOR_ADDRESS") \
                and not env.get("COORDINATOR_ADDRESS"):
            missing.insert(0, f"{_OMPI_URI} (or JAX_COORDINATOR_ADDRESS)")
        if missing:
            raise ValueError(
                f"Open MPI launch with OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']} but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: start with "
                "`mpirun -np N python -m experiments.train ...` (Open MPI 4 sets them; with Open MPI 5 "
                "set JAX_COORDINATOR_ADDRESS=host-of-rank-0:port)")
        return "ompi"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if (hosts and len([h for h in hosts.split(",") if h.strip()]) > 1) or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def distributed_settings(env=None) -> Optional[Tuple[str, Dict[str, object]]]:
    """``(reason, kwargs for jax.distributed.initialize)`` when ``env`` (default ``os.environ``)
    describes a multi-process launch, else ``None``.

    Raises ``ValueError`` naming the variable when a launch is half-configured (a coordinator
    without process count or id, an id without coordinator, a SLURM job outside ``srun``,
    non-integers, ``id >= count``).  ``JAXFORMERS_DISTRIBUTED=0`` skips, ``=1`` forces
    (then jax looks for the layout itself).
    """
    env = os.environ if env is None else env
    flag = env.get("JAXFORMERS_DISTRIBUTED", "").strip().lower()
    force = {"1": True, "true": True, "0": False, "false": False, "": None}.get(flag, "bad")
    if force == "bad":
        raise ValueError(f"JAXFORMERS_DISTRIBUTED={env['JAXFORMERS_DISTRIBUTED']!r} must be 0 or 1")
    if force is False:
        return None
    kwargs: Dict[str, object] = {}
    for var, key in (("JAXFORMERS_HEARTBEAT_TIMEOUT", "heartbeat_timeout_seconds"),
                     ("JAXFORMERS_INIT_TIMEOUT", "initialization_timeout")):
        if env.get(var, "").strip():
            kwargs[key] = _env_int(env, var, 1)
    coordinator = _first_set(env, "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
    explicit = _explicit_launch(env, coordinator)
    if explicit is not None:
        return coordinator, {**explicit, **kwargs}
    cluster = _cluster_launch(env)
    if cluster is not None:
        return cluster, kwargs
    if force:
        return "JAXFORMERS_DISTRIBUTED=1", kwargs
    return None


_INITIALIZED = False


def maybe_initialize_distributed(force: Optional[bool] = None) -> bool:
    """Call ``jax.distributed.initialize`` when the environment describes a multi-process launch.

    Launches (see :func:`distributed_settings`): ``JAX_COORDINATOR_ADDRESS`` +
    ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``; the same without the ``JAX_`` prefix; SLURM
    (``srun``, more than one task); Open MPI (``mpirun``); a multi-worker Cloud TPU slice.
    ``JAXFORMERS_DISTRIBUTED=0`` skips, ``=1`` forces (``force`` overrides it);
    ``JAXFORMERS_HEARTBEAT_TIMEOUT`` / ``JAXFORMERS_INIT_TIMEOUT`` (seconds) bound how long a
    process waits for a dead / a missing peer.  Must run before anything touches the devices;
    returns whether jax runs distributed.  ``ValueError`` (naming the variable) for a
    half-configured launch.  A ``jax.distributed.initialize`` the caller ran already (its own
    arguments, no launch variables needed) is taken as is: ``True``, the launch variables (and
    ``force``) then not read at all.
    """
    global _INITIALIZED
    if force is not None:  # a string "no" would force by truthiness
        force = check_flag("maybe_initialize_distributed: force (None: JAXFORMERS_DISTRIBUTED decides)",
                           force)
    if _INITIALIZED:
        return True
    if jax.distributed.is_initialized():  # the caller did it already (with or without a launch env)
        _INITIALIZED = True
        _no_compile_cache_on_cpu()
        return True
    env = dict(os.environ)
    if force is not None:
        env["JAXFORMERS_DISTRIBUTED"] = "1" if force else "0"
    settings = distributed_settings(env)
    if settings is None:
        return False
    reason, kwargs = settings
    log.info("multi-process launch (%s): jax.distributed.initialize(%s)", reason,
             ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
    jax.distributed.initialize(**kwargs)
    _INITIALIZED = True
    log.info("process %d of %d (%d local devices, %d in all)", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    _no_compile_cache_on_cpu()
    return True


def _no_compile_cache_on_cpu() -> bool:
    """Turn jax's persistent compilation cache off in a multi-process run on CPU.

    With gloo collectives, a program that one process loads from the cache and another compiles
    (jax writes the cache from process 0 only) waits forever in its first all-reduce: seen on
    jax 0.12.1 (0.10.2 runs), no error, no timeout.  On CPU the cache saves seconds, so it is
    off there on every jax version.  Returns whether it was on.  Must run before the first compile
    (jax reads the setting once).
    """
    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return False
    if not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir):
        return False
    jax.config.update("jax_enable_compilation_cache", False)
    if jax.process_index() == 0:
        log.warning("the persistent compilation cache (%s) is off: several processes on CPU hang in their "
                    "collectives when one of them loads a program from it", jax.config.jax_compilation_cache_dir)
    return True


def process_rows(mesh, global_rows: int) -> Tuple[int, int]:
    """``(block, n_blocks)``: this process holds rows ``[block * global_rows / n_blocks, (block + 1) *
    global_rows / n_blocks)`` of a batch sharded by :func:`batch_sharding` over ``mesh``.

    One process: ``(0, 1)``.  Processes whose devices hold the same rows (the batch axes do not
    span processes, e.g. ``tensor`` across hosts) share a block.  ``ValueError`` if the rows of a
    process are not one contiguous block (an unusual device order).
    """
    if jax.process_count() == 1:
        return 0, 1
    sharding = batch_sharding(mesh, ndim=1)
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_rows,)).values():
        rows.update(range(*index[0].indices(global_rows)))
    lo, hi = min(rows), max(rows) + 1
    size = hi - lo
    if len(rows) != size or global_rows % size or lo % size:
        raise ValueError(
            f"mesh {describe(mesh)}: the devices of process {jax.process_index()} hold rows "
            f"{sorted(rows)} of a batch of {global_rows}, not one contiguous block; choose a mesh whose "
            "batch axes (data, fsdp, expert) split the processes evenly")
    return lo // size, global_rows // size


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
        kept = dividing_prefix(names, shape[dim], sharding.mesh.shape)
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


def unfit_report(shardings, abstract, max_items: int = 4) -> Optional[Tuple[str, float]]:
    """``(line, share)`` on the arrays of ``abstract`` that ``shardings`` (from the logical
    rules, before :func:`fit_sharding`) would split over mesh axes not dividing a dimension.

    ``line`` names them (e.g. ``embed/embedding dim 0 (257) over tensor=2``) and their bytes;
    ``share`` is their fraction of all the bytes of ``abstract``; ``None`` when every rule
    fits.  Such dimensions are kept whole on every device (more memory per device than the
    mesh suggests), which the trainer reports when it starts."""
    flat_s = jax.tree_util.tree_leaves_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    flat_a = jax.tree.leaves(abstract)
    items, n_bytes, all_bytes = [], 0, 0
    for (path, sharding), a in zip(flat_s, flat_a):
        size = int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        all_bytes += size
        fitted = fit_sharding(sharding, a.shape)
        if fitted is sharding:
            continue
        n_bytes += size
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for dim, (want, got) in enumerate(zip(sharding.spec, fitted.spec)):
            if want != got:
                want_t = want if isinstance(want, tuple) else (want,)
                axes = "x".join(f"{n}={sharding.mesh.shape[n]}" for n in want_t)
                items.append(f"{name} dim {dim} ({a.shape[dim]}) over {axes}")
    if not items:
        return None
    shown = "; ".join(items[:max_items]) + (f"; and {len(items) - max_items} more" if len(items) > max_items
                                            else "")
    share = n_bytes / max(all_bytes, 1)
    return (f"{len(items)} dimension(s) not split over mesh axes that do not divide them (kept whole on "
            f"every device, {n_bytes / 2**20:.2f} MiB = {100 * share:.1f}% of the "
            f"parameter bytes): {shown}", share)
