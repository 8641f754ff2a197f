"""Small synthetic sequence tasks with exactly checkable answers.

Every task is a pure function of its arguments (including ``seed``) and
returns ``(tokens, loss_mask)``:

* ``tokens``: ``int32 [N, T]``
* ``loss_mask``: ``float32 [N, T]``, 1.0 at the positions the model has to
  produce (the answer), 0.0 elsewhere.

For next-token training use ``inputs = tokens[:, :-1]``,
``targets = tokens[:, 1:]`` and ``weights = loss_mask[:, 1:]``; accuracy on
the answer is the mean of ``argmax == target`` over the weighted positions.
The first token of a sequence is never an answer token.

Small-vocabulary tasks (:func:`copying`, :func:`associative_recall`,
:func:`arithmetic`) share these special ids:

=====  ====  ===================================================
PAD    0     padding (copying: an odd length; the loaders' rows: after the packed examples)
BOS    1     start of every sequence
SEP    2     separator (copying: before the copy; arithmetic: before the answer)
QUERY  3     associative recall: "which value goes with the next key?"
EOS    4     end of an arithmetic sequence
=====  ====  ===================================================

Ordinary symbols start at ``N_SPECIAL = 5``.  :func:`passkey` is byte-level
instead (ids are the ASCII bytes of an English-like text, vocab 256).

Held-out problems.  A task's *problem* is an example's prompt: its tokens before its first
answer position (``loss_mask > 0``: the string to copy, the pairs and the query, the text
before the pass key), or its first ``prompt_len`` tokens where the task says so (the operands
of a sum, ``BOS a + b =``: :func:`arithmetic_prompt_length`, whatever ``worked_steps`` /
``answer_only`` make of the rest).  What follows the prompt (answer, worked steps, padding)
and the example's length do not enter.  A
fixed ``1 / HELDOUT_EVERY`` of every task's problem space, chosen by a hash of the problem
(:func:`is_heldout`), is held out: :func:`draw_split` draws a task's examples from the
training problems (``split="train"``) or only from the held-out ones (``"heldout"``), so a
validation set never repeats a training problem, however small the space (3-digit sums: 10^6
problems, of which a long run draws a sizeable share).  The data loaders train on ``"train"``
and validate on ``"heldout"`` (:mod:`jaxformers.data.loader`).
"""

from __future__ import annotations

import numpy as np

from ..utils import int_arg, is_int

__all__ = [
    "ARITH_CHARS",
    "ARITH_VOCAB_SIZE",
    "BOS",
    "EOS",
    "N_SPECIAL",
    "PAD",
    "PASSKEY_VOCAB_SIZE",
    "QUERY",
    "SEP",
    "arithmetic",
    "arithmetic_length",
    "arithmetic_prompt_length",
    "associative_recall",
    "copying",
    "decode_arithmetic",
    "draw_split",
    "HELDOUT_EVERY",
    "is_heldout",
    "problem_hash",
    "passkey",
]

PAD, BOS, SEP, QUERY, EOS = 0, 1, 2, 3, 4
N_SPECIAL = 5


def _int(task: str, name: str, value, lo: int | None = None) -> int:
    """``value`` as a Python int (:func:`jaxformers.utils.int_arg`, messages prefixed by ``task``)."""
    return int_arg(name, value, lo, where=task)


