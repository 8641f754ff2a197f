"""Small Pallas helpers shared by every kernel package.

Everything that depends on the jax version lives here: the squeezed block
dimension marker and the Triton / Mosaic TPU compiler-params spelling.  The two-variant
plan every kernel carries (:class:`KernelPlan`, :func:`select_plan`, :func:`by_platform`:
interpret mode runs one variant, compiled calls carry the Triton and the Mosaic TPU plans
and pick one when lowering).  Also the
input checks shared by the attention kernels (:func:`check_qkv`) and by the two scans
(selective_scan, ssd), and the scans' packed-sequence reset flags.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

SQ = getattr(pl, "squeezed", None)  # squeezed block dim (None on older jax)


def resolve_interpret(interpret):
    """``None`` -> interpret mode exactly when the default backend is the CPU.

    A ``pltpu.InterpretParams`` (Pallas' TPU interpreter) is passed through
    unchanged; anything else becomes a bool.
    """
    if interpret is None:
        return jax.default_backend() == "cpu"
    if is_tpu_interpret(interpret):
        return interpret
    if not isinstance(interpret, (bool, np.bool_)):
        raise ValueError(f"interpret must be None (interpret mode exactly on the CPU), a bool or a "
                         f"pltpu.InterpretParams, got {interpret!r}")
    return bool(interpret)


def check_flag(name: str, value) -> bool:
    """``value`` as a bool, or a ``ValueError`` naming ``name`` (a string such as ``"no"`` must not
    be read by truthiness)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool (True/False), got {value!r}")
    return bool(value)


def is_tpu_interpret(interpret) -> bool:
    """True for a ``pltpu.InterpretParams`` (run the TPU variant in TPU interpret mode)."""
    try:
        from jax.experimental.pallas import tpu as pltpu
    except ImportError:  # pragma: no cover
        return False
    cls = getattr(pltpu, "InterpretParams", None)
    return cls is not None and isinstance(interpret, cls)


# --------------------------------------------------------------------------- plans
@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelPlan:
    """The static part every kernel's plan shares (plans are hashable: jit / custom_vjp static
    args).  ``platform``: the variant this plan builds, ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic);
    ``tpu_plan``: on compiled calls, the TPU variant carried by the GPU plan (:func:`by_platform`)."""

    interpret: object  # bool, or a pltpu.InterpretParams (TPU variant in TPU interpret mode)
    platform: str = "gpu"
    tpu_plan: "KernelPlan | None" = None

    @property
    def tpu(self) -> bool:
        return self.platform == "tpu"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionPlan(KernelPlan):
    """What the attention kernels' plans share: q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]``, the
    head dim padded to ``dp``, the softmax scale and the (forward) Triton knobs."""

    b: int
    hq: int
    hkv: int
    d: int
    dp: int  # head dim padded (GPU: a power of two >= 16; TPU: a multiple of 128)
    sm_scale: float
    num_warps: int
    num_stages: int

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA)."""
        return self.hq // self.hkv


def select_plan(make, interpret, **tpu_kw) -> KernelPlan:
    """The plan of one call from ``make(**kw)`` (a kernel's plan builder, ``interpret`` resolved):
    TPU interpret mode -> the TPU variant only; plain interpret mode -> the (Triton-shaped) GPU
    variant; compiled -> the GPU plan carrying ``tpu_plan`` (built with ``tpu_kw`` too), chosen
    when lowering (:func:`by_platform`)."""
    if is_tpu_interpret(interpret):
        return make(platform="tpu", **tpu_kw)
    if interpret:
        return make()
    return dataclasses.replace(make(), tpu_plan=make(platform="tpu", **tpu_kw))


def by_platform(plan: KernelPlan, fn, *args):
    """``fn(variant_plan, *args)`` for the platform being lowered for.

    Compiled calls (``plan.tpu_plan`` set) go through ``lax.platform_dependent``: lowering for
    TPU (``jax.export(..., platforms=("tpu",))`` or a TPU backend) emits the Mosaic variant,
    anything else the Triton one; only the target platform's branch is lowered, and both must
    return the same types.  Interpret-mode plans are single-variant."""
    if plan.tpu_plan is None:
        return fn(plan, *args)
    return lax.platform_dependent(*args, tpu=functools.partial(fn, plan.tpu_plan),
                                  default=functools.partial(fn, plan))


def tpu_compiler_params(dimension_semantics) -> dict:
    """``pallas_call`` kwargs selecting the Mosaic TPU lowering.

    ``dimension_semantics``: one of ``"parallel"`` / ``"arbitrary"`` per grid
    axis (parallel axes may be split across TensorCores / megacore).
    """
    from jax.experimental.pallas import tpu as pltpu

    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics))}


def compiler_params(num_warps: int, num_stages: int, *, platform: str = "gpu",
                    dimension_semantics=None) -> dict:
    """``pallas_call`` kwargs selecting the Triton lowering with these knobs.

    jax >= 0.5 spells it ``pallas.triton.CompilerParams`` (older:
    ``TritonCompilerParams``; oldest: a ``{"triton": {...}}`` dict).  Naming the
    Triton class explicitly keeps newer jax from picking Mosaic GPU.

    ``platform="tpu"`` returns Mosaic TPU params instead (``num_warps`` /
    ``num_stages`` are ignored; ``dimension_semantics`` is then required: one
    ``"parallel"`` / ``"arbitrary"`` per grid axis).
    """
    if platform not in ("gpu", "tpu"):
        raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}")
    if platform == "tpu":
        if dimension_semantics is None:
            raise ValueError("dimension_semantics is required for platform='tpu': one of "
                             "'parallel' / 'arbitrary' per grid axis")
        return tpu_compiler_params(dimension_semantics)
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # pragma: no cover - very old / stripped jax
        pltriton = None
    for mod, name in ((pltriton, "CompilerParams"), (pltriton, "TritonCompilerParams"),
                      (pl, "TritonCompilerParams")):
        cls = getattr(mod, name, None) if mod is not None else None
        if cls is not None:
            return {"compiler_params": cls(num_warps=num_warps, num_stages=num_stages)}
    # pragma: no cover - oldest jax
    return {"compiler_params": {"triton": {"num_warps": num_warps, "num_stages": num_stages}}}


def idiv(a, b: int):
    """``a // b`` of a traced int index (a grid index in an index map, ``a >= 0``) by a static
    Python int, in ``a``'s dtype: ``lax.div`` wants equal dtypes, and under ``jax_enable_x64``
    a bare Python int is int64 while grid indices are int32."""
    if isinstance(a, (int, np.integer)):
        return int(a) // b
    return lax.div(a, jnp.asarray(b, a.dtype))


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ------------------------------------------------------------------------ attention validation
def check_qkv(q, k, v, *, self_attention: bool) -> None:
    """``ValueError`` naming the argument unless q ``[B, Tq, Hq, D]``, k/v ``[B, Tk, Hkv, D]`` are
    non-empty floating arrays of one dtype with ``Hq % Hkv == 0`` (GQA);
    ``self_attention``: also ``Tq == Tk`` (the sparse and landmark kernels)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, H, D], got shape {shape_of(x)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
    if self_attention and q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k must share batch and sequence length [B, T] (self-attention), "
                         f"got q {q.shape} and k {k.shape}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got q {q.shape} and k {k.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim D, got q {q.shape} and k {k.shape}")
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"q, k, v must be non-empty (B, T, H, D >= 1), got q {q.shape} and k {k.shape}")
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"number of query heads (q.shape[2]={hq}) must be a multiple of the "
                         f"number of kv heads (k.shape[2]={hkv}): Hq % Hkv == 0")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")


