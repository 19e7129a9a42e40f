"""``diffscale paper NAME``: the paper's ablation table beside ours (``diffscale table``), then
one line per finding of Nichol & Dhariwal 2021: the claim, our effect with its 95% interval
over seeds and the verdict (:mod:`orchestrator.analysis.findings`).

Exit codes as the other analysis commands: 0 ok, 2 bad input (an unknown sweep, a step no
cell has; the message names what was looked up), 1 failure of the tracking server or files.
MLflow and pyarrow are imported by the handler, not here: building the parser stays light.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from orchestrator.analysis.commands import TABLE_COLUMNS, BadInput, cmd_table, dumps, print_error
from orchestrator.analysis.findings import (
    CONFIDENCE,
    WINDOW_METRICS,
    Comparison,
    Finding,
    Row,
    config_rows,
    paper_findings,
)
from orchestrator.names import EVAL_PREFIX, SAMPLING_PREFIX

__all__ = [
    "add_paper_parser",
    "choose_step",
    "cmd_paper",
    "comparison_doc",
    "format_comparison",
    "format_finding",
]


def choose_step(rows: Sequence[Row], step: int | None) -> int:
    """``step`` if some row has it (BadInput otherwise), else the step with the most rows
    (the latest on a tie): the findings compare rows at one step budget."""
    counts: dict[int, int] = {}
    for r in rows:
        counts[r.step] = counts.get(r.step, 0) + 1
    if not counts:
        raise BadInput("no grid cell has a step: no metric was logged")
    if step is None:
        return max(counts, key=lambda s: (counts[s], s))
    if step not in counts:
        raise BadInput(
            f"--step {step}: no grid cell is at that step; the cells are at {sorted(counts)}"
        )
    return step


def comparison_doc(c: Comparison) -> dict[str, Any]:
    """A comparison as plain JSON fields (the effect's fields inline, None when missing)."""
    e = c.effect
    return {
        "label": c.label,
        "metric": c.metric,
        "direction": c.direction,
        "estimate": e.estimate if e else None,
        "low": e.low if e else None,
        "high": e.high if e else None,
        "n": e.n if e else 0,
        "paired": e.paired if e else None,
        "missing": c.missing,
        "verdict": c.verdict,
    }


def finding_doc(f: Finding) -> dict[str, Any]:
    return {
        "number": f.number,
        "claim": f.claim,
        "reference": f.reference,
        "verdict": f.verdict,
        "missing": f.missing,
        "judged": [comparison_doc(c) for c in f.judged],
        "stated": [comparison_doc(c) for c in f.stated],
    }


def format_comparison(c: Comparison) -> str:
    """``NLL T=4K - T=1K = -0.15 [-0.2, -0.1] (n=3, paired)``; without an interval when a
    row has too few seeds; ``... : missing <what>`` when a metric was not logged."""
    e = c.effect
    if c.missing or e is None:
        return f"{c.label}: missing {c.missing or c.metric}"
    if e.low is None or e.high is None:
        return f"{c.label} = {e.estimate:.3g} (n={e.n}; no interval)"
    how = {True: ", paired", False: ", unpaired"}.get(e.paired, "")  # None: one row's mean
    return f"{c.label} = {e.estimate:.3g} [{e.low:.3g}, {e.high:.3g}] (n={e.n}{how})"


def format_finding(f: Finding) -> str:
    """One line: ``(N) claim [reference]: our effects; also: stated effects => verdict``."""
    ours = "; ".join(format_comparison(c) for c in f.judged) or "-"
    also = "; ".join(format_comparison(c) for c in f.stated)
    line = f"({f.number}) {f.claim} [{f.reference}]: {ours}"
    if also:
        line += f"; also {also}"
    return f"{line} => {f.verdict}"


def cmd_paper(args: argparse.Namespace) -> int:
    """``diffscale paper``: see the subcommand's help."""
    from mlflow.exceptions import MlflowException

    from orchestrator.analysis.paper import ablation_rows
    from orchestrator.analysis.query import QueryError, load_runs

    wanted = [f"{EVAL_PREFIX}*", f"{SAMPLING_PREFIX}*", *WINDOW_METRICS]
    try:
        table = load_runs(args.name, tracking_uri=args.tracking_uri, metrics=wanted)
        if table.num_rows == 0:
            raise BadInput(f"experiment {args.name!r} has no trial runs")
        every = config_rows(table)
        step = choose_step(every, args.step)
        rows = [r for r in every if r.step == step]
        findings = paper_findings(rows)
    except (BadInput, QueryError) as exc:
        print_error("paper", exc)
        return 2
    except (MlflowException, OSError) as exc:
        print_error("paper", f"{type(exc).__name__}: {exc}")
        return 1
    steps = sorted({r.step for r in every})
    if args.json:
        doc = {
            "experiment": args.name,
            "step": step,
            "steps": steps,
            "confidence": CONFIDENCE,
            "table": {"columns": [*TABLE_COLUMNS, "trial"], "rows": ablation_rows(table)},
            "rows": [
                {"row": r.name(), "step": r.step, "trials": list(r.trials), "values": r.values}
                for r in rows
            ],
            "findings": [finding_doc(f) for f in findings],
        }
        print(dumps(doc))
        return 0
    table_args = argparse.Namespace(name=args.name, tracking_uri=args.tracking_uri, json=False)
    code = cmd_table(table_args)  # the table exactly as `diffscale table NAME` shows it
    if code:
        return code
    other = f"; other steps: {', '.join(map(str, steps))} (--step)" if len(steps) > 1 else ""
    print(
        f"\ndiffscale paper: {args.name}: the paper's findings at step {step} ({len(rows)} "
        f"rows{other}); effects a - b over seeds with {CONFIDENCE:.0%} Student-t intervals"
    )
    for f in findings:
        print(format_finding(f))
    return 0


def add_paper_parser(sub: argparse._SubParsersAction) -> None:
    """The ``paper`` subcommand."""
    pp = sub.add_parser(
        "paper",
        help="the paper's ablation table beside ours, then each finding with a verdict",
        description="The table of `diffscale table`, then one line per finding of Nichol & "
        "Dhariwal 2021 (T=4K vs 1K, cosine vs linear, L_hybrid vs L_simple, L_vlb, importance "
        "sampling, strided sampling with learned sigmas): the claim, our effect with a 95% "
        "Student-t interval over seeds (paired by seed) and a verdict: holds, does not hold, "
        "inconclusive (the interval spans zero), missing: <what>, or too few seeds.",
    )
    pp.add_argument("name", help="sweep name (its MLflow experiment)")
    pp.add_argument(
        "--step",
        type=int,
        default=None,
        help="the step budget whose rows the findings compare (default: the step with the "
        "most cells)",
    )
    pp.add_argument(
        "--tracking-uri",
        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    pp.add_argument("--json", action="store_true", help="print one JSON document only")
    pp.set_defaults(func=cmd_paper)