def _flag(task: str, name: str, value) -> bool:
    """A bool argument: ``True`` / ``False`` (or 1 / 0); a string such as ``"no"`` is refused."""
    if isinstance(value, (bool, np.bool_)) or (is_int(value) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{task}: {name} must be a bool, got {value!r}")


def _rng(task: str, seed) -> np.random.Generator:
    return np.random.default_rng(_int(task, "seed", seed, lo=0))


def _check_n(task: str, n) -> int:
    return _int(task, "n", n, lo=1)


# ---------------------------------------------------------------------------
# held-out problems

HELDOUT_EVERY = 16
SPLITS = (None, "train", "heldout")
_MAX_ROUNDS = 40


def _mix64(z):
    """splitmix64's finaliser on ``uint64`` arrays: every output bit depends on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def problem_hash(tokens, loss_mask, prompt_len=None) -> np.ndarray:
    """``uint64 [N]``: a hash of each example's problem (``tokens`` / ``loss_mask`` ``[N, T]``, any
    integer dtype): its first ``prompt_len`` tokens, or (``None``) its tokens before its first
    answer position (``loss_mask > 0``; all of them if it has none).  Every (position, token)
    pair of the prompt mixed on its own, summed modulo 2^64, mixed again with the prompt's
    length (one vectorised pass: the data loader hashes every training row)."""
    tokens, mask = np.asarray(tokens), np.asarray(loss_mask)
    if tokens.ndim != 2 or mask.shape != tokens.shape or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens and loss_mask must be [N, T] arrays of one shape (integer tokens), got "
                         f"tokens {tokens.dtype} {tokens.shape} and loss_mask {mask.shape}")
    n, t = tokens.shape
    if prompt_len is None:
        answer = mask > 0
        first = np.where(answer.any(axis=1), answer.argmax(axis=1), t).astype(np.uint64)
    else:
        prompt_len = int_arg("prompt_len", prompt_len, lo=1)
        if prompt_len > t:
            raise ValueError(f"prompt_len must be <= the examples' length {t}, got {prompt_len}")
        first = np.full(n, prompt_len, np.uint64)
    x = tokens.astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        pos = np.arange(1, t + 1, dtype=np.uint64)
        mixed = np.where(pos[None] <= first[:, None], _mix64(x ^ (pos * np.uint64(0x9E3779B97F4A7C15))),
                         np.uint64(0))
        return _mix64(mixed.sum(axis=1, dtype=np.uint64) ^ first)


def is_heldout(tokens, loss_mask, prompt_len=None) -> np.ndarray:
    """``bool [N]``: the example's problem (:func:`problem_hash`) is one of the held-out
    ``1 / HELDOUT_EVERY``."""
    return problem_hash(tokens, loss_mask, prompt_len) % np.uint64(HELDOUT_EVERY) == 0


def draw_split(make, n: int, seed: int, split=None, prompt_len=None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples of one split: ``make(m, seed) -> (tokens, loss_mask)`` is a task with its
    parameters bound (e.g. ``lambda m, s: arithmetic(m, 3, seed=s)``); ``prompt_len``: the
    task's problem length, if not the tokens before the answer (:func:`problem_hash`; e.g.
    ``arithmetic_prompt_length(3)``).

    ``split``: ``None``, every problem (``make(n, seed)``); ``"train"``, only problems outside the
    held-out set; ``"heldout"``, only problems in it.  The examples are drawn in rounds (round
    ``r`` from a seed derived from ``(seed, r)``) and filtered, in order: a pure function of
    ``(n, seed, split)``.  ``ValueError`` if ``split`` is not one of those, or if the task's
    problem space holds none of the split's problems (a space of a few problems).
    """
    n = _check_n("draw_split", n)
    seed = _int("draw_split", "seed", seed, lo=0)
    if split not in SPLITS:
        raise ValueError(f"draw_split: split must be one of {list(SPLITS)}, got {split!r}")
    if split is None:
        return make(n, seed)
    want, rate = (True, 1 / HELDOUT_EVERY) if split == "heldout" else (False, 1 - 1 / HELDOUT_EVERY)
    tokens, masks, got = [], [], 0
    for r in range(_MAX_ROUNDS):
        m = int((n - got) / rate * 1.25) + 8
        t, mask = make(m, int(np.random.SeedSequence([seed, r, 0x5E1D]).generate_state(1, np.uint64)[0]))
        keep = is_heldout(t, mask, prompt_len) == want
        tokens.append(t[keep])
        masks.append(mask[keep])
        got += int(keep.sum())
        if got >= n:
            return np.concatenate(tokens)[:n], np.concatenate(masks)[:n]
    raise ValueError(f"draw_split: {got} of {n} examples of the {split!r} split after {_MAX_ROUNDS} rounds: "
                     f"this task's problem space has (almost) none of them (1 in {HELDOUT_EVERY} "
                     "problems is held out); use a larger task (more digits, symbols or length)")


# ---------------------------------------------------------------------------
# copying

