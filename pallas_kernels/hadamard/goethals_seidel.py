"""Hadamard matrices of order ``4 n`` from four circulant +-1 matrices (Goethals-Seidel).

For the factor sizes the Paley constructions miss (52, 92, 100, 116, 156, 172, 244 up to 256;
172 is LLaMA-2-7B's ``11008 = 172 * 64``): if ``A, B, C, D`` are circulant ``[n, n]`` +-1
matrices with

    A A^T + B B^T + C C^T + D D^T = 4 n I                                   (1)

(equivalently: at every frequency ``k != 0`` the four sequences' power spectra
``|DFT(a)_k|^2`` sum to ``4 n``), then with ``R`` the reversal (back-diagonal) matrix

    H = [[ A,    B R,      C R,      D R    ],
         [-B R,  A,        D^T R,   -C^T R  ],
         [-C R, -D^T R,    A,        B^T R  ],
         [-D R,  C^T R,   -B^T R,    A      ]]

has +-1 entries and ``H H^T = 4 n I`` (Goethals & Seidel 1967).

The four first rows in :data:`SEQUENCES` were found by :func:`find_sequences` (this file; run
``python -m pallas_kernels.hadamard.goethals_seidel N`` to redo one): each sequence is -1 on
a union of orbits of a multiplier subgroup ``<g>`` of ``Z_n^*`` acting on ``Z_n`` (a
cyclotomic-class union), so its power spectrum is constant on the orbits of ``<g>`` on the
frequencies; the search lists every such sequence whose spectrum stays <= ``4 n``, and
matches pairs ``(a, b)`` against pairs ``(c, d)`` with complementary spectra (meet in the
middle).  Subgroups are tried from the largest down; the first match is kept.  No search
here finds ``n = 47`` or ``59`` (factors 188, 236): those sizes stay unsupported.

The authors' code (spcl/QuaRot ``hadamard_utils.py``) stores other Hadamard matrices of these
orders; any Hadamard matrix gives the same computational invariance.
"""
from __future__ import annotations

import functools
import math
import sys

import numpy as np

from .._common import check_int

# n -> the first rows of A, B, C, D ("+" = 1, "-" = -1), as find_sequences(n) returns them
SEQUENCES = {
    13: ("-+--++++++--+", "-+--++++++--+", "+-+++-++-+++-", "--+++-++-+++-"),
    23: (
        "+--++-+-+-++++-+-+-++--", "+++---++--++++--++---++", "+--+-+-++++++++++-+-+--",
        "-++-++---++++++---++-++"),
    25: (
        "--++-++--+-++++-+--++-++-", "+-+--+-++--++++--++-+--+-", "+-++---++++++++++++---++-",
        "+-+---+---++++++---+---+-"),
    29: (
        "-+-+-++++--+--++--+--++++-+-+", "+++-++-++++---++---++++-++-++", "+--+-++---++++++++++---++-+--",
        "+-+-++---+--++++++--+---++-+-"),
    39: (
        "-+-+-+--+---++++--+--+-+++++++-+--+-+++", "-+++-+-++-++--++++-+---+++--++-+--+++++",
        "------++-+--+++--+++-+-+--++++++-+++-++", "------++-+--+++--+++-+-+--++++++-+++-++"),
    43: (
        "+-----++-++--+++-++----++++-++++--+-+-+-+--", "+-+----+++---+++-++---+--++++++-+-+-+--+--+",
        "---+-+++-++-++++-++++--++++-++++-++-+++-+--", "+-----++-++--+++-++----++++-++++--+-+-+-+--"),
    61: (
        "++---+---+--++-++---+-+++++---+-+++----+--+-+++++-++-+--+++--",
        "--++-+-+-----+-++-+---+++-++--+-++-----+++--+++-+-++++-++---+",
        "+-----+-+-++++-+++---++++++-++++++-+-++---+++--+--++-++-++-+-",
        "+-----+-+-++++-+++---++++++-++++++-+-++---+++--+--++-++-++-+-"),
}


def sizes():
    """The orders ``4 n`` this file builds."""
    return sorted(4 * n for n in SEQUENCES)


def _circulant(a: np.ndarray) -> np.ndarray:
    """Row i is ``a`` rotated right by i: ``M[i, j] = a[(j - i) mod n]``."""
    n = len(a)
    return a[(np.arange(n)[None, :] - np.arange(n)[:, None]) % n]


def array(a, b, c, d) -> np.ndarray:
    """The Goethals-Seidel array of four +-1 first rows (int64 ``[4n, 4n]``); ``ValueError``
    unless the result is Hadamard (``H H^T = 4 n I``), i.e. unless (1) holds."""
    a, b, c, d = (np.asarray(s, np.int64) for s in (a, b, c, d))
    n = len(a)
    A, B, C, D = map(_circulant, (a, b, c, d))
    r = np.eye(n, dtype=np.int64)[::-1]
    h = np.block([[A, B @ r, C @ r, D @ r],
                  [-B @ r, A, D.T @ r, -C.T @ r],
                  [-C @ r, -D.T @ r, A, B.T @ r],
                  [-D @ r, C.T @ r, -B.T @ r, A]])
    if not np.array_equal(h @ h.T, 4 * n * np.eye(4 * n, dtype=np.int64)):
        raise ValueError(f"the four sequences of length {n} do not satisfy "
                         "A A^T + B B^T + C C^T + D D^T = 4 n I")
    return h


