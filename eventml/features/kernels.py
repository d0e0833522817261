"""Numba kernels of the batch feature path (`eventml.features.compute_features`).

Events and decisions arrive sorted by (entity, time). Each window bound of a decision is then
a pointer that only moves forward, so one merge walk keeps running counts per event filter at
every bound: a window count is the difference of two running counts, and an amount window is a
slice of that filter's amounts. The decision's bound visits every event once; the window starts
jump to an entity's start and visit only the events that leave a window. Nothing is
materialised per event and filter, so memory stays at the inputs plus the outputs.

Filters are numbered 0..F-1. An event matches a filter through its `code` = 2 * type +
has_amount (`type_members[code]` lists the filters that need only that), or through the
where-filters, which also need all their condition bits set in `cond`; `memberships` lists
each event's filters once, so the walk only follows the list.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numba as nb
import numpy as np

from eventml.home import interprocess_lock

US_PER_DAY_F = 86_400_000_000.0
# The "all" window as an offset: t - ALL lies before every timestamp, so its bound is the
# entity's first event. 2^62 keeps t - ALL clear of int64 overflow for any realistic t.
ALL = 1 << 62


@nb.njit(cache=True)
def _pairwise_sum(a, lo, n):
    """Sum of a[lo:lo+n] in exactly numpy's pairwise order (numpy/_core/src/umath/
    loops_utils.h.src), so batch sums equal `np.add.reduce` to the last bit."""
    if n < 8:
        res = -0.0
        for i in range(n):
            res += a[lo + i]
        return res
    if n <= 128:
        r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
        r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
        i = 8
        while i < n - (n % 8):
            r0 += a[lo + i]
            r1 += a[lo + i + 1]
            r2 += a[lo + i + 2]
            r3 += a[lo + i + 3]
            r4 += a[lo + i + 4]
            r5 += a[lo + i + 5]
            r6 += a[lo + i + 6]
            r7 += a[lo + i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[lo + i]
            i += 1
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum(a, lo, n2) + _pairwise_sum(a, lo + n2, n - n2)


@nb.njit(cache=True)
def entity_sort(h, heads, order):
    """Stable counting sort of rows by entity: the permutation, and rows per entity.

    heads: the sorted distinct entity hashes, which every h is one of; order: the row order to
    keep inside each entity (empty: as given). An open-addressing table finds a row's entity
    in O(1), so the cost is two passes over the rows rather than a comparison sort."""
    size = 16
    while size < 2 * len(heads):
        size *= 2
    slot_h = np.zeros(size, np.uint64)
    slot_c = np.full(size, -1, np.int64)
    for c in range(len(heads)):
        s = heads[c] & (size - 1)
        while slot_c[s] >= 0:
            s = (s + 1) & (size - 1)
        slot_h[s], slot_c[s] = heads[c], c
    n = len(h)
    code = np.empty(n, np.int64)
    cursor = np.zeros(len(heads) + 1, np.int64)
    for i in range(n):
        s = h[i] & (size - 1)
        while slot_c[s] < 0 or slot_h[s] != h[i]:  # h is present: probing ends at it
            s = (s + 1) & (size - 1)
        code[i] = slot_c[s]
        cursor[slot_c[s] + 1] += 1
    counts = cursor[1:].copy()
    cursor = np.cumsum(cursor)
    perm = np.empty(n, np.int64)
    for i in range(n):
        r = i if len(order) == 0 else order[i]
        perm[cursor[code[r]]] = r
        cursor[code[r]] += 1
    return perm, counts


@nb.njit(cache=True, nogil=True)
def memberships(code, cond, perm, type_members, where_id, where_type, where_need):
    """The filters each event matches, as CSR: ids[ptr[p]:ptr[p + 1]] for event p. `cond` is
    in input order (perm maps sorted to input rows): only where-filters' candidates read it."""
    n = len(code)
    ptr = np.zeros(n + 1, np.int64)
    ids = np.empty(n * (type_members.shape[1] + len(where_id)), np.int32)
    k = 0
    for p in range(n):
        c = code[p]
        for j in range(type_members.shape[1]):
            f = type_members[c, j]
            if f < 0:
                break
            ids[k] = f
            k += 1
        for j in range(len(where_id)):
            ty = where_type[j] >> 1  # where_type: 2 * type (-1: any) + needs an amount
            if (ty < 0 or ty == c >> 1) and (where_type[j] & 1 <= c & 1):
                if (cond[perm[p]] & where_need[j]) == where_need[j]:
                    ids[k] = where_id[j]
                    k += 1
        ptr[p + 1] = k
    return ptr, ids[:k].copy()


