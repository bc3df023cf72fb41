"""Pairwise covering arrays: a few rows in which every pair of two factors' values appears at least once.

A rule names values that cannot go together (a configuration the code refuses). A pair of values that some
allowed row can hold is covered by an allowed row; a pair no allowed row can hold (directly refused, or
implied, such as two values that each need the other factor's different value) by a refused row. Rows are
built greedily and deterministically: each starts from the first uncovered pair and takes, factor by factor,
the value that covers most new pairs while the row can still be completed.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

Row = dict[str, object]
Pair = tuple[tuple[str, object], tuple[str, object]]


def matches(row: Mapping[str, object], rule: Mapping[str, object]) -> bool:
    """Whether `row` holds every value `rule` names."""
    return all(name in row and row[name] == value for name, value in rule.items())


def refusing_rules(row: Mapping[str, object], rules: Sequence[Mapping[str, object]]) -> list[int]:
    """Indices of the rules `row` breaks."""
    return [k for k, rule in enumerate(rules) if matches(row, rule)]


def pairs_of(row: Mapping[str, object], names: Sequence[str]) -> set[Pair]:
    """Every pair of (factor, value) that `row` holds, factors in `names` order."""
    present = [(name, row[name]) for name in names if name in row]
    return set(itertools.combinations(present, 2))


def _all_pairs(factors: Mapping[str, Sequence[object]]) -> set[Pair]:
    names = list(factors)
    return {
        ((a, x), (b, y)) for i, a in enumerate(names) for b in names[i + 1 :] for x in factors[a] for y in factors[b]
    }


def _allowed_rows(factors: Mapping[str, Sequence[object]], rules) -> list[Row]:
    names = list(factors)
    rows = (dict(zip(names, values, strict=True)) for values in itertools.product(*factors.values()))
    return [row for row in rows if not refusing_rules(row, rules)]


def _greedy_row(seed: Pair, factors, names, uncovered: set[Pair], allowed: list[Row]) -> Row:
    """An allowed row holding `seed`, each other factor set to the value that covers most uncovered pairs
    among those some allowed row still holds."""
    row: Row = dict(seed)
    pool = [candidate for candidate in allowed if matches(candidate, row)]
    for name in names:
        if name in row:
            continue
        possible = {candidate[name] for candidate in pool}
        gains = {
            value: sum(bool({((name, value), (o, row[o])), ((o, row[o]), (name, value))} & uncovered) for o in row)
            for value in factors[name]
            if value in possible
        }
        row[name] = max(gains, key=gains.get)  # the first of equal gains: deterministic
        pool = [candidate for candidate in pool if candidate[name] == row[name]]
    return {name: row[name] for name in names}


def covering_rows(
    factors: Mapping[str, Sequence[object]],
    rules: Sequence[Mapping[str, object]],
    *,
    already: Sequence[Row] = (),
) -> tuple[list[Row], list[Row]]:
    """(allowed rows, refused rows) covering every pair of `factors`' values that `already` leaves uncovered."""
    names = list(factors)
    allowed = _allowed_rows(factors, rules)
    feasible = set().union(*(pairs_of(row, names) for row in allowed)) if allowed else set()
    uncovered = _all_pairs(factors) - set().union(set(), *(pairs_of(row, names) for row in already))

    runs: list[Row] = []
    for seed in sorted(uncovered & feasible, key=repr):
        if seed not in uncovered:
            continue
        row = _greedy_row(seed, factors, names, uncovered, allowed)
        runs.append(row)
        uncovered -= pairs_of(row, names)

    refused: list[Row] = []
    defaults = {name: values[0] for name, values in factors.items()}
    for seed in sorted(uncovered, key=repr):
        if seed not in uncovered:
            continue
        row = {**defaults, **dict(seed)}
        refused.append(row)
        uncovered -= pairs_of(row, names)
    return runs, refused
