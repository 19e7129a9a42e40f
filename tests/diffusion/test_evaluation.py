import pytest
import torch

from diffusion.data import load_digits_uint8, to_model_range
from diffusion.evaluation import evaluate_nll, stratified_timesteps
from diffusion.gaussian import DiffusionConfig
from diffusion.unet import build_model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("digits-xs").eval()
    with torch.no_grad():  # move off the zero-initialised output so every term matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    diffusion = DiffusionConfig(num_timesteps=100).build()
    images = to_model_range(load_digits_uint8("test")[0][:48])
    return model, diffusion, images


def test_stratified_timesteps_cover_each_stratum():
    t, sizes = stratified_timesteps(10, 3, 500, generator=torch.Generator().manual_seed(0))
    # edges floor(11^(i/3)) - 1 = 0, 1, 3, 10: strata [0], [1, 2], [3, 10)
    assert sizes.tolist() == [1.0, 2.0, 7.0] and t.shape == (500, 3)
    assert set(t[:, 0].tolist()) == {0} and set(t[:, 1].tolist()) == {1, 2}
    assert set(t[:, 2].tolist()) == set(range(3, 10))
    for T, k in [(1000, 50), (4000, 100), (100, 99), (7, 3)]:
        t, sizes = stratified_timesteps(T, k, 200, generator=torch.Generator().manual_seed(1))
        assert sizes.sum() == T and (sizes >= 1).all()
        edges = torch.cat([torch.zeros(1), sizes.cumsum(0)])
        assert ((t >= edges[:-1]) & (t < edges[1:])).all()  # every draw in its stratum
    all_t, _ = stratified_timesteps(7, 7, 2)
    assert all_t.tolist() == [list(range(7))] * 2
    with pytest.raises(ValueError, match="timesteps_per_image"):
        stratified_timesteps(10, 11, 1)


def test_subset_estimate_agrees_with_the_full_bound_within_its_standard_error(setup):
    model, diffusion, images = setup
    batches = list(images.split(16))
    full = evaluate_nll(diffusion, model, batches, kind="full", timesteps_per_batch=25)
    assert full.kind == "full" and full.terms_per_image == 100 and full.num_images == 48
    assert "full bound" in full.describe()
    for seed in (1, 2):
        sub = evaluate_nll(diffusion, model, batches, kind="subset", timesteps_per_image=10,
                           seed=seed)  # fmt: skip
        assert sub.kind == "subset" and sub.terms_per_image == 10
        assert "unbiased estimate" in sub.describe()
        assert abs(sub.bpd - full.bpd) < 3 * sub.stderr, (sub, full)
    again = evaluate_nll(diffusion, model, batches, kind="subset", timesteps_per_image=10,
                         seed=1)  # fmt: skip
    assert again == evaluate_nll(diffusion, model, batches, kind="subset",
                                 timesteps_per_image=10, seed=1)  # fmt: skip


def test_evaluate_nll_validates(setup):
    model, diffusion, images = setup
    with pytest.raises(ValueError, match="kind"):
        evaluate_nll(diffusion, model, [images[:2]], kind="approx")
    with pytest.raises(ValueError, match="no images"):
        evaluate_nll(diffusion, model, [], kind="full")
