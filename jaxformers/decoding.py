"""KV-cache decoding and sampling.

``init_cache(module, batch, max_len)`` preallocates every layer's cache;
``generate`` prefills the prompt in one forward pass (prompts of different lengths: the
shortest, then each row's own tokens), then samples one token per
step inside ``lax.while_loop`` (which stops early once every row has sampled ``eos_id``),
all under ``jit``.  A model that needs a fixed token at periodic positions of its input (a
landmark model's landmarks) says so through its ``forced_tokens()`` hook; ``generate`` then
inserts, feeds and removes those tokens itself (see :func:`generate`).  A model whose logits
cannot be sampled from (NaN, ``+inf``: a diverged or broken model) is refused with
:class:`NonFiniteLogitsError` instead of returning arbitrary tokens (:func:`unusable_logits`).
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .config import DTYPES
from .utils import check_token_ids, concrete, is_int


def init_cache(module, batch_size: int, max_len: int, dtype=None):
    """Empty decoding cache: {'index': int32 scalar, 'layers': per-layer caches}.

    ``dtype``: the cached keys / values' (and conv states') float dtype, a name of
    ``config.DTYPES`` or a float dtype (``None``: the config's ``dtype``).
    ``layers``: the model's ``init_layer_caches`` as it returns them (with ``scan_layers`` the
    layer caches stacked on a leading ``[L]`` axis).
    """
    batch_size, max_len = _positive_int(batch_size, "batch_size"), _positive_int(max_len, "max_len")
    _check_cache_dtype(dtype)
    layers = module.init_layer_caches(batch_size, max_len, dtype)
    return {"index": jnp.zeros((), jnp.int32), "layers": layers}


def _check_cache_dtype(dtype) -> None:
    """``ValueError`` unless ``dtype`` is None, a name of ``DTYPES`` or a float dtype (an integer
    cache would silently truncate every key / value written to it)."""
    if dtype is None or isinstance(dtype, str) and dtype in DTYPES:
        return
    try:
        ok = not isinstance(dtype, str) and jnp.issubdtype(dtype, jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"dtype must be None (the config's dtype), one of {list(DTYPES)} or a float dtype, "
                         f"got {dtype!r}")


def check_sampling(temperature, top_k, top_p, vocab_size=None) -> None:
    """``ValueError`` naming the argument unless ``temperature`` is a finite number >= 0, ``top_k``
    None or an int in ``[1, vocab_size]`` and ``top_p`` None or a number in ``(0, 1]``."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None:
        hi = "vocab_size" if vocab_size is None else f"vocab_size={vocab_size}"
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1 \
                or (vocab_size is not None and top_k > vocab_size):
            raise ValueError(f"top_k must be None or an int in [1, {hi}], got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool)
                              or not isinstance(top_p, (int, float, np.integer, np.floating))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def sample_logits(logits, rng, *, temperature=1.0, top_k=None, top_p=None):
    """Sample token ids ``[B]`` from logits ``[B, V]`` (temperature 0 = greedy); ``top_k`` keeps
    the k largest logits (and any tied with the k-th, as HF's top-k warper), ``top_p`` the smallest prefix of the sorted distribution whose mass
    reaches ``top_p`` (nucleus; always at least one token; ``top_p=1`` keeps every token) and
    every token tied with its last logit (so the kept mass can pass that prefix's when logits
    tie, e.g. in bfloat16; HF's top-p warper keeps ties in sort order instead).  A
    positive temperature so small that the scaled logits overflow float32 (or below float32's
    smallest normal number) samples greedily, the limit of sampling as the temperature goes to 0.
    Logits with NaN / ``+inf`` are not checked here (it runs under ``jit``): :func:`generate`
    refuses them (:func:`unusable_logits`)."""
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"logits must be [B, V], got shape {getattr(logits, 'shape', None)}")
    check_sampling(temperature, top_k, top_p, logits.shape[-1])
    if temperature < np.finfo(np.float32).tiny:  # 0, or 1 / temperature overflows float32
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    raw = logits.astype(jnp.float32)
    logits = raw / temperature
    # rows where a finite logit overflowed to +-inf: categorical would pick the first inf; greedy
    overflow = jnp.any(jnp.isinf(logits) & jnp.isfinite(raw), axis=-1)
    if top_k is not None:
        kth = jax.lax.top_k(logits, int(top_k))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:  # top_p=1 keeps everything (float32 cumsums can pass 1)
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    sampled = jax.random.categorical(rng, logits, axis=-1)
    return jnp.where(overflow, jnp.argmax(raw, axis=-1), sampled).astype(jnp.int32)