def is_float_dtype(dtype) -> bool:
    """``dtype`` names a real floating dtype (``None``, strings that name no dtype: False)."""
    if dtype is None:
        return False
    try:
        return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))
    except TypeError:
        return False


def check_qkv_shapes(q_shape, k_shape, dtype, *, self_attention: bool):
    """The attention VMEM estimators' arguments: ``(q, k)`` as ``jax.ShapeDtypeStruct`` s, or a
    ``ValueError`` naming the argument.  ``q_shape`` / ``k_shape``: 4 positive ints ``(B, T, H, D)``
    (Python or numpy integers, through :func:`check_int`; bools, floats, strings refused),
    ``dtype`` a floating dtype, then the kernels' own :func:`check_qkv` (GQA, batch, head dim,
    ``Tq == Tk`` when ``self_attention``) on the shapes."""
    shapes = []
    for name, shp in (("q_shape", q_shape), ("k_shape", k_shape)):
        if not isinstance(shp, (tuple, list)) or len(shp) != 4:
            raise ValueError(f"{name} must be 4 positive ints (B, T, H, D), got {shp!r}")
        shapes.append(tuple(check_int(f"{name}[{i}]", v) for i, v in enumerate(shp)))
    if not is_float_dtype(dtype):
        raise ValueError(f"dtype must be a floating dtype (that of q / k / v), got {dtype!r}")
    q, k = (jax.ShapeDtypeStruct(shp, jnp.dtype(dtype)) for shp in shapes)
    check_qkv(q, k, k, self_attention=self_attention)
    return q, k


