"""How close nora.fit_rational gets to common activations, next to a direct least-squares fit.

    pip install scipy && python dev/fits.py             # prints the table in dev/RESULTS.md

For each activation: the max |error| on [-8, 8] of fit_rational at its defaults (weighted towards
0 on [-12, 12], nora.preactivation_weight), and of a direct fit of the same weighted objective by
scipy's least_squares (a trust-region solver nora.py does not use) from several starts: the
linearised fit, its denominator's absolute value, and 20 random perturbations of those (seeded);
the best of them. Then the same two columns for an unweighted fit on [-8, 8]. Development only:
scipy is not a dependency.
"""
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import least_squares

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nora  # noqa: E402

ACTIVATIONS = {
    "GELU": F.gelu, "tanh-GELU": lambda x: F.gelu(x, approximate="tanh"), "SiLU": F.silu, "ReLU": F.relu,
    "ReLU6": F.relu6, "Hardswish": F.hardswish, "Mish": F.mish, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "ELU": F.elu, "LeakyReLU (0.01)": lambda x: F.leaky_relu(x, 0.01),
}


def direct_fit(fn, start, x_range, weight, points=4001, tries=20):
    """scipy least_squares on the weighted error of P/(1+|S|) from ``start`` and perturbations of it."""
    x = np.linspace(*x_range, points)
    f = fn(torch.from_numpy(x)).numpy()
    root_weight = np.ones_like(x) if weight is None else np.sqrt(weight(torch.from_numpy(x)).numpy())
    V, W = x[:, None] ** np.arange(6), x[:, None] ** np.arange(1, 5)
    residual = lambda c: root_weight * (V @ c[:6] / (1 + np.abs(W @ c[6:])) - f)
    start = np.asarray(start)
    starts = [start, np.concatenate([start[:6], np.abs(start[6:])])]
    rng = np.random.default_rng(0)
    starts += [s * (1 + 0.3 * rng.standard_normal(10)) for s in starts for _ in range(tries // 2)]
    best = min((least_squares(residual, s, x_scale="jac", max_nfev=2000) for s in starts), key=lambda r: r.cost)
    return best.x[:6], best.x[6:]


def linearised(fn, x_range, weight):
    """The Sanathanan-Koerner start alone (fit_rational's first stage), as a direct fit's start."""
    x = torch.linspace(*x_range, 4001, dtype=torch.float64)
    f, V, W = fn(x), x[:, None] ** torch.arange(6), x[:, None] ** torch.arange(1, 5)
    root_weight = torch.ones_like(x) if weight is None else weight(x).sqrt()
    w = root_weight
    for _ in range(30):
        c = torch.linalg.lstsq(torch.cat([V, -f[:, None] * W], 1) * w[:, None], (f * w)[:, None], driver="gelsd").solution[:, 0]
        w = root_weight / (1 + (W @ c[6:]).abs())
    return c.numpy()


def main():
    rows = ["| activation | fit_rational, weighted on [-12, 12] | direct fit, same objective | "
            "fit_rational, unweighted on [-8, 8] | direct fit, same objective |", "|---|---|---|---|---|"]
    for name, fn in ACTIVATIONS.items():
        cells = []
        for x_range, weight in (((-12.0, 12.0), nora.preactivation_weight), ((-8.0, 8.0), None)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")               # the poor fits warn; the table says so
                ours = nora.fit_rational(fn, x_range=x_range, weight=weight)
            direct = direct_fit(fn, linearised(fn, x_range, weight), x_range, weight)
            cells += [f"{nora.fit_error(fn, *ours)[0]:.3g}", f"{nora.fit_error(fn, *direct)[0]:.3g}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    print("\nmax |error| on [-8, 8] of each fit\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