#: the shortest copying sequence: ``BOS x SEP x``
COPYING_MIN_LENGTH = 4


def copying(n: int, seq_len: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Copy a random segment: ``BOS x_1..x_L SEP x_1..x_L [PAD]``.

    ``seq_len`` is the total length T; ``L = (T - 2) // 2`` symbols are drawn
    uniformly from ``[N_SPECIAL, vocab)``; one PAD fills an odd T.  The mask
    covers the second copy.
    """
    n = _check_n("copying", n)
    seq_len, vocab = _int("copying", "seq_len", seq_len), _int("copying", "vocab", vocab)
    if seq_len < COPYING_MIN_LENGTH:
        raise ValueError(f"copying: seq_len must be >= {COPYING_MIN_LENGTH}, got {seq_len}")
    if vocab <= N_SPECIAL:
        raise ValueError(f"copying: vocab must be > {N_SPECIAL} (the special ids), got {vocab}")
    if vocab > 2 ** 31:
        raise ValueError(f"copying: vocab must be <= 2**31 (int32 token ids), got {vocab}")
    length = (seq_len - 2) // 2
    x = _rng("copying", seed).integers(N_SPECIAL, vocab, size=(n, length), dtype=np.int32)
    tokens = np.full((n, seq_len), PAD, dtype=np.int32)
    mask = np.zeros((n, seq_len), dtype=np.float32)
    tokens[:, 0] = BOS
    tokens[:, 1:1 + length] = x
    tokens[:, 1 + length] = SEP
    tokens[:, 2 + length:2 + 2 * length] = x
    mask[:, 2 + length:2 + 2 * length] = 1.0
    return tokens, mask


# ---------------------------------------------------------------------------
# associative recall

_DENSE_KEY_DRAW = 2 ** 24  # floats per chunk of the keys' draw (and the n_keys up to which it is used)


def associative_recall(n: int, n_pairs: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Key-value recall: ``BOS k_1 v_1 ... k_P v_P QUERY k_q v_q`` (T = 2P + 4).

    The symbols ``[N_SPECIAL, vocab)`` are halved: keys come from the lower
    half (distinct within a sequence), values from the upper half (repeats
    allowed).  ``k_q`` is one of the keys, picked uniformly; the mask covers
    only the final ``v_q``.  Keys are an argsort of ``[n, n_keys]`` uniform floats, drawn in
    chunks of at most ``2**24`` floats (one draw's stream, without a GPT-2-size vocabulary and
    ``n = 10_000`` needing 4 GB for the floats and their argsort); past ``n_keys = 2**24`` they are
    drawn row by row without replacement (another random stream).
    """
    n = _check_n("associative_recall", n)
    n_pairs, vocab = _int("associative_recall", "n_pairs", n_pairs), _int("associative_recall", "vocab", vocab)
    n_keys = (vocab - N_SPECIAL) // 2
    n_vals = vocab - N_SPECIAL - n_keys
    if n_pairs < 1 or n_pairs > n_keys:
        raise ValueError(f"associative_recall: need 1 <= n_pairs <= (vocab - {N_SPECIAL}) // 2 = {n_keys}, "
                         f"got n_pairs={n_pairs}, vocab={vocab}")
    if vocab > 2 ** 31:
        raise ValueError(f"associative_recall: vocab must be <= 2**31 (int32 token ids), got {vocab}")
    rng = _rng("associative_recall", seed)
    if n_keys <= _DENSE_KEY_DRAW:  # one float per candidate key and row, in chunks of rows: the
        keys = np.empty((n, n_pairs), np.int32)  # same stream as one [n, n_keys] draw, bounded memory
        step = max(1, _DENSE_KEY_DRAW // n_keys)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            keys[lo:hi] = np.argsort(rng.random((hi - lo, n_keys)), axis=1)[:, :n_pairs]
    else:  # a huge vocabulary: distinct keys row by row, without a float per key
        keys = np.stack([rng.choice(n_keys, n_pairs, replace=False) for _ in range(n)]).astype(np.int32)
    keys += N_SPECIAL
    vals = rng.integers(0, n_vals, size=(n, n_pairs), dtype=np.int32) + N_SPECIAL + n_keys
    q = rng.integers(0, n_pairs, size=n)
    seq_len = 2 * n_pairs + 4
    tokens = np.empty((n, seq_len), dtype=np.int32)
    tokens[:, 0] = BOS
    tokens[:, 1:1 + 2 * n_pairs:2] = keys
    tokens[:, 2:2 + 2 * n_pairs:2] = vals
    rows = np.arange(n)
    tokens[:, -3] = QUERY
    tokens[:, -2] = keys[rows, q]
    tokens[:, -1] = vals[rows, q]
    mask = np.zeros((n, seq_len), dtype=np.float32)
    mask[:, -1] = 1.0
    return tokens, mask


# ---------------------------------------------------------------------------
# passkey retrieval (byte level)

PASSKEY_VOCAB_SIZE = 256
_FILLER = ("The tide comes in and the tide goes out. Birds cross the grey sky. "
           "A cart rolls slowly down the long road. ")
_QUESTION = " What is the pass key? The pass key is "


def _needle(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_min_length(n_digits: int) -> int:
    """The shortest passkey sequence for ``n_digits``: needle, question and answer, no filler."""
    return len(_needle("0" * n_digits)) + len(_QUESTION) + n_digits


def passkey(n: int, length: int, n_digits: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Find a number hidden in filler text (byte-level, ASCII ids, vocab 256).

    Each sequence is exactly ``length`` bytes::

        <filler[:pos]> The pass key is K. Remember it. K is the pass key. <filler[pos:]>
         What is the pass key? The pass key is K

    with ``K`` a random ``n_digits``-digit number (no leading zero) and the
    needle inserted at a uniform random character depth ``pos`` of the
    filler.  The mask covers the final ``n_digits`` bytes (the answer).
    """
    n = _check_n("passkey", n)
    length, n_digits = _int("passkey", "length", length), _int("passkey", "n_digits", n_digits)
    if not 1 <= n_digits <= 18:
        raise ValueError(f"passkey: n_digits must be in [1, 18], got {n_digits}")
    fixed = passkey_min_length(n_digits)
    if length < fixed:
        raise ValueError(f"passkey: length must be >= {fixed} for n_digits={n_digits}, got {length}")
    rng = _rng("passkey", seed)
    n_fill = length - fixed
    filler = (_FILLER * (n_fill // len(_FILLER) + 1))[:n_fill]
    keys = rng.integers(10 ** (n_digits - 1), 10 ** n_digits, size=n, dtype=np.int64)
    depth = rng.integers(0, n_fill + 1, size=n)
    tokens = np.empty((n, length), dtype=np.int32)
    for i in range(n):
        key = str(int(keys[i]))
        text = filler[:depth[i]] + _needle(key) + filler[depth[i]:] + _QUESTION + key
        tokens[i] = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    mask = np.zeros((n, length), dtype=np.float32)
    mask[:, length - n_digits:] = 1.0
    return tokens, mask


# ---------------------------------------------------------------------------
# multi-digit addition with worked carry steps

ARITH_CHARS = "0123456789+=;"
ARITH_VOCAB_SIZE = N_SPECIAL + len(ARITH_CHARS)  # 18
_DIGIT0 = N_SPECIAL
_PLUS, _EQ, _SEMI = (N_SPECIAL + ARITH_CHARS.index(c) for c in "+=;")
_STEP_LEN = 9  # a_i + b_i + c_i = c_{i+1} s_i ;


def arithmetic_prompt_length(n_digits: int) -> int:
    """Length of an :func:`arithmetic` example's problem, ``BOS a + b =`` (its held-out key)."""
    return 2 * _int("arithmetic_prompt_length", "n_digits", n_digits, lo=1) + 3


def arithmetic_length(n_digits: int, worked_steps: bool = True) -> int:
    """Sequence length produced by :func:`arithmetic`."""
    n_digits = _int("arithmetic_length", "n_digits", n_digits, lo=1)
    worked_steps = _flag("arithmetic_length", "worked_steps", worked_steps)
    return 3 * n_digits + 5 + ((_STEP_LEN * n_digits + 1) if worked_steps else 0)


def arithmetic(n: int, n_digits: int, worked_steps: bool = True, seed: int = 0, *,
               answer_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Addition of two ``n_digits``-digit numbers (leading zeros kept), vocab ``ARITH_VOCAB_SIZE``.

    As text (see :func:`decode_arithmetic`; ``^`` = BOS, ``|`` = SEP, ``$`` = EOS)::

        ^0472+0851=2+1+0=03;7+5+0=12;4+8+1=13;0+0+1=01;|01323$     (worked_steps)
        ^0472+0851=01323$                                           (no steps)

    Operands and the answer (``n_digits + 1`` digits) are written most
    significant digit first; the worked steps go from the least significant
    digit: ``a_i + b_i + carry_in = carry_out sum_digit ;``.  The mask covers
    everything after the first ``=`` (steps, SEP, answer, EOS), or only the
    answer digits with ``answer_only=True``.
    """
    n = _check_n("arithmetic", n)
    n_digits = _int("arithmetic", "n_digits", n_digits, lo=1)
    worked_steps = _flag("arithmetic", "worked_steps", worked_steps)
    answer_only = _flag("arithmetic", "answer_only", answer_only)
    rng = _rng("arithmetic", seed)
    a = rng.integers(0, 10, size=(n, n_digits), dtype=np.int32)  # MSB first
    b = rng.integers(0, 10, size=(n, n_digits), dtype=np.int32)
    # column-wise addition, least significant first
    carry = np.zeros(n, dtype=np.int32)
    carries_in, sums = [], []
    for i in range(n_digits - 1, -1, -1):
        carries_in.append(carry)
        total = a[:, i] + b[:, i] + carry
        sums.append(total % 10)
        carry = total // 10
    answer = np.stack([carry] + sums[::-1], axis=1)  # MSB first, n_digits + 1 digits

    seq_len = arithmetic_length(n_digits, worked_steps)
    tokens = np.empty((n, seq_len), dtype=np.int32)
    mask = np.zeros((n, seq_len), dtype=np.float32)
    tokens[:, 0] = BOS
    pos = 1
    tokens[:, pos:pos + n_digits] = a + _DIGIT0
    pos += n_digits
    tokens[:, pos] = _PLUS
    tokens[:, pos + 1:pos + 1 + n_digits] = b + _DIGIT0
    pos += 1 + n_digits
    tokens[:, pos] = _EQ
    prompt_end = pos + 1
    pos += 1
    if worked_steps:
        for k in range(n_digits):  # k-th least significant column
            i = n_digits - 1 - k
            c_out = (a[:, i] + b[:, i] + carries_in[k]) // 10
            tokens[:, pos:pos + _STEP_LEN] = np.stack([
                a[:, i] + _DIGIT0, np.full(n, _PLUS), b[:, i] + _DIGIT0, np.full(n, _PLUS),
                carries_in[k] + _DIGIT0, np.full(n, _EQ), c_out + _DIGIT0, sums[k] + _DIGIT0,
                np.full(n, _SEMI)], axis=1)
            pos += _STEP_LEN
        tokens[:, pos] = SEP
        pos += 1
    tokens[:, pos:pos + n_digits + 1] = answer + _DIGIT0
    if answer_only:
        mask[:, pos:pos + n_digits + 1] = 1.0
    else:
        mask[:, prompt_end:] = 1.0
    pos += n_digits + 1
    tokens[:, pos] = EOS
    assert pos + 1 == seq_len
    return tokens, mask


def decode_arithmetic(row) -> str:
    """Render one arithmetic sequence as text (PAD dropped, ``^``/``|``/``$`` for BOS/SEP/EOS)."""
    names = {BOS: "^", SEP: "|", EOS: "$", QUERY: "?", PAD: ""}
    arr = np.asarray(row)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):  # 5.0 / 5.7 / True were read as ids
        raise ValueError(f"row must hold integer ids, got dtype {arr.dtype}")
    out = []
    for t in arr.reshape(-1).tolist():
        if t in names:
            out.append(names[t])
        elif N_SPECIAL <= t < ARITH_VOCAB_SIZE:
            out.append(ARITH_CHARS[t - N_SPECIAL])
        else:
            raise ValueError(f"id {t} is not in the arithmetic vocabulary")
    return "".join(out)
