import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusion.timesteps import (
    LossSecondMomentResampler,
    UniformSampler,
    create_sampler,
)


def test_uniform_sampler_weights_and_draws():
    s = UniformSampler(100)
    t, w = s.sample(5000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 100
    assert torch.equal(w, torch.ones(5000))
    assert len(torch.unique(t)) == 100
    t2, _ = s.sample(5000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)


def fill(s, rng, rounds):
    for _ in range(rounds):
        ts = np.arange(s.num_timesteps)
        s.update_with_all_losses(ts.tolist(), (rng.random(s.num_timesteps) * (ts + 1)).tolist())


def test_importance_sampler_is_uniform_until_every_t_has_ten_losses():
    s = LossSecondMomentResampler(20)
    rng = np.random.default_rng(0)
    fill(s, rng, 9)
    s.update_with_all_losses(list(range(19)), [1.0] * 19)  # t = 19 still has only 9
    assert not s.warmed_up() and np.array_equal(s.weights(), np.ones(20))
    s.update_with_all_losses([19], [2.0])
    assert s.warmed_up() and not np.allclose(s.weights(), 1.0)


def test_importance_weights_are_eq18_with_uniform_mix():
    T = 30
    s = LossSecondMomentResampler(T)
    rng = np.random.default_rng(1)
    fill(s, rng, 10)
    w = np.sqrt((s.loss_history**2).mean(axis=1))
    p = w / w.sum() * (1 - 0.001) + 0.001 / T
    np.testing.assert_allclose(s.probabilities(), p, rtol=1e-15)
    np.testing.assert_allclose(s.weights(), p, rtol=1e-15)  # already normalised
    t, iw = s.sample(4000, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(iw.numpy(), 1.0 / (T * p[t.numpy()]), rtol=1e-6)
    # unbiased: E_p[L_t / (T p_t)] equals the uniform average of L_t
    losses = np.arange(1, T + 1, dtype=np.float64)
    t, iw = s.sample(200_000, generator=torch.Generator().manual_seed(3))
    estimate = float((iw.double() * torch.from_numpy(losses)[t]).mean())
    assert estimate == pytest.approx(losses.mean(), rel=0.01)


def test_history_keeps_the_newest_ten_losses():
    s = LossSecondMomentResampler(3)
    s.update_with_all_losses([1] * 12, [float(i) for i in range(12)])
    assert s.loss_counts.tolist() == [0, 10, 0]
    assert s.loss_history[1].tolist() == [float(i) for i in range(2, 12)]


def test_state_round_trip_replays_the_same_draws(tmp_path):
    s = LossSecondMomentResampler(50)
    fill(s, np.random.default_rng(4), 12)
    path = tmp_path / "sampler.pt"
    torch.save(s.state_dict(), path)
    restored = LossSecondMomentResampler(50)
    restored.load_state_dict(torch.load(path, weights_only=True))
    np.testing.assert_array_equal(restored.weights(), s.weights())
    a = s.sample(64, generator=torch.Generator().manual_seed(9))
    b = restored.sample(64, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="different T"):
        LossSecondMomentResampler(49).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="no state"):
        UniformSampler(5).load_state_dict(s.state_dict())


def test_registry_and_validation():
    assert isinstance(create_sampler("uniform", 10), UniformSampler)
    assert isinstance(create_sampler("loss-second-moment", 10), LossSecondMomentResampler)
    with pytest.raises(ValueError, match=r"allowed: \['loss-second-moment', 'uniform'\]"):
        create_sampler("importance", 10)
    with pytest.raises(ValueError, match="uniform_prob"):
        LossSecondMomentResampler(10, uniform_prob=2)


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = LossSecondMomentResampler(6, history_per_term=2)
        # ranks hold different batch sizes and different losses
        n = 3 + rank
        t = torch.arange(n) % 6
        losses = torch.full((n,), float(rank + 1)) + t.float() / 10
        s.update(t, losses)
        torch.save(s.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_update_gathers_every_ranks_losses_in_rank_order():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        states = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in (0, 1)]
    for key in ("loss_history", "loss_counts"):
        assert torch.equal(states[0][key], states[1][key])
    local = LossSecondMomentResampler(6, history_per_term=2)
    for rank in (0, 1):
        n = 3 + rank
        t = torch.arange(n) % 6
        local.update_with_all_losses(t.tolist(), (float(rank + 1) + t.float() / 10).tolist())
    assert torch.equal(states[0]["loss_counts"], torch.from_numpy(local.loss_counts))
    assert torch.equal(states[0]["loss_history"], torch.from_numpy(local.loss_history))


def test_samplers_accept_a_diffusion_process():
    from diffusion.timesteps import create_named_schedule_sampler

    from .helpers import make_diffusion

    d = make_diffusion(25)
    assert LossSecondMomentResampler(d).num_timesteps == 25
    assert create_named_schedule_sampler("uniform", d).num_timesteps == 25
