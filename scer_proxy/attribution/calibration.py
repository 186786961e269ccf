"""The joules per prompt token, calibrated from interval energies by non-negative least squares."""

from __future__ import annotations

import itertools

from scer_proxy.attribution.fitting import solve_linear

MIN_CALIBRATION_INTERVALS = 6  # intervals with prefill in them before the fit is trusted


class Calibration:
    """Non-negative least squares of interval energy on (prompt tokens, decode steps, decode tokens, idle s).

    A prompt token costs a fixed energy, a decode step ``c0 + c1 x batch`` (``c0`` per step, ``c1`` per
    decode token), idle time the idle power. Sufficient statistics with exponential forgetting (about
    ``window`` intervals), solved exactly for the four unknowns over the subsets of free coefficients.
    """

    def __init__(self, window: int = 512) -> None:
        self.decay = 1.0 - 1.0 / window
        self.xtx = [[0.0] * 4 for _ in range(4)]
        self.xty = [0.0] * 4
        self.intervals_with_prefill = 0
        self._solution: list[float] | None = None
        self._support: tuple[int, ...] = (0, 1, 2, 3)  # the coefficients free in the last solution

    def add(self, x: tuple[float, float, float, float], y: float) -> None:
        d = self.decay
        for i in range(4):
            self.xty[i] = self.xty[i] * d + x[i] * y
            row = self.xtx[i]
            for j in range(4):
                row[j] = row[j] * d + x[i] * x[j]
        if x[0] > 0:
            self.intervals_with_prefill += 1
        self._solution = None

    def solve(self) -> list[float] | None:
        """(J per prompt token, J per step, J per decode token, idle W), or None before enough prefill."""
        if self.intervals_with_prefill < MIN_CALIBRATION_INTERVALS:
            return None
        if self._solution is None:
            # Solved at every reading, on the event loop: the last solution's free set is tried first
            # and kept when it is still optimal (one small solve instead of fifteen).
            solution = self._on_support(self._support)
            if solution is None:
                solution = self._by_enumeration()
            self._solution = solution
            if solution is not None:
                self._support = tuple(i for i, c in enumerate(solution) if c > 0)
        return self._solution

    def _on_support(self, subset: tuple[int, ...]) -> list[float] | None:
        """The least squares with only ``subset`` free when it is the non-negative optimum (KKT: no free
        coefficient below zero, no fixed one whose increase would lower the residual); else None."""
        full = self._feasible(subset) if subset else None
        if full is None:
            return None
        for j in range(4):
            if j not in subset:
                # Half the gradient of the residual along coefficient j: X'X b - X'y.
                gradient = sum(self.xtx[j][k] * full[k] for k in range(4)) - self.xty[j]
                if gradient < 0:
                    return None
        return full

    def _by_enumeration(self) -> list[float] | None:
        """The non-negative least squares by trying every subset of free coefficients."""
        best: tuple[float, list[float]] | None = None
        for size in range(1, 5):
            for subset in itertools.combinations(range(4), size):
                full = self._feasible(subset)
                if full is None:
                    continue
                # Residual sum of squares up to the constant y'y: b'X'Xb - 2 b'X'y.
                quad = sum(full[i] * self.xtx[i][j] * full[j] for i in range(4) for j in range(4))
                rss = quad - 2 * sum(full[i] * self.xty[i] for i in range(4))
                if best is None or rss < best[0]:
                    best = (rss, full)
        return best[1] if best is not None else None

    def _feasible(self, subset: tuple[int, ...]) -> list[float] | None:
        """The least squares with only ``subset`` free, as all four coefficients, when none is negative."""
        coef = solve_linear([[self.xtx[i][j] for j in subset] for i in subset], [self.xty[i] for i in subset])
        if coef is None or any(c < 0 for c in coef):
            return None
        full = [0.0] * 4
        for i, c in zip(subset, coef, strict=True):
            full[i] = c
        return full
