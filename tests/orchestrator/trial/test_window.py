"""LogWindow and NonFiniteWatch: what a log point reports, without a process group."""

from __future__ import annotations

import pytest
import torch

from orchestrator.trial.window import LogWindow, NonFiniteWatch


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
            "train/objective_var": 20.0 / 3,  # step 1: deviations from 4; step 2: B = 1
        }
    )
    assert torch.count_nonzero(window.sums) == 0  # the next window starts empty
    window.add({"loss": torch.tensor([4.0]), "t": torch.tensor([80]), "vb": torch.tensor([0.5])})
    assert window.metrics(has_mse=False, has_vb=True) == {
        "train/loss": 4.0,
        "train/vb": 0.5,
        "train/loss_q3": 4.0,
    }


def test_window_device_sums_equal_boolean_mask_sums():
    """The one-hot sums (device ops only) are the per-quartile sums of the losses."""
    g = torch.Generator().manual_seed(0)
    window = LogWindow(num_timesteps=1000)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for batch in (1, 16, 64, 100):
        loss = torch.rand(batch, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        window.add({"loss": loss, "t": t})
        for q in range(4):
            mask = (t * 4 // 1000) == q
            expected[0, q] += loss.double()[mask].sum()
            expected[1, q] += mask.sum()
    assert window.sums[4:8].tolist() == pytest.approx(expected[0].tolist(), rel=1e-12)
    assert window.sums[8:].tolist() == expected[1].tolist()
    assert window.sums[3] == 181


def test_watch_keeps_the_first_non_finite_step():
    watch = NonFiniteWatch()
    for step in range(1, 4):
        watch.observe(step, torch.tensor(0.5))
    assert watch.first_bad() is None
    watch.observe(4, torch.tensor(float("inf")))
    watch.observe(5, torch.tensor(float("nan")))  # later bad steps do not move it
    watch.observe(6, torch.tensor(0.1))
    assert watch.first_bad() == (4, float("inf"))
