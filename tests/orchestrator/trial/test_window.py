"""LogWindow: the averages a log point reports, without a process group."""

from __future__ import annotations

import pytest
import torch

from orchestrator.trial.window import LogWindow


def test_window_averages_by_quartile_of_t_and_starts_over():
    window = LogWindow(num_timesteps=100)
    t = torch.tensor([0, 24, 25, 99])
    window.add({"loss": torch.tensor([1.0, 3.0, 5.0, 7.0]), "t": t, "mse": torch.ones(4)})
    window.add({"loss": torch.tensor([2.0]), "t": torch.tensor([50]), "mse": torch.zeros(1)})
    out = window.metrics(has_mse=True, has_vb=False)
    assert out == pytest.approx(
        {
            "train/loss": 18.0 / 5,
            "train/mse": 4.0 / 5,
            "train/loss_q0": 2.0,
            "train/loss_q1": 5.0,
            "train/loss_q2": 2.0,
            "train/loss_q3": 7.0,
        }
    )
    assert torch.count_nonzero(window.sums) == 0  # the next window starts empty
    window.add({"loss": torch.tensor([4.0]), "t": torch.tensor([80]), "vb": torch.tensor([0.5])})
    assert window.metrics(has_mse=False, has_vb=True) == {
        "train/loss": 4.0,
        "train/vb": 0.5,
        "train/loss_q3": 4.0,
    }