class NonFiniteLogitsError(FloatingPointError):
    """:func:`generate` refused the tokens of a model whose logits cannot be sampled from (see
    :func:`unusable_logits`): a diverged or broken model (e.g. NaN parameters, an overflow to
    inf).  ``row`` / ``step``: the first such row of the result and its new token (0-based; the
    earliest step, then the lowest row); ``steps``: numpy int ``[rows of the result]``, each row's
    first such new token, ``-1`` where every token was drawn from usable logits."""

    def __init__(self, message: str, *, row: int, step: int, steps):
        super().__init__(message)
        self.row, self.step, self.steps = row, step, steps


def unusable_logits(logits, *, banned=None, vocab_limit=None):
    """``[B]`` bool: the rows of a model's raw logits ``[B, V]`` that no token may be drawn from
    (what :func:`generate` refuses): a NaN anywhere in the row, a ``+inf`` anywhere in the row, or
    no finite logit among the ids that may be drawn (ids ``< vocab_limit``, less ``banned``: a
    token the sampler never draws).  ``-inf`` is a legitimate logit (a token the model bans, a
    mask): the row is usable while some id that may be drawn has a finite logit.  Checked on the
    model's logits, before temperature, ``top_k`` / ``top_p`` (whose ``-inf`` are filters) and
    ``vocab_limit``."""
    bad = jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1)
    candidates = logits if banned is None else logits.at[:, banned].set(-jnp.inf)
    if vocab_limit is not None:
        candidates = candidates[:, :vocab_limit]
    return bad | ~jnp.any(jnp.isfinite(candidates), axis=-1)


def _refuse_unusable(steps, module) -> None:
    """:class:`NonFiniteLogitsError` when some row of ``steps`` (each row's first new token drawn
    from unusable logits, ``-1``: none) is not ``-1``."""
    rows = np.nonzero(steps >= 0)[0]
    if not rows.size:
        return
    step = int(steps[rows].min())
    row = int(rows[np.argmax(steps[rows] == step)])
    listed = ", ".join(f"row {int(r)} at new token {int(steps[r])}" for r in rows[:8])
    more = f" (and {rows.size - 8} more rows)" if rows.size > 8 else ""
    model = getattr(module.config, "model", type(module).__name__)
    raise NonFiniteLogitsError(
        f"generate: model {model!r} produced logits that no token can be drawn from (NaN or +inf, or -inf "
        f"for every id that may be drawn) first for new token {step} of row {row} of the result; affected: "
        f"{listed}{more}.  The model is diverged or broken (e.g. NaN parameters from a diverged run, or an "
        "overflow in a low-precision dtype): sampling from these logits would give arbitrary tokens",
        row=row, step=step, steps=steps)