@nb.njit(cache=True, nogil=True)
def compact_amounts(ptr, ids, amount, perm, is_amount):
    """The amounts of each amount filter's events, concatenated in event order, and where each
    filter's run starts (`start[f]`; only amount filters have one). `amount` is in input order
    (perm maps sorted to input rows), read only for the events that have one."""
    n_f = len(is_amount)
    size = np.zeros(n_f + 1, np.int64)
    for f in ids:
        size[f + 1] += is_amount[f]
    start = np.cumsum(size)
    fill = start[:-1].copy()
    vals = np.empty(start[-1], np.float64)
    for p in range(len(perm)):
        for j in range(ptr[p], ptr[p + 1]):
            f = ids[j]
            if is_amount[f]:
                vals[fill[f]] = amount[perm[p]]
                fill[f] += 1
    return vals, start


@nb.njit(cache=True, nogil=True)
def walk(
    e, t, ptr, ids, qe, qt, offsets, count_pairs, amount_pairs, vals, vstart, recency,
    bounds, counts, sums, means, maxes, days,
):  # fmt: skip
    """One merge walk of events and decisions. Bound b of decision q is the first event at or
    after (qe[q], qt[q] - offsets[b]); offsets[0] must be 0 (the decision itself) and
    offsets[1] ALL (the entity's start).

    Writes, per decision (the last axis), the bounds (B, Q); counts (len(count_pairs), Q) of
    filter f between bound b and the decision for each pair (b, f); sum, mean, max
    (len(amount_pairs), Q) of an amount filter's amounts likewise (0 / nan / nan when none);
    and days since the latest event of each filter in `recency` (nan when none). The outputs
    are the caller's, so that parts of one batch write their own decisions' columns in place."""
    n, n_q, n_b, n_f = len(e), len(qe), len(offsets), len(vstart) - 1
    pos = np.zeros(n_b, np.int64)
    cum = np.zeros((n_b, n_f), np.int64)  # matching events before each bound, per filter
    last = np.full(n_f, -1, np.int64)  # latest matching event before the decision
    entity = -1
    for q in range(n_q):
        # The decision's bound first. At an entity's first decision it passes what is left of
        # earlier entities, and every other bound jumps to the entity's start without visiting
        # those events: its running counts there are the decision bound's.
        p = pos[0]
        if entity != qe[q]:
            entity = qe[q]
            while p < n and e[p] < entity:
                for j in range(ptr[p], ptr[p + 1]):
                    cum[0, ids[j]] += 1
                    last[ids[j]] = p
                p += 1
            for b in range(1, n_b):
                pos[b] = p
                cum[b, :] = cum[0, :]
        while p < n and e[p] == entity and t[p] < qt[q]:
            for j in range(ptr[p], ptr[p + 1]):
                cum[0, ids[j]] += 1
                last[ids[j]] = p
            p += 1
        pos[0] = p
        bounds[0, q] = p
        # The window starts lie between the entity's start and the decision bound.
        for b in range(1, n_b):
            target = qt[q] - offsets[b]
            p = pos[b]
            while p < pos[0] and t[p] < target:
                for j in range(ptr[p], ptr[p + 1]):
                    cum[b, ids[j]] += 1
                p += 1
            pos[b] = p
            bounds[b, q] = p
        for j in range(len(count_pairs)):
            f = count_pairs[j, 1]
            counts[j, q] = cum[0, f] - cum[count_pairs[j, 0], f]
        for j in range(len(amount_pairs)):
            f = amount_pairs[j, 1]
            lo = cum[amount_pairs[j, 0], f]
            m = cum[0, f] - lo
            if m == 0:
                sums[j, q], means[j, q], maxes[j, q] = 0.0, np.nan, np.nan
                continue
            lo += vstart[f]
            # np.add.reduceat's order: the first value, plus the pairwise sum of the rest.
            s = vals[lo] + _pairwise_sum(vals, lo + 1, m - 1)
            mx = vals[lo]
            for i in range(lo + 1, lo + m):
                if vals[i] > mx:
                    mx = vals[i]
            sums[j, q], means[j, q], maxes[j, q] = s, s / m, mx
        for j in range(len(recency)):
            p = last[recency[j]]
            days[j, q] = (qt[q] - t[p]) / US_PER_DAY_F if p >= bounds[1, q] else np.nan


@nb.njit(cache=True, inline="always")
def _key(value_hash, bits):
    """A value's key within its entity: the hash bits an entity code would leave in a packed
    64-bit key (compat with comparing (entity, value) by one uint64), top bit set; 0: null."""
    if value_hash == 0:
        return np.uint64(0)
    return (value_hash >> bits) | np.uint64(1 << 63)