def _decode(row: str) -> np.ndarray:
    return np.array([1 if ch == "+" else -1 for ch in row], np.int64)


@functools.lru_cache(maxsize=None)
def matrix(m: int) -> np.ndarray:
    """``H_m`` (int64 +-1) for ``m`` in :func:`sizes`."""
    if not isinstance(m, (int, np.integer)) or isinstance(m, bool):
        raise ValueError(f"the order must be an int, got {m!r}")
    if m % 4 or m // 4 not in SEQUENCES:
        raise ValueError(f"no Goethals-Seidel table for order {m}; available: {sizes()}")
    return array(*(_decode(s) for s in SEQUENCES[m // 4]))


# ----------------------------------------------------------------------------- the search
def _orbits(n: int, g: int):
    out, seen = [], set()
    for x in range(n):
        if x not in seen:
            orbit, y = [], x
            while y not in orbit:
                orbit.append(y)
                y = y * g % n
            seen.update(orbit)
            out.append(sorted(orbit))
    return out


def _order(g: int, n: int) -> int:
    k, y = 1, g % n
    while y != 1:
        y, k = y * g % n, k + 1
    return k


def _search_subgroup(n: int, g: int, max_orbits: int, max_pairs: int):
    orbits = _orbits(n, g)
    if len(orbits) > max_orbits:
        return None
    bits = (np.arange(1 << len(orbits))[:, None] >> np.arange(len(orbits))) & 1
    member = np.zeros((len(orbits), n))
    for i, orbit in enumerate(orbits):
        member[i, orbit] = 1
    seqs = 1 - 2 * (bits @ member)                       # -1 on the chosen orbits
    reps = [orbit[0] for orbit in orbits]                # the spectrum is constant on orbits
    psd = np.abs(np.fft.fft(seqs, axis=1)[:, reps]) ** 2
    ok = (psd <= 4 * n + 1e-6).all(1)
    seqs, psd = seqs[ok], psd[ok]
    if not len(seqs) or len(seqs) * (len(seqs) + 1) // 2 > max_pairs:
        return None
    # every pair (a <= b) with its summed spectrum hashed to one int64 (chunked: bounded
    # memory); (a, b) and (c, d) match when the spectra are complementary: sum = 4 n
    weights = np.random.default_rng(0).integers(1, 2 ** 62, psd.shape[1], dtype=np.int64)
    keys, comps, firsts, seconds = [], [], [], []
    for i in range(len(seqs)):
        j = np.arange(i, len(seqs))
        total = psd[i] + psd[j]
        ok = (total <= 4 * n + 1e-6).all(1)
        total, j = total[ok], j[ok]
        keys.append(np.round(total * 1000).astype(np.int64) @ weights)
        comps.append(np.round((4 * n - total) * 1000).astype(np.int64) @ weights)
        firsts.append(np.full(len(j), i, np.int32))
        seconds.append(j.astype(np.int32))
    keys, comps = np.concatenate(keys), np.concatenate(comps)
    firsts, seconds = np.concatenate(firsts), np.concatenate(seconds)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    at = np.searchsorted(sorted_keys, comps)
    hit = np.nonzero((at < len(keys)) & (sorted_keys[np.minimum(at, len(keys) - 1)] == comps))[0]
    for t in hit:
        u = order[at[t]]
        cand = [seqs[k].astype(np.int64) for k in (firsts[u], seconds[u], firsts[t], seconds[t])]
        try:
            array(*cand)
        except ValueError:   # a hash or rounding coincidence: keep looking
            continue
        return cand
    return None


def find_sequences(n: int, *, max_orbits: int = 16, max_pairs: int = 100_000_000):
    """Four +-1 sequences of length ``n`` satisfying (1), each a union of orbits of one
    multiplier subgroup (largest subgroups first), or None.  Seconds for the table's n
    (up to a minute for 29)."""
    n = check_int("n", n)
    units = [g for g in range(2, n) if math.gcd(g, n) == 1]
    tried = set()
    for g in sorted(units, key=lambda g: -_order(g, n)):
        order = _order(g, n)
        if order in tried:
            continue
        tried.add(order)
        found = _search_subgroup(n, g, max_orbits, max_pairs)
        if found is not None:
            return found
    return None


def _format(seqs) -> tuple:
    return tuple("".join("+" if v > 0 else "-" for v in s) for s in seqs)


if __name__ == "__main__":  # python -m pallas_kernels.hadamard.goethals_seidel 43
    for arg in sys.argv[1:] or map(str, SEQUENCES):
        found = find_sequences(int(arg))
        print(int(arg), _format(found) if found is not None else None)
