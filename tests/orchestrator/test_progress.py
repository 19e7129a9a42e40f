"""Progress of long commands (orchestrator/progress.py): periodic lines when stderr is not a
terminal, each stage announced, and nothing left running after the block."""

from __future__ import annotations

import re
import time

from orchestrator.progress import Ticker, duration


def test_periodic_lines_name_the_stage_and_its_elapsed_time(capsys) -> None:
    with Ticker(every_s=0.05) as ticker:
        ticker.stage("NLL (full) on 64 test images")
        ticker.count(3, 8)
        time.sleep(0.3)
        ticker.stage("64 samples")
        time.sleep(0.2)
    assert not ticker.thread.is_alive()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "  NLL (full) on 64 test images ..."
    periodic = [line for line in lines if "3/8" in line]
    assert len(periodic) >= 2, lines  # a line every 0.05 s while the stage ran
    assert all(re.search(r"\[#{9}\.{15}\] 3/8  NLL \(full\)", line) for line in periodic), lines
    assert "  64 samples ..." in lines and any(l.startswith("  64 samples: ") for l in lines)
    assert re.fullmatch(r"  done in \d+ s", lines[-1]), lines


def test_a_failed_block_does_not_claim_it_is_done(capsys) -> None:
    try:
        with Ticker(every_s=10.0) as ticker:
            ticker.stage("loading")
            raise ValueError("no such checkpoint")
    except ValueError:
        pass
    assert "done" not in capsys.readouterr().err
    assert duration(106.4) == "1 min 46 s" and duration(42) == "42 s"
