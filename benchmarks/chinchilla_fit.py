"""Chinchilla-form fit: our vectorised multi-start against a plain per-start scipy loop (not
a test).

Generates synthetic points from Besiroglu et al. 2024's refit of Chinchilla
(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658) at log-uniform N in [7e7, 1.6e10]
and D in [5e9, 5e11], times log-normal noise (sigma 0.01 by default). Times
``fit_chinchilla`` over the 4,500-start Chinchilla grid (without and with its default 200
bootstrap resamples) and, in the same run, the reference: scipy's L-BFGS-B (analytic gradient,
the same bounds and tolerances) from every start, one after another. By default the reference
runs on every 10th start and its time is extrapolated to the whole grid (the JSON says so);
``--reference-stride 1`` runs it on all. Both optimisers are also run on the same subset, whose
best losses must agree to 1e-6 relative. Target: the fit over the grid under 30 s.

    python benchmarks/chinchilla_fit.py [--points 250] [--reference-stride 10] [--no-reference]
    python benchmarks/chinchilla_fit.py --smoke   # seconds; writes nothing unless --out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import scipy

from orchestrator.analysis.chinchilla import (
    LSEObjective,
    chinchilla_bounds,
    multistart,
    reference_multistart,
)
from orchestrator.analysis.fit import default_starts, fit_chinchilla

RESULTS = Path(__file__).parent / "results"
TARGET_SECONDS = 30.0
BESIROGLU = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


def synthetic(points: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, L) from Besiroglu et al.'s law with log-normal noise."""
    rng = np.random.default_rng(seed)
    n = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), points))
    d = np.exp(rng.uniform(np.log(5e9), np.log(5e11), points))
    p = BESIROGLU
    loss = p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]
    return n, d, loss * np.exp(rng.normal(0.0, noise, points))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=250)
    parser.add_argument("--noise", type=float, default=0.01, help="sigma of log-normal noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed fits (median reported)")
    parser.add_argument(
        "--reference-stride",
        type=int,
        default=10,
        help="reference on every k-th start, extrapolated (1: all)",
    )
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="60 points, 1/50 of the grid")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    starts = default_starts()
    if args.smoke:
        args.points, args.repeats, args.reference_stride = 60, 1, 5
        starts = starts[::50]
    out_path = args.out or (None if args.smoke else RESULTS / "chinchilla_fit.json")

    n, d, loss = synthetic(args.points, args.noise, args.seed)
    load_before = os.getloadavg()
    fits, fit_s = [], []
    for _ in range(args.repeats):
        result, seconds = timed(lambda: fit_chinchilla(n, d, loss, bootstrap=0, starts=starts))
        fits.append(result)
        fit_s.append(seconds)
    boot, boot_s = timed(lambda: fit_chinchilla(n, d, loss, starts=starts))  # 200 resamples
    fit = fits[0]
    out = {
        "data": f"{args.points} points from Besiroglu et al. 2024's law, N in [7e7, 1.6e10], "
        f"D in [5e9, 5e11] (log-uniform), log-normal noise sigma {args.noise}, seed {args.seed}",
        "true_params": BESIROGLU,
        "starts": len(starts),
        "fit_seconds_all": fit_s,
        "fit_seconds": statistics.median(fit_s),
        "target_seconds": TARGET_SECONDS,
        "fit_with_bootstrap_seconds": boot_s,
        "bootstrap": len(boot.bootstrap),
        "params": fit.params,
        "intervals_95": {k: list(v) for k, v in boot.intervals.items()},
        "loss": fit.loss,
        "converged": fit.converged,
        "warnings": list(boot.warnings),
    }
    print(
        f"fit over {len(starts)} starts on {args.points} points: "
        f"{out['fit_seconds']:.2f} s (median of {args.repeats}); with "
        f"{out['bootstrap']} bootstrap resamples: {boot_s:.2f} s"
    )
    print("params:", {k: round(v, 4) for k, v in fit.params.items()}, "loss", fit.loss)

    if args.reference:
        ly = np.log(loss)
        objective = LSEObjective(np.log(np.stack([n, d], 1)), ly, has_e=True, delta=1e-3)
        lower, upper = chinchilla_bounds(ly)  # as fit_chinchilla
        subset = starts[:: args.reference_stride]
        ref, ref_s = timed(lambda: reference_multistart(objective, subset, lower, upper))
        ours, ours_s = timed(lambda: multistart(objective, subset, lower, upper))
        ref_full_s = ref_s * len(starts) / len(subset)
        rel = (ours.value - ref.value) / ref.value
        out["reference"] = {
            "method": "scipy.optimize.minimize(L-BFGS-B, analytic jac) from each start in turn, "
            "same bounds and tolerances",
            "starts_run": len(subset),
            "stride": args.reference_stride,
            "extrapolated": len(subset) != len(starts),
            "seconds_run": ref_s,
            "seconds_full_grid": ref_full_s,
            "ratio_vs_fit": ref_full_s / out["fit_seconds"],
            "loss_reference_subset": ref.value * 1e-3,
            "loss_ours_same_subset": ours.value * 1e-3,
            "ours_same_subset_seconds": ours_s,
            "relative_loss_difference": rel,
            "loss_ours_full_grid_minus_reference_subset": fit.loss - ref.value * 1e-3,
            "max_abs_param_difference_internal": float(np.abs(ours.theta - ref.theta).max()),
        }
        what = "extrapolated to" if len(subset) != len(starts) else "over"
        ratio = out["reference"]["ratio_vs_fit"]
        print(
            f"reference per-start scipy loop: {ref_s:.1f} s on {len(subset)} starts, "
            f"{ref_full_s:.1f} s {what} the full grid: ratio {ratio:.1f}x; "
            f"same-subset loss difference {rel:.2e} relative"
        )
    out.update(
        {
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    verdict = "meets" if out["fit_seconds"] < TARGET_SECONDS else "MISSES"
    print(f"{verdict} the {TARGET_SECONDS:.0f} s target")
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