def _positive_int(value, name: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _validate(module, prompt_tokens, max_new_tokens, temperature, top_k, top_p, vocab_limit):
    if prompt_tokens.ndim != 2 or 0 in prompt_tokens.shape:
        raise ValueError(f"prompt_tokens must be [B, P] with B >= 1 and P >= 1, "
                         f"got shape {prompt_tokens.shape}")
    if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be integer token ids, got dtype {prompt_tokens.dtype}")
    max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
    vocab = module.config.vocab_size
    if vocab_limit is not None:
        if not is_int(vocab_limit) or not 1 <= vocab_limit <= vocab:
            raise ValueError(f"vocab_limit must be None or an int in [1, vocab_size={vocab}], got {vocab_limit!r}")
    check_sampling(temperature, top_k, top_p, vocab)
    if vocab_limit is not None and top_k is not None and top_k > vocab_limit:
        raise ValueError(f"top_k must be None or an int in [1, vocab_limit={vocab_limit}], got {top_k!r}")
    return max_new_tokens, None if vocab_limit is None else int(vocab_limit)


def _repeat_rows(tree, k: int, axis: int):
    """Every array of a decoding cache (or logits) with its batch rows repeated ``k`` times."""
    return jax.tree.map(lambda x: jnp.repeat(x, k, axis=axis) if x.ndim > axis else x, tree)


def _forced_len(n: int, period: int) -> int:
    """Model positions of ``n`` caller tokens with a forced token inserted after every
    ``period - 1`` of them (so a trailing complete group is followed by its forced token)."""
    return n + n // (period - 1)


def max_raw_tokens(module, positions: int) -> int:
    """How many of the caller's tokens (prompt + new) fit in ``positions`` model positions:
    ``positions`` itself, less the positions whose token the model's ``forced_tokens`` hook
    fixes (e.g. a landmark model's landmarks, see :func:`generate`)."""
    forced = _forced_tokens(module)
    return positions if forced is None else positions - positions // forced[0]


def _forced_tokens(module):
    """The model's ``forced_tokens()`` hook, checked: ``None`` or ``(period, token)``."""
    hook = getattr(module, "forced_tokens", None)
    forced = None if hook is None else hook()
    if forced is None:
        return None
    period, token = forced
    vocab = module.config.vocab_size
    if not is_int(period) or period < 2 or not is_int(token) or not 0 <= token < vocab:
        raise ValueError(f"{type(module).__name__}.forced_tokens() must return None or (period >= 2, "
                         f"token id in [0, vocab_size={vocab})), got {forced!r}")
    return int(period), int(token)


def _check_mesh(mesh):
    """``mesh`` of :func:`generate`: None, a ``jax.sharding.Mesh`` with the axes of
    :data:`jaxformers.sharding.MESH_AXES` and only this process's devices, or a spec string for
    :func:`~jaxformers.training.mesh.make_mesh` over this process's devices (``"tensor=2"``,
    ``"data=2,tensor=2"``); a blank spec is None, as in training (it decoded on every local device,
    None on one)."""
    if mesh is None or (isinstance(mesh, str) and not mesh.strip()):
        return None
    from .sharding import MESH_AXES
    from .training.mesh import make_mesh
    if isinstance(mesh, str):  # this process's devices (the remote ones are refused below)
        return make_mesh(mesh, devices=jax.local_devices())
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"mesh must be None, a jax.sharding.Mesh or a spec string such as 'tensor=2' "
                         f"(jaxformers.training.make_mesh), got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != tuple(MESH_AXES):
        raise ValueError(f"mesh must have the axes {tuple(MESH_AXES)} (the logical rules map onto them; "
                         f"jaxformers.training.make_mesh builds one), got {tuple(mesh.axis_names)}")
    remote = sorted({d.process_index for d in mesh.devices.flat} - {jax.process_index()})
    if remote:  # the prompt is this process's and the tokens come back to it
        raise ValueError(f"mesh has devices of other processes ({remote}): generate decodes in one process; "
                         "use a mesh of this process's devices (make_mesh(spec, devices=jax.local_devices()))")
    return mesh


def _place_on_mesh(module, params, prompt, lengths, mesh):
    """``params`` (``{"params": tree}``, other collections replicated) split by the model's logical
    axis rules, ``prompt [B, P]`` / ``lengths [B]`` split by rows over the batch axes when they
    divide ``B`` (else replicated)."""
    from .training.mesh import (batch_parallelism, batch_sharding, fit_shardings, logical_to_sharding,
                                replicated)
    from .utils import logical_axes
    if not (isinstance(params, dict) and "params" in params):
        raise ValueError("params must be the variables dict module.apply takes ({'params': tree}) to be "
                         f"placed on a mesh, got {type(params).__name__} with keys "
                         f"{sorted(params) if isinstance(params, dict) else None}")
    specs = logical_axes(module)
    try:
        shardings = fit_shardings(logical_to_sharding(specs, mesh), params["params"])
    except ValueError as e:  # a tree that is not this model's (jax names the differing keys)
        if "logical axis" in str(e):
            raise
        raise ValueError(f"params['params'] does not match the parameters of model "
                         f"{module.config.model!r}: {str(e).splitlines()[0]}") from None
    placed = {k: (jax.device_put(v, shardings) if k == "params" else jax.device_put(v, replicated(mesh)))
              for k, v in params.items()}
    rows = batch_sharding(mesh, 2) if prompt.shape[0] % batch_parallelism(mesh) == 0 else replicated(mesh)
    lrows = batch_sharding(mesh, 1) if rows != replicated(mesh) else replicated(mesh)
    return placed, jax.device_put(prompt, rows), jax.device_put(lengths, lrows)


@functools.lru_cache(maxsize=32)
def _generate_fn(module_cls, config, max_new_tokens, temperature, top_k, top_p, num_samples=1,
                 vocab_limit=None, eos_id=None, pad_id=None, min_len=None, forced=None, mesh=None):
    """The jitted sampler.  ``min_len``: the shortest prompt, prefilled in one pass for every row
    (``None``: every prompt is the whole ``[B, P]``); a longer prompt's remaining tokens are fed
    one per step in place of the sampled token (forced), so every row sees only its own tokens.
    ``forced``: ``None`` or the model's ``(period, token)`` (:func:`generate`): the sampler then
    runs over the model's positions (``token`` inserted at every ``t % period == period - 1``,
    fed there instead of the sampled token, never counted as a new token, removed from the
    result); ``prompt``, ``lengths``, ``min_len`` and the result are the caller's tokens."""
    module = module_cls(config)
    fill = 0 if pad_id is None else pad_id  # positions no row wrote: after eos, after a short row
    period, token = (None, None) if forced is None else forced

    def sample(last_logits, key):
        """``(token [B], unusable [B])``: the sampled tokens and which rows' raw logits no token
        may be drawn from (:func:`unusable_logits`, checked before any masking or filtering)."""
        bad = unusable_logits(last_logits, banned=token, vocab_limit=vocab_limit)
        if period is not None:  # the forced token is never sampled (drawn there, it would be forced)
            last_logits = last_logits.at[:, token].set(-jnp.inf)
        if vocab_limit is not None:  # ids >= vocab_limit (padding of the model's vocab) are never drawn
            last_logits = last_logits[:, :vocab_limit]
        return sample_logits(last_logits, key, temperature=temperature, top_k=top_k, top_p=top_p), bad

    def emit(seq, done, pos, sampled, lengths, bad_step):
        """Choose the token at position ``pos``: the prompt's where the row's prompt is longer
        (forced), else the sampled token (``fill`` in finished rows).  Returns the tokens to feed
        the model, the sequences, which rows are finished (they sampled ``eos_id`` or have their
        ``max_new_tokens``) and ``bad_step``: each row's first new token drawn from unusable
        logits (``-1``: none so far; only the logits a token of the result is drawn from count,
        not those of forced positions or of finished rows)."""
        tok, bad = sampled
        forced = pos < lengths
        if period is not None:  # the model's forced positions (seq holds the token there)
            forced = forced | (pos % period == period - 1)
        prompt_tok = seq[:, pos]
        feed = jnp.where(forced, prompt_tok, tok)
        seq = seq.at[:, pos].set(jnp.where(forced, prompt_tok, jnp.where(done, fill, tok)))
        if period is None:
            new = pos + 1 - lengths
        else:  # new tokens so far: positions after the prompt, less the forced ones among them
            new = (pos + 1 - (pos + 1) // period) - (lengths - lengths // period)
        bad_step = jnp.where(bad & ~forced & ~done & (bad_step < 0), new - 1, bad_step)
        if eos_id is not None:
            done = done | (~forced & (tok == eos_id))
        return feed, seq, done | (new >= max_new_tokens), bad_step

    # hook: a model whose computation depends on the batch row (e.g. random draws per row, or
    # routing with a capacity shared by the batch) must prefill every sample's row itself
    # instead of sharing its prompt's
    share = num_samples > 1 and getattr(module, "rows_share_prefill", True)

    def run(params, prompt, lengths, rng):
        if num_samples > 1 and not share:
            prompt, lengths = jnp.repeat(prompt, num_samples, axis=0), jnp.repeat(lengths, num_samples)
        b, p = prompt.shape
        p0 = p if min_len is None else min_len
        width = p + max_new_tokens  # positions of the result
        if period is not None:  # from the caller's tokens to the model's positions
            cols = np.arange(_forced_len(p, period))
            prompt = jnp.where(cols % period == period - 1, token,
                               prompt[:, np.minimum(cols - cols // period, p - 1)])
            lengths = lengths + lengths // (period - 1)
            p, p0 = _forced_len(p, period), _forced_len(p0, period)
            width = _forced_len(width - 1, period) + 1  # up to the last new token's position
        cache = init_cache(module, b, width)
        logits, cache = module.apply(params, prompt[:, :p0], cache=cache)
        if share:  # prefill once per prompt, then k rows per prompt share it
            logits = jnp.repeat(logits, num_samples, axis=0)
            cache = {"index": cache["index"],
                     "layers": _repeat_rows(cache["layers"], num_samples, 1 if config.scan_layers else 0)}
            prompt, lengths = jnp.repeat(prompt, num_samples, axis=0), jnp.repeat(lengths, num_samples)
            b = b * num_samples
        steps = width - p0  # positions to choose, one per step
        cols = jnp.arange(width)
        seq = jnp.pad(prompt, ((0, 0), (0, width - p)))
        seq = jnp.where(cols[None] < lengths[:, None], seq, fill)
        if period is not None:
            seq = jnp.where(cols[None] % period == period - 1, token, seq)
        done = jnp.zeros((b,), bool)
        bad_step = jnp.full((b,), -1, jnp.int32)

        def step(state):
            i, last_logits, cache, seq, done, bad_step, rng = state
            rng, sub = jax.random.split(rng)
            feed, seq, done, bad_step = emit(seq, done, p0 + i, sample(last_logits, sub), lengths, bad_step)
            logits, cache = module.apply(params, feed[:, None], cache=cache)
            return i + 1, logits[:, -1], cache, seq, done, bad_step, rng

        def more(state):  # the last chosen token needs no forward pass: steps - 1 steps
            return (state[0] < steps - 1) & ~jnp.all(state[4])

        state = jax.lax.while_loop(more, step, (jnp.zeros((), jnp.int32), logits[:, -1], cache, seq, done,
                                                bad_step, rng))
        _, last_logits, _, seq, done, bad_step, rng = state
        rng, sub = jax.random.split(rng)  # after an early stop every row is done: this writes fill
        _, seq, _, bad_step = emit(seq, done, width - 1, sample(last_logits, sub), lengths, bad_step)
        if period is not None:  # back to the caller's tokens: the forced positions removed
            seq = seq[:, np.nonzero(np.arange(width) % period != period - 1)[0]]
        return seq, bad_step

    return jax.jit(run)


def _prompt_lengths(prompt_lengths, prompt_tokens):
    """``prompt_lengths`` as a concrete int32 ``[B]`` array with values in ``[1, P]``."""
    b, p = prompt_tokens.shape
    values = concrete(prompt_lengths)
    if values is None:
        raise ValueError("prompt_lengths must be known outside jit (it sets the prefill length), got a traced value")
    if values.shape != (b,) or not (np.issubdtype(values.dtype, np.integer) or values.dtype == object
                                      and all(is_int(v) for v in values)):
        raise ValueError(f"prompt_lengths must be {b} ints (one per row of prompt_tokens [B={b}, P={p}]), "
                         f"got {prompt_lengths!r}")
    values = values.astype(np.int64)
    if values.min() < 1 or values.max() > p:
        raise ValueError(f"prompt_lengths must be in [1, P={p}], got values from {values.min()} to {values.max()}")
    return values.astype(np.int32)


def _key(rng):
    """``rng`` of :func:`generate` as a PRNG key: None -> key 0, an int -> that seed's key, a key
    (``jax.random.PRNGKey``'s uint32 ``[2]`` or a typed ``jax.random.key``) as it is."""
    if rng is None:
        return jax.random.PRNGKey(0)
    if is_int(rng):
        if not -2**63 <= int(rng) < 2**63:  # jax's seed range (beyond it, an OverflowError deep in jax)
            raise ValueError(f"rng as an int seed must be in [-2**63, 2**63), got {rng}")
        return jax.random.PRNGKey(int(rng))
    dtype = getattr(rng, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and np.ndim(rng) == 0:
        return rng
    if dtype is not None and dtype == np.uint32 and np.shape(rng) == (2,):
        return rng
    what = type(rng).__name__ if dtype is None else f"shape {np.shape(rng)}, dtype {dtype}"
    raise ValueError("rng must be None, an int seed or one PRNG key (jax.random.PRNGKey(seed): uint32 [2], "
                     f"or jax.random.key(seed)), got {what}")


def generate(module, params, prompt_tokens, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, rng=None, num_samples: int = 1,
             vocab_limit: Optional[int] = None, eos_id: Optional[int] = None,
             pad_id: Optional[int] = None, prompt_lengths=None, mesh=None):
    """Sample ``max_new_tokens`` after ``prompt_tokens [B, P]``; returns ``[B * k, P + max_new_tokens]``
    for ``num_samples=k`` samples per prompt (rows ``b * k .. b * k + k - 1`` continue prompt
    ``b``; the prompt is prefilled once and its cache shared by its k rows, unless the model's
    ``rows_share_prefill`` is False: its output depends on the batch row, so each row prefills).
    ``params``: the variables dict ``module.apply`` takes (``{'params': tree}``, as ``module.init``
    returns it; ``jf.init_params``' bare tree is a ``ValueError`` saying to wrap it).

    ``prompt_lengths [B]`` (ints in ``[1, P]``, known outside ``jit``): prompts of different lengths,
    right-padded to ``P`` (the values past a row's length are ignored).  The shortest prompt's
    length is prefilled for every row in one pass; then each longer row is fed its own remaining
    prompt tokens one per step while the others sample, so no row ever sees padding and every
    architecture (attention, SSM, hybrids) decodes each row exactly as it would alone.  Row ``b``
    of the result is its prompt, then its ``max_new_tokens`` new tokens, then ``pad_id`` (default
    ``eos_id``, else 0) up to ``P + max_new_tokens``.  Without it every row's prompt is all ``P``
    tokens.
    ``P + max_new_tokens`` is not checked against ``config.max_seq_len`` (positions past it are
    extrapolated, as in a full forward pass).
    ``vocab_limit``: sample only ids ``< vocab_limit`` (a model whose ``vocab_size`` is padded
    above its tokenizer's: the padding ids have no text); ``top_k`` and ``eos_id`` are checked
    against it.
    ``eos_id``: a row that samples it is finished: its later positions hold ``pad_id`` (default
    ``eos_id``), and decoding stops as soon as every row is finished.  The tokens up to and
    including each row's first ``eos_id`` are those sampled without ``eos_id`` (same rng stream).
    ``rng``: a PRNG key, an int seed, or None (seed 0).
    ``mesh``: decode on several devices of this process: a ``jax.sharding.Mesh`` with jaxformers'
    axes (:func:`jaxformers.training.make_mesh`) or its spec string (``"tensor=2"``,
    ``"data=2,tensor=2"``; over ``jax.local_devices()``).  ``params['params']`` is placed by the model's logical axis rules (as
    training shards it: heads and MLP units over ``tensor``, weights over ``fsdp``), the prompt's
    rows over the batch axes (``data``, ``fsdp``, ``expert``) when they divide ``B`` (else every
    device holds them all), and the sampler runs under the rules, so the model's activation
    constraints split the prefill and the KV cache the same way.  The tokens are those decoding
    on one device gives (same rng stream; tested for every registered family).

    Non-finite logits: a model whose logits for a token of the result are unusable -- a NaN or
    ``+inf`` anywhere in the row, or ``-inf`` for every id that may be drawn
    (:func:`unusable_logits`; ``-inf`` at some ids is a legitimate ban) -- is refused with
    :class:`NonFiniteLogitsError` (a ``FloatingPointError``) naming the first such new token and
    row, instead of returning arbitrary tokens.  Only the logits a token of the result is drawn
    from count (not those of a longer prompt's positions or of a row already finished), checked
    before temperature, ``top_k`` / ``top_p`` and ``vocab_limit``.  The check runs in the jitted
    loop (one reduction per step) and is read when the loop is done, so ``generate`` waits for its
    result; called inside a ``jit`` of your own (traced arguments) it cannot raise and does not
    check.

    Model hooks (attributes / methods of ``module``, all optional): ``check_generate()`` raises a
    ``ValueError`` for a model this sampler cannot serve; ``rows_share_prefill`` (above);
    ``forced_tokens()`` -> ``None`` or ``(period, token)``: the model needs ``token`` at every
    position ``t % period == period - 1`` of its input (a landmark model's landmarks,
    :mod:`jaxformers.models.landmark`).  The caller's tokens (``prompt_tokens``,
    ``prompt_lengths``, ``max_new_tokens``, the result) never hold them: ``generate`` inserts
    ``token`` after every ``period - 1`` tokens of each prompt (a prompt whose length is a
    multiple of ``period - 1`` ends with one), runs the prefill and the loop over the model's
    positions (the cache holds ``P + max_new_tokens`` plus the forced positions among them),
    feeds ``token`` at each forced position in place of the sampled one (not counted as a new
    token; the logits it yields are the next token's, so the next position samples from them),
    never samples ``token`` (its logit is masked before ``vocab_limit``; ``eos_id`` equal to it
    is refused) and returns the caller's tokens, the forced positions removed.  The rng is split
    once per model position, forced ones included."""
    check = getattr(module, "check_generate", None)  # hook: a model generic sampling cannot serve
    if check is not None:
        check()
    if not (isinstance(params, Mapping) and "params" in params):  # e.g. jf.init_params' bare tree
        keys = sorted(map(str, params))[:6] if isinstance(params, Mapping) else None
        raise ValueError("params must be the variables dict module.apply takes ({'params': tree}), got "
                         + (f"a mapping with keys {keys} (a bare parameter tree, as jf.init_params returns? "
                            "pass {'params': params})" if keys is not None else type(params).__name__))
    # the ids as given: jnp.asarray casts 64-bit ids to 32 bits, wrapping e.g. 2**32 + 3 to a valid 3
    raw = concrete(prompt_tokens)
    prompt_tokens = jnp.asarray(prompt_tokens)
    max_new_tokens, vocab_limit = _validate(module, prompt_tokens, max_new_tokens, temperature, top_k, top_p,
                                            vocab_limit)
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    b, p = prompt_tokens.shape
    min_len = None
    if prompt_lengths is None:
        lengths = np.full((b,), p, np.int32)
    else:
        lengths = _prompt_lengths(prompt_lengths, prompt_tokens)
        min_len = int(lengths.min())
        # the values past each row's length are never read: any filler is fine there
        prompt_tokens = jnp.where(jnp.arange(p)[None] < jnp.asarray(lengths)[:, None], prompt_tokens, 0)
    ids = prompt_tokens
    if raw is not None and raw.shape == (b, p) and np.issubdtype(raw.dtype, np.integer):
        ids = np.where(np.arange(p)[None] < lengths[:, None], raw, 0)
    check_token_ids(ids, module.config.vocab_size, "prompt_tokens must be ids")
    num_samples = _positive_int(num_samples, "num_samples")
    vocab = module.config.vocab_size
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (not is_int(value) or not 0 <= value < vocab):
            raise ValueError(f"{name} must be None or a token id in [0, vocab_size={vocab}), got {value!r}")
    if eos_id is not None and vocab_limit is not None and eos_id >= vocab_limit:
        raise ValueError(f"eos_id must be None or an id < vocab_limit={vocab_limit} (ids at or above it are "
                         f"never sampled, so no row would ever finish), got {eos_id!r}")
    if pad_id is not None and eos_id is None and prompt_lengths is None:
        raise ValueError("pad_id needs eos_id or prompt_lengths (it fills the positions after a row's eos_id "
                         "or after a shorter row's new tokens)")
    eos_id = None if eos_id is None else int(eos_id)
    pad_id = eos_id if pad_id is None else int(pad_id)
    forced = _forced_tokens(module)
    if forced is not None:
        if eos_id == forced[1]:
            raise ValueError(f"eos_id={eos_id} is the token {type(module).__name__} forces at every position "
                             f"t % {forced[0]} == {forced[0] - 1} (e.g. a landmark), which is never sampled: "
                             "use another eos_id or None")
        if (vocab if vocab_limit is None else vocab_limit) == 1 and forced[1] == 0:
            raise ValueError(f"vocab_limit={vocab_limit} (vocab_size={vocab}) leaves only token 0, the token "
                             f"{type(module).__name__} forces (never sampled): nothing to sample")
    rng = _key(rng)
    lengths = jnp.asarray(lengths)
    mesh = _check_mesh(mesh)
    fn = _generate_fn(type(module), module.config, max_new_tokens, float(temperature),
                      None if top_k is None else int(top_k),
                      None if top_p is None else float(top_p), num_samples, vocab_limit, eos_id, pad_id,
                      min_len, forced, mesh)
    if mesh is None:
        out, bad_step = fn(params, prompt_tokens, lengths, rng)
    else:
        from .training.mesh import activate
        params, prompt_tokens, lengths = _place_on_mesh(module, params, prompt_tokens, lengths, mesh)
        with activate(mesh):  # the model's activation constraints on: the KV cache is split as k / v
            out, bad_step = fn(params, prompt_tokens, lengths, rng)
    bad_step = concrete(bad_step)  # waits for the result; None under an outer jit (not checked there)
    if bad_step is not None:
        _refuse_unusable(bad_step, module)
    return out
