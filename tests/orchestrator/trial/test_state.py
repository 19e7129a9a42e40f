"""TrialState: everything a trial checkpoint keeps survives save/load, for every rank, and a
tampered checkpoint is refused by its manifests."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion.config import DiffusionConfig
from diffusion.timesteps import create_sampler
from diffusion.training import EMA, make_optimizer
from diffusion.unet import UNet, get_model_config
from orchestrator.checkpoint import CheckpointError, load_model_checkpoint
from orchestrator.names import (
    CHECKPOINT_META,
    CHECKPOINT_RANK_MANIFEST,
    CHECKPOINT_RNG,
    CHECKPOINT_STATE,
)
from orchestrator.trial import RankRng, TrialState

WORLD = 2


def rank_state(rank: int) -> TrialState:
    """A trial's state after one optimizer step, with rank-specific RNG streams."""
    torch.manual_seed(0)
    model_config = get_model_config("digits-xs")
    model = UNet(model_config)
    ema = EMA(model, 0.99)
    optimizer = make_optimizer(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()  # Adam moments in the optimizer state
    ema.update(model)
    sampler = create_sampler("loss-second-moment", 10)
    sampler.update(torch.arange(10), torch.rand(10, dtype=torch.float64))
    torch.manual_seed(7919 + rank)
    torch.rand(3)  # a used stream, not a fresh seed
    generator = torch.Generator().manual_seed(1_000_003 + rank)
    torch.rand(5, generator=generator)
    return TrialState(
        rank=rank,
        world_size=WORLD,
        step=40,
        images=1280,
        flops=123_456_789_012,
        mlflow_run_id="0123abcd",
        config={"name": "t", "train": {"seed": 3}},
        model_config=model_config.to_dict(),
        diffusion_config=DiffusionConfig(num_timesteps=10).to_dict(),
        model=model.state_dict(),
        ema=ema.state_dict(),
        optimizer=optimizer.state_dict(),
        sampler=sampler.state_dict(),
        loader={"epoch": 1, "offset": 96},
        rng=RankRng(
            torch=torch.get_rng_state(),
            generator=generator.get_state(),
            window=torch.arange(12, dtype=torch.float64) * (rank + 1),
        ),
    )


def assert_same(a, b, path="state"):
    """Nested dicts, lists and tensors equal, tensors bit for bit and of the same dtype."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.fixture
def saved(tmp_path):
    """One checkpoint directory written by both ranks, as Ray merges them."""
    states = [rank_state(rank) for rank in range(WORLD)]
    for state in states:
        state.save(tmp_path)
    return tmp_path, states


def test_every_field_and_every_ranks_rng_survive_a_round_trip(saved):
    directory, states = saved
    for rank, state in enumerate(states):
        loaded = TrialState.load(directory, rank=rank)
        for field in TrialState.__dataclass_fields__:
            if field != "rng":
                assert_same(getattr(state, field), getattr(loaded, field), field)
        for field in RankRng.__dataclass_fields__:
            assert_same(getattr(state.rng, field), getattr(loaded.rng, field), f"rng.{field}")
    # the ranks' streams differ, so each rank really read its own file
    loaded = [TrialState.load(directory, rank=r) for r in range(WORLD)]
    assert not torch.equal(loaded[0].rng.torch, loaded[1].rng.torch)
    assert not torch.equal(loaded[0].rng.generator, loaded[1].rng.generator)
    # a restored generator continues the saved stream exactly
    g = torch.Generator()
    g.set_state(loaded[1].rng.generator)
    expected = torch.Generator().manual_seed(1_000_003 + 1)
    torch.rand(5, generator=expected)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=expected))


def test_the_files_keep_the_checkpoint_layout(saved):
    directory, states = saved
    names = {p.name for p in directory.iterdir()}
    assert names == {
        CHECKPOINT_STATE,
        CHECKPOINT_META,
        *(CHECKPOINT_RNG.format(rank=r) for r in range(WORLD)),
        *(CHECKPOINT_RANK_MANIFEST.format(rank=r) for r in range(WORLD)),
    }
    meta = json.loads((directory / CHECKPOINT_META).read_text())
    assert meta == {
        "step": 40,
        "images": 1280,
        "flops": 123_456_789_012,
        "eval_flops": 0,
        "mlflow_run_id": "0123abcd",
        "config": {"name": "t", "train": {"seed": 3}},
        "world_size": WORLD,
        "model": states[0].model_config,
        "diffusion": states[0].diffusion_config,
    }
    state = torch.load(directory / CHECKPOINT_STATE, weights_only=True)
    assert list(state) == ["model", "ema", "optimizer", "sampler", "loader"]
    rng = torch.load(directory / CHECKPOINT_RNG.format(rank=1), weights_only=True)
    assert list(rng) == ["torch", "generator", "window"]
    # diffscale eval reads the same directory
    assert load_model_checkpoint(directory).meta["step"] == 40


@pytest.mark.parametrize("victim", [CHECKPOINT_STATE, CHECKPOINT_RNG.format(rank=1)])
def test_a_tampered_file_is_refused(saved, victim):
    directory, _ = saved
    data = bytearray((directory / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / victim).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="missing or corrupt"):
        TrialState.load(directory, rank=0)
    TrialState.load(directory, rank=0, verify=False)  # restore checks before it loads


def test_a_missing_rank_manifest_is_refused(saved):
    directory, _ = saved
    (directory / CHECKPOINT_RANK_MANIFEST.format(rank=1)).unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        TrialState.load(directory, rank=0)


def test_an_older_checkpoint_without_eval_flops_loads_as_zero(saved):
    """Checkpoints written before evaluation compute was counted still restore."""
    directory, _ = saved
    meta = json.loads((directory / CHECKPOINT_META).read_text())
    del meta["eval_flops"]
    (directory / CHECKPOINT_META).write_text(json.dumps(meta))
    assert TrialState.load(directory, rank=0, verify=False).eval_flops == 0


def test_a_gpu_ranks_cuda_rng_is_kept_and_a_cpu_rank_writes_none(tmp_path):
    """On a GPU the CUDA generator (dropout) is saved beside the CPU one; on the CPU the
    file keeps its three entries."""
    state = rank_state(0)
    cuda = torch.arange(16, dtype=torch.uint8)  # stands in for torch.cuda.get_rng_state()
    with_cuda = TrialState(
        **{**state.__dict__, "rng": RankRng(**{**state.rng.__dict__, "cuda": cuda})}
    )
    (tmp_path / "gpu").mkdir()
    (tmp_path / "cpu").mkdir()  # Ray hands each rank an existing checkpoint directory
    with_cuda.save(tmp_path / "gpu")
    loaded = TrialState.load(tmp_path / "gpu", rank=0, verify=False)  # rank 1 wrote nothing
    assert torch.equal(loaded.rng.cuda, cuda)
    state.save(tmp_path / "cpu")
    assert TrialState.load(tmp_path / "cpu", rank=0, verify=False).rng.cuda is None
