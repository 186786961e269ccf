"""Small linear algebra for the pure core (a handful of unknowns; no numpy needed)."""

from __future__ import annotations

from collections.abc import Sequence


def solve_linear(a: Sequence[Sequence[float]], b: Sequence[float]) -> list[float] | None:
    """Solve ``a x = b`` by Gaussian elimination with partial pivoting; None when singular."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        scale = max(abs(m[r][col]) for r in range(n)) or 1.0
        if abs(m[pivot][col]) <= 1e-12 * scale:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] for i in range(n)]


def least_squares(x: Sequence[Sequence[float]], y: Sequence[float]) -> tuple[list[float], float]:
    """Ordinary least squares by the normal equations: (coefficients, residual standard deviation)."""
    n = len(x[0])
    xtx = [[sum(row[i] * row[j] for row in x) for j in range(n)] for i in range(n)]
    xty = [sum(row[i] * v for row, v in zip(x, y, strict=True)) for i in range(n)]
    coef = solve_linear(xtx, xty)
    if coef is None:
        raise ValueError("singular design: the columns are not independent")
    residuals = [v - sum(c * r for c, r in zip(coef, row, strict=True)) for row, v in zip(x, y, strict=True)]
    dof = max(1, len(y) - n)
    return coef, (sum(e * e for e in residuals) / dof) ** 0.5


class DecayedFit2:
    """Least squares of y on two regressors without intercept, over decayed sums (about ``window``
    observations); the sufficient statistics only, so one observation costs a few multiplications."""

    __slots__ = ("decay", "xtx", "xty")

    def __init__(self, window: float) -> None:
        self.decay = 1.0 - 1.0 / window
        self.xtx = [0.0, 0.0, 0.0]  # x0 x0, x0 x1, x1 x1
        self.xty = [0.0, 0.0]

    def add(self, x0: float, x1: float, y: float) -> None:
        d, xtx, xty = self.decay, self.xtx, self.xty
        xtx[0] = xtx[0] * d + x0 * x0
        xtx[1] = xtx[1] * d + x0 * x1
        xtx[2] = xtx[2] * d + x1 * x1
        xty[0] = xty[0] * d + x0 * y
        xty[1] = xty[1] * d + x1 * y

    def solve(self) -> list[float] | None:
        """The two coefficients, or None while the regressors do not tell them apart."""
        xtx = self.xtx
        return solve_linear([[xtx[0], xtx[1]], [xtx[1], xtx[2]]], self.xty)
