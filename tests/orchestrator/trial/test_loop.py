"""The worker loop's step without Ray: the bf16 and channels_last switches against fp32,
the non-finite watch, and an exact continuation from a saved TrialState (with the loader's
prefetch thread on, as trials run)."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion.data import prepare_dataset
from orchestrator.config import TrialConfig
from orchestrator.trial.loop import build_worker, stop_if_non_finite, train_one_step
from orchestrator.trial.state import TrialState

STEPS = 4


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("digits"))
    prepare_dataset("digits", uri)
    return uri


def worker(digits, **train):
    cfg = TrialConfig.from_dict(
        {
            "name": "loop",
            "model": {"name": "digits-xs"},
            "diffusion": {"num_timesteps": 100},
            "train": {"batch_size": 16, "lr": 1e-3, "seed": 1, **train},
            "budget": {"steps": 100},
        }
    )
    return build_worker(
        cfg, rank=0, world_size=1, device=torch.device("cpu"), data_uri=digits, data_endpoint=None
    )


def objectives(w, steps=STEPS):
    batches = w.loader.batches()
    return torch.tensor(
        [float(train_one_step(w, next(batches)[0])["objective"]) for _ in range(steps)]
    )


@pytest.fixture(scope="module")
def fp32(digits):
    w = worker(digits)
    return objectives(w), w


# Tolerances, and why. channels_last only reorders float32 sums inside the convolutions:
# outputs at equal weights agree to ~1e-6 of their scale (7e-7 measured). bf16 autocast
# rounds every conv/matmul input to 8 significant bits (2^-8 = 3.9e-3 relative): outputs
# agree to a few 1e-3 in RMS (3.1e-3 measured). Over a few steps both trajectories drift
# from fp32 because Adam's first updates are ~lr * sign(gradient), so tiny gradient
# differences change whole updates: the objective stayed within 2e-3 (relative) over 8 steps
# for every switch; 1e-2 leaves room for other CPUs' kernels while still failing for a
# switch that changed the computation (a wrong layout or dtype is off by O(1)).
FORWARD_TOL = {"channels_last": 1e-5, "bf16": 1e-2, "both": 1e-2}  # relative RMS
OBJECTIVE_TOL = 1e-2  # relative, per step


@pytest.mark.parametrize(
    "switch, train",
    [
        ("channels_last", {"channels_last": True}),
        ("bf16", {"bf16": True}),
        ("both", {"bf16": True, "channels_last": True}),
    ],
)
def test_bf16_and_channels_last_switches_match_fp32(digits, fp32, switch, train):
    ref, ref_worker = fp32
    w = worker(digits, **train)
    if train.get("channels_last"):
        for module in (w.model, w.ema.module):
            conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    got = objectives(w)
    rel = (got - ref).abs() / ref.abs()
    assert rel.max() < OBJECTIVE_TOL, rel.tolist()
    assert not torch.equal(got, ref) or switch == "channels_last"  # bf16 does change it

    # the same (trained) weights, one forward pass: the switch alone
    model = ref_worker.model.eval()
    other = copy.deepcopy(model)
    x, _ = next(ref_worker.loader.batches())
    t = torch.randint(0, 100, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    if train.get("channels_last"):
        other = other.to(memory_format=torch.channels_last)
        x_other = x.contiguous(memory_format=torch.channels_last)
    else:
        x_other = x
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bool(train.get("bf16"))):
        y_other = other(x_other, t).float()
    with torch.no_grad():
        y = model(x, t)
    rms = (y_other - y).pow(2).mean().sqrt() / y.pow(2).mean().sqrt()
    assert 0 < rms < FORWARD_TOL[switch] or (rms == 0 and switch == "channels_last"), rms


def test_a_non_finite_loss_stops_at_the_first_bad_step(digits):
    w = worker(digits)
    batches = w.loader.batches()
    for step in range(1, 6):
        x, _ = next(batches)
        if step == 3:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        train_one_step(w, x)  # never raises: the watch is read later
        if step < 3:
            stop_if_non_finite(w)  # clean so far
    assert not torch.isfinite(next(w.model.parameters())).all()  # the bad update went in
    with pytest.raises(RuntimeError, match=r"non-finite loss at step 3 \(training loss is nan\)"):
        stop_if_non_finite(w)


def test_a_restored_worker_continues_bit_for_bit(digits, tmp_path):
    first = worker(digits, ema_rate=0.9)
    batches = first.loader.batches()
    for _ in range(3):
        train_one_step(first, next(batches)[0])
    first.snapshot().save(tmp_path)
    ahead = [float(train_one_step(first, next(batches)[0])["objective"]) for _ in range(4)]

    second = worker(digits, ema_rate=0.9)
    second.restore(TrialState.load(tmp_path, rank=0))
    assert second.step == 3 and second.loader.state_dict() == {"epoch": 0, "offset": 3 * 16}
    again = objectives(second, 4)  # 1500 examples: crosses no epoch; the loader prefetches
    assert again.tolist() == ahead
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first.ema.module.parameters(), second.ema.module.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first.window.sums, second.window.sums)