# ----------------------------------------------------------------------------- scan validation
LAYOUT_HINT = ("this library is length-major; mamba_ssm's [B, D, L] (channels-first) layout "
               "must be transposed, e.g. x.transpose(0, 2, 1)")


def shape_of(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def check_arrays(**named) -> None:
    """``ValueError`` naming the first argument that is neither ``None`` nor an array (a list, a
    Python number): the shape checks after it would otherwise report it as "shape ()"."""
    for name, v in named.items():
        if v is not None and not (hasattr(v, "shape") and hasattr(v, "dtype")):
            raise ValueError(f"{name} must be an array (jax or numpy), got {type(v).__name__}")


def check_float(name: str, x, expected: str) -> None:
    """``ValueError`` unless ``x`` is a real floating-point array (``expected``: its shape)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a real floating-point array of shape {expected}, "
                         f"got dtype {dtype} (shape {shape_of(x)})")


def check_state_size(name: str, shape, n: int, layout: str) -> None:
    """``ValueError`` unless the state size ``N`` (read from ``name``'s ``shape``) is >= 1: with
    ``N = 0`` there is no state and the scan would return ``D * x`` as if it were one."""
    if n < 1:
        raise ValueError(f"the state size N must be >= 1: expected {name} as {layout} with N >= 1, "
                         f"got shape {tuple(shape)}")


def check_decay(A, shape: str) -> None:
    """``ValueError`` if a concrete ``A`` (the SSM's continuous-time decay) has a positive entry.

    The recurrences use ``exp(dt * A)`` with ``dt > 0``: ``A <= 0`` (mamba_ssm parametrises
    ``A = -exp(A_log) < 0``) keeps the state bounded; a positive entry makes it grow like
    ``exp(A * sum(dt))`` until it overflows to inf / NaN.  Traced ``A`` (under ``jit``, e.g. the
    models' ``-exp(A_log)``) and abstract shapes are not checked: the precondition is then the
    caller's, as documented."""
    if not isinstance(A, (np.ndarray, np.generic, jax.Array)) or isinstance(A, jax.core.Tracer):
        return
    if isinstance(A, jax.Array) and not A.is_fully_addressable:
        return  # spread over processes: no host copy of it here
    if not jnp.issubdtype(A.dtype, jnp.floating):
        return  # the callers' dtype checks name the problem (complex / integer A)
    a = np.asarray(A, np.float32)
    if (a > 0).any():
        raise ValueError(f"A {shape} must be negative (<= 0: the decay exp(dt * A) <= 1, as mamba_ssm's "
                         f"A = -exp(A_log) guarantees), got {int((a > 0).sum())} positive entries "
                         f"(max {float(a.max())}): a positive A makes the state grow without bound")


def is_int(x) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def concrete_real(name: str, value, why: str, rule: str = "a real scalar") -> float:
    """``value`` as a Python float: a concrete real scalar (a Python / numpy number or a 0-d
    array; not a bool or a string, which ``float()`` would read).  ``ValueError`` naming ``name``
    otherwise; a traced value gets its own message (``why`` says why it must be concrete, e.g.
    "baked into the kernel"; ``rule`` what the error says it must be).  Finiteness and range are
    the caller's to check."""
    if isinstance(value, float):
        return value
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise ValueError(f"{name} must be {rule} (Python float) or None, got {value!r}")
    try:
        arr = np.asarray(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        raise ValueError(f"{name} must be a concrete number ({why}), got a traced value: pass a Python "
                         "float, or compute it outside jit") from None
    if arr.shape != () or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be {rule} (Python float) or None, got {value!r}")
    return float(arr)


def check_int(name: str, value, *, minimum: int = 1, pow2: bool = False, none_ok: bool = False):
    """``value`` as a Python int (``None`` passed through when ``none_ok``), or a ``ValueError``
    naming ``name`` and the allowed values.

    The kernels' static integer knobs (block / chunk sizes, warps, stages, shapes): a Python or
    numpy integer (``np.int64(64)`` from a sweep's ``np.arange``) ``>= minimum``, a power of two
    when ``pow2``; bools, floats (``64.0``), strings and arrays (0-d ones too) are refused.  The
    result is a Python int, so plans and jit static arguments never hold numpy scalars."""
    if value is None and none_ok:
        return None
    if is_int(value) and value >= minimum and not (pow2 and value & (value - 1)):
        return int(value)
    if pow2:
        what = "a positive power of two" if minimum <= 1 else f"a power of two >= {minimum}"
    else:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    raise ValueError(f"{name} must be {'None or ' if none_ok else ''}{what} (Python or numpy "
                     f"integer), got {value!r}")


def int32_ids(a, b):
    """Two integer id arrays (segment or bucket ids) as int32, equal exactly where the ids are
    equal and in the same order: a cast when their common dtype has at most 32 bits, else (64-bit
    ids under ``jax_enable_x64``, where a cast would merge e.g. 0 and 2**32) each id's index among
    the sorted ids of both."""
    dtype = jnp.promote_types(a.dtype, b.dtype)
    if dtype.itemsize <= 4:
        return a.astype(jnp.int32), b.astype(jnp.int32)
    ids = jnp.sort(jnp.concatenate([a.astype(dtype).ravel(), b.astype(dtype).ravel()]))
    return tuple(jnp.searchsorted(ids, x.astype(dtype)).astype(jnp.int32) for x in (a, b))


def check_segment_ids(segment_ids, b: int, l: int) -> None:
    """``segment_ids`` must be an integer ``[B, L]`` array (a list or other non-array is refused
    by type, as the attention kernels refuse one)."""
    if not (hasattr(segment_ids, "shape") and hasattr(segment_ids, "dtype")):  # e.g. a (nested) list
        raise ValueError(f"segment_ids must be an integer array of shape [B, L] = {(b, l)}, "
                         f"got {type(segment_ids).__name__}")
    dtype = getattr(segment_ids, "dtype", None)
    if shape_of(segment_ids) != (b, l):
        raise ValueError(f"segment_ids must have shape [B, L] = {(b, l)}, got {shape_of(segment_ids)}")
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"segment_ids must be an integer [B, L] array, got dtype {dtype}")


def host_int32_ids(a, b):
    """Concrete 64-bit integer ids (numpy ``int64`` is numpy's default) as their joint ranks in
    int32 when ``jax_enable_x64`` is off: converting them to jax arrays would silently wrap them to
    32 bits and merge distinct ids (``2**32`` with ``0``).  Ranks keep equality and order (sorted
    packed ids stay sorted).  Anything else -- 32-bit ids, traced ids, x64 on (where
    :func:`int32_ids` ranks them in the kernel) -- is returned unchanged."""
    def wide(x):
        return (isinstance(x, (np.ndarray, np.generic, jax.Array)) and not isinstance(x, jax.core.Tracer)
                and np.issubdtype(x.dtype, np.integer) and np.dtype(x.dtype).itemsize > 4)
    if (jax.config.jax_enable_x64 or not (wide(a) or wide(b))
            or any(isinstance(x, jax.core.Tracer) for x in (a, b))):
        return a, b
    a_np, b_np = np.asarray(a), np.asarray(b)
    if not (np.issubdtype(a_np.dtype, np.integer) and np.issubdtype(b_np.dtype, np.integer)):
        return a, b  # not ids at all: the kernel's own validation names the argument
    # int64 with uint64 would promote to float64 (losing ids above 2**53): compare as Python ints
    exact = np.result_type(a_np, b_np).kind == "f"
    both = np.concatenate([x.ravel().astype(object) if exact else x.ravel() for x in (a_np, b_np)])
    _, inv = np.unique(both, return_inverse=True)
    inv = inv.reshape(-1).astype(np.int32)
    return inv[:a_np.size].reshape(a_np.shape), inv[a_np.size:].reshape(b_np.shape)


def process_dt(dt, dt_bias, dt_softplus):
    """The scans' step sizes: ``softplus?(dt + dt_bias)`` in float32 (``dt_softplus`` a bool)."""
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    if check_flag("dt_softplus", dt_softplus):
        dt = jax.nn.softplus(dt)
    return dt


def segment_resets(segment_ids):
    """``[B, L]`` int -> ``[B, L]`` bool, True at every ``t > 0`` with ``ids[t] != ids[t-1]``
    (where the scans' state restarts from zero)."""
    first = jnp.zeros(segment_ids.shape[:1] + (1,), bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


# ----------------------------------------------------------------------------- Mosaic TPU VMEM
def tpu_tile_bytes(shape, itemsize: int) -> int:
    """VMEM bytes of one block on TPU: the last two dims padded to the ``(8, 128)`` tile
    (16 rows for 16-bit types, 32 for 8-bit); a 1-D block is one row."""
    shape = tuple(shape)
    if len(shape) < 2:
        shape = (1,) * (2 - len(shape)) + shape
    *lead, r, c = shape
    sub = 8 * max(1, 4 // itemsize)
    count = 1
    for d in lead:
        count *= int(d)
    return count * round_up(r, sub) * round_up(c, 128) * itemsize
