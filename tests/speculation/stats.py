"""A chi-square test of homogeneity without scipy (not a dependency): the statistic and an upper quantile of
the chi-square distribution by the Wilson-Hilferty approximation (good to ~1% for 5+ degrees of freedom)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

Z_0_999 = 3.0902  # the standard normal's 0.999 quantile: a test that fails 1 time in 1000 by chance


def chi2_quantile(dof: int, z: float = Z_0_999) -> float:
    k = float(dof)
    return k * (1.0 - 2.0 / (9.0 * k) + z * math.sqrt(2.0 / (9.0 * k))) ** 3


def homogeneity(a: Sequence[Hashable], b: Sequence[Hashable], min_expected: float = 5.0) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom for "a and b come from the same distribution"; categories
    expected fewer than min_expected times in either sample are pooled into one."""
    count_a, count_b = Counter(a), Counter(b)
    n_a, n_b = len(a), len(b)
    total = n_a + n_b
    cells: list[tuple[int, int]] = []
    rare_a = rare_b = 0
    for category in set(count_a) | set(count_b):
        ca, cb = count_a[category], count_b[category]
        if (ca + cb) * min(n_a, n_b) / total < min_expected:
            rare_a, rare_b = rare_a + ca, rare_b + cb
        else:
            cells.append((ca, cb))
    if rare_a + rare_b:
        cells.append((rare_a, rare_b))
    statistic = 0.0
    for ca, cb in cells:
        column = ca + cb
        for observed, n in ((ca, n_a), (cb, n_b)):
            expected = column * n / total
            statistic += (observed - expected) ** 2 / expected
    return statistic, max(1, len(cells) - 1)
