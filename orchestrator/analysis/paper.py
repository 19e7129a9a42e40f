"""Published numbers of Nichol & Dhariwal 2021 that the project's runs are set beside.

The ablation table (ImageNet 64x64; NLL in bits/dim, FID on 10K samples), as given in
PAPER.md, "Reported results": rows are keyed by (iterations, T, schedule, objective) with the
config's own spellings (``diffusion.schedule`` linear/cosine, ``diffusion.objective``
simple/hybrid/vlb). :func:`ablation_rows` lays a sweep's grid cells out the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from orchestrator.analysis.query import cell_rows
from orchestrator.names import EVAL_DIGITS_FD, EVAL_FID, EVAL_NLL, EVAL_NLL_FULL

__all__ = [
    "ABLATION",
    "OBJECTIVE_LABELS",
    "AblationRow",
    "ablation_rows",
    "human_count",
    "paper_row",
]

# diffusion.objective -> the paper's name of the loss (Eq. 14, 16 and L_vlb).
OBJECTIVE_LABELS = {"simple": "L_simple", "hybrid": "L_hybrid", "vlb": "L_vlb"}


@dataclass(frozen=True)
class AblationRow:
    """One row of the paper's ablation table."""

    iters: int  # optimizer steps
    T: int  # diffusion steps
    schedule: str  # "linear" | "cosine"
    objective: str  # "simple" | "hybrid" | "vlb"
    nll: float  # bits/dim, full bound on the test set
    fid: float


ABLATION: tuple[AblationRow, ...] = (
    AblationRow(200_000, 1000, "linear", "simple", 3.99, 32.5),
    AblationRow(200_000, 4000, "linear", "simple", 3.77, 31.3),
    AblationRow(200_000, 4000, "linear", "hybrid", 3.66, 32.2),
    AblationRow(200_000, 4000, "cosine", "simple", 3.68, 27.0),
    AblationRow(200_000, 4000, "cosine", "hybrid", 3.62, 28.0),
    AblationRow(200_000, 4000, "cosine", "vlb", 3.57, 56.7),
    AblationRow(1_500_000, 4000, "cosine", "hybrid", 3.57, 19.2),
    AblationRow(1_500_000, 4000, "cosine", "vlb", 3.53, 40.1),
)


def paper_row(
    iters: int | None, T: int | None, schedule: str | None, objective: str | None
) -> AblationRow | None:
    """The published row with exactly these settings, or None."""
    for row in ABLATION:
        if (row.iters, row.T, row.schedule, row.objective) == (iters, T, schedule, objective):
            return row
    return None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "null", "None") else None
    except ValueError:
        return None


def _pick(row: dict[str, Any], first: str, second: str) -> tuple[float | None, str | None]:
    """``first`` unless missing or older than ``second`` (by the step it was logged at)."""
    a, b = row.get(first), row.get(second)
    if a is not None and (
        b is None or (row.get(f"{first}@step") or 0) >= (row.get(f"{second}@step") or 0)
    ):
        return a, first
    return (b, second) if b is not None else (None, None)


def ablation_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The paper's ablation layout, one row per grid cell of a load_runs table."""
    wanted = [EVAL_NLL_FULL, EVAL_NLL, EVAL_FID, EVAL_DIGITS_FD]
    cells = cell_rows(table, [m for m in wanted if m in table.column_names], with_steps=True)
    rows = []
    for c in cells.to_pylist():
        iters, T = c["step"], _int_or_none(c.get("params.diffusion.num_timesteps"))
        schedule, objective = (
            c.get("params.diffusion.schedule"),
            c.get("params.diffusion.objective"),
        )
        nll, nll_from = _pick(c, EVAL_NLL_FULL, EVAL_NLL)
        fid, fid_from = _pick(c, EVAL_FID, EVAL_DIGITS_FD)
        paper = paper_row(iters, T, schedule, objective)
        rows.append(
            {
                "Iters": iters,
                "T": T,
                "Schedule": schedule,
                "Objective": OBJECTIVE_LABELS.get(objective or "", objective),
                "NLL": nll,
                "FID": fid,
                "paper NLL": paper.nll if paper else None,
                "paper FID": paper.fid if paper else None,
                "trial": c.get("trial") or c.get("run_name"),
                "cell": c.get("cell"),
                "NLL metric": nll_from,
                "FID metric": fid_from,
            }
        )
    order = {"linear": 0, "cosine": 1, **{v: i for i, v in enumerate(OBJECTIVE_LABELS.values())}}

    def sort_key(r: dict[str, Any]) -> tuple:
        return (
            r["Iters"] if r["Iters"] is not None else -1,
            r["T"] or 0,
            order.get(r["Schedule"], 9),
            r["Schedule"] or "",
            order.get(r["Objective"], 9),
            r["Objective"] or "",
            r["trial"] or "",
        )

    return sorted(rows, key=sort_key)


def human_count(n: int | None) -> str:
    """200000 -> 200K, 1500000 -> 1.5M (the paper's spelling)."""
    if n is None:
        return "-"
    for div, suffix in ((1_000_000, "M"), (1_000, "K")):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{suffix}"
    return str(n)