@nb.njit(cache=True)
def previous_same(e, hashes, bits):
    """prev[p]: the latest event before p of the same entity with the same value key (-1: none;
    nulls never match). Entities are contiguous runs, so one open-addressing table serves them
    all: a slot belongs to the current entity only while stamped with its code."""
    n = len(hashes)
    prev = np.full(n, -1, np.int64)
    longest, run = 0, 0
    for p in range(n):
        run = run + 1 if p > 0 and e[p] == e[p - 1] else 1
        longest = max(longest, run)
    size = 16
    while size < 2 * longest:
        size *= 2
    slot_key = np.zeros(size, np.uint64)
    slot_at = np.zeros(size, np.int64)
    slot_entity = np.full(size, -1, np.int64)
    for p in range(n):
        k = _key(hashes[p], bits)
        if k == 0:
            continue
        s = k & (size - 1)
        while slot_entity[s] == e[p] and slot_key[s] != k:
            s = (s + 1) & (size - 1)
        if slot_entity[s] == e[p]:
            prev[p] = slot_at[s]
        slot_entity[s], slot_key[s], slot_at[s] = e[p], k, p
    return prev


@nb.njit(cache=True, nogil=True)
def distinct_and_seen(e, hashes, bits, bounds, windows, q_hashes, distinct, seen):
    """Per decision, written into the caller's `distinct` (W, Q) and `seen` (Q): distinct
    values in each window (a bound row in `windows`), and earlier events with the decision's own
    value (q_hashes; 0: the decision has none → nan). Values are compared by `_key`.

    With prev[p] the previous event of the same entity and value, a window [lo, hi) holds as
    many distinct values as it has events whose previous occurrence lies before lo."""
    prev = previous_same(e, hashes, bits)
    n_q = bounds.shape[1]
    for q in range(n_q):
        seen[q] = np.nan
        hi = bounds[0, q]
        for j in range(len(windows)):
            lo = bounds[windows[j], q]
            c = 0
            for p in range(lo, hi):
                if hashes[p] != 0 and prev[p] < lo:
                    c += 1
            distinct[j, q] = c
        qk = _key(q_hashes[q], bits)
        if qk != 0:
            c = 0
            for p in range(bounds[1, q], hi):
                if _key(hashes[p], bits) == qk:
                    c += 1
            seen[q] = c


@nb.njit(cache=True)
def latest(e, t, codes, qe, qt):
    """Per column of codes (C, m) (negative: null) and per decision, the code of the latest row
    of the same entity before it with a value (nan when none); rows sorted by (entity, time)."""
    n, n_c, n_q = len(e), codes.shape[0], len(qe)
    out = np.empty((n_c, n_q), np.float64)
    last = np.full(n_c, -1, np.int64)
    p = 0
    for q in range(n_q):
        while p < n and (e[p] < qe[q] or (e[p] == qe[q] and t[p] < qt[q])):
            for c in range(n_c):
                if codes[c, p] >= 0:
                    last[c] = p
            p += 1
        for c in range(n_c):
            r = last[c]
            out[c, q] = codes[c, r] if r >= 0 and e[r] == qe[q] else np.nan
    return out


# ---------------------------------------------------------------- compiled once per machine

# Taken by every process of this machine to compile a kernel (or read its cache entry) for
# argument types it has not run with yet; `resources.bento` takes it to copy the cache.
COMPILE_LOCK = Path(tempfile.gettempdir()) / "eventml-numba-compile.lock"


def _first_calls_locked(kernel):
    """`kernel`, its first call per argument types in this process under COMPILE_LOCK. numba's
    cache index is one file per kernel that a compiling process rewrites whole: two processes
    compiling different argument types at once both take the next entry number, and the index
    can then point one type's entry at the other's machine code (`IndexDataCacheFile.save`).
    A fresh checkout's first steps side by side, or parallel test workers, compile at once."""
    seen: set[tuple] = set()

    @functools.wraps(kernel.py_func)
    def call(*args):
        types = tuple(nb.typeof(a) for a in args)
        if types in seen:
            return kernel(*args)
        with interprocess_lock(COMPILE_LOCK):
            result = kernel(*args)
        seen.add(types)
        return result

    return call


# The kernels Python calls (the others are called only from these, and compile inside them).
entity_sort = _first_calls_locked(entity_sort)
memberships = _first_calls_locked(memberships)
compact_amounts = _first_calls_locked(compact_amounts)
walk = _first_calls_locked(walk)
distinct_and_seen = _first_calls_locked(distinct_and_seen)
latest = _first_calls_locked(latest)
