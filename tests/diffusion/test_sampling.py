import pytest
import torch

from diffusion.sampling import (
    ddim_sample_loop,
    index_generators,
    index_seed,
    p_sample,
    p_sample_loop,
    sample,
)

from .helpers import ConvModel, make_diffusion, oracle_eps_model

SHAPE = (3, 3, 4, 4)


def target_image():
    return (torch.arange(48, dtype=torch.float64).view(1, 3, 4, 4) * 11 % 256) / 127.5 - 1


@pytest.mark.parametrize(
    "steps,method", [(None, "ancestral"), ("10", "ancestral"), ("ddim10", "ddim"), ("7", "ddim")]
)
@pytest.mark.parametrize("var_type", ["fixed_small", "learned_range"])
def test_exact_model_of_a_point_mass_samples_that_point(steps, method, var_type):
    """For data = one image x0 the exact eps makes every sampler land on x0; the oracle
    reads abar at the timestep it receives, so this also checks respaced timestep maps."""
    objective = "vlb" if var_type == "fixed_small" else "hybrid"
    base = make_diffusion(100, var_type=var_type, objective=objective)
    x0 = target_image()
    model = oracle_eps_model(base, x0, learn_sigma=base.learns_sigma)
    out = sample(
        base,
        model,
        SHAPE,
        steps=steps,
        method=method,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(out, x0.expand(SHAPE), rtol=0, atol=1e-6)


def test_sampling_is_deterministic_given_a_generator_or_injected_noise():
    d = make_diffusion(12, var_type="learned_range")
    model = ConvModel(seed=2)
    run = lambda seed: p_sample_loop(  # noqa: E731
        d, model, SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    xT = torch.randn(SHAPE, dtype=torch.float64)
    table = {i: torch.randn(SHAPE, dtype=torch.float64) for i in range(12)}
    a = p_sample_loop(d, model, SHAPE, noise=xT, step_noise=table.__getitem__, dtype=torch.float64)
    b = p_sample_loop(d, model, SHAPE, noise=xT, step_noise=table.__getitem__, dtype=torch.float64)
    assert torch.equal(a, b)
    # a generator replays the same draws as explicit noise drawn in the same order
    g = torch.Generator().manual_seed(7)
    xT = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    steps = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(12)]
    c = p_sample_loop(
        d, model, SHAPE, noise=xT, step_noise=lambda i: steps[11 - i], dtype=torch.float64
    )
    e = p_sample_loop(
        d, model, SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    assert torch.equal(c, e)


def test_global_rng_draw_order_matches_the_reference_loop():
    """Without a generator: x_T = randn(shape), then one randn per step (t = T-1 .. 0)."""
    d = make_diffusion(5, var_type="learned_range")
    model = ConvModel(seed=4)
    torch.manual_seed(11)
    got = p_sample_loop(d, model, SHAPE, dtype=torch.float64)
    torch.manual_seed(11)
    x = torch.randn(*SHAPE, dtype=torch.float64)
    for i in reversed(range(5)):
        t = torch.full((SHAPE[0],), i)
        with torch.no_grad():
            x, _ = p_sample(d, model, x, t, noise=torch.randn_like(x))
    assert torch.equal(got, x)


def test_no_noise_is_added_at_t0():
    d = make_diffusion(10, var_type="fixed_large", objective="vlb")
    x = torch.randn(SHAPE, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.long)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    a, _ = p_sample(d, model, x, t, noise=torch.full(SHAPE, 1e6, dtype=torch.float64))
    b = d.p_mean_variance(model, x, t).mean
    assert torch.equal(a, b)


def test_ddim_eta0_is_deterministic_and_eta_adds_noise():
    d = make_diffusion(50).respace("ddim10")
    model = ConvModel(seed=5)
    xT = torch.randn(SHAPE, dtype=torch.float64)
    kw = dict(noise=xT, dtype=torch.float64)
    a = ddim_sample_loop(d, model, SHAPE, eta=0.0, generator=torch.Generator().manual_seed(1), **kw)
    b = ddim_sample_loop(d, model, SHAPE, eta=0.0, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    c = ddim_sample_loop(d, model, SHAPE, eta=1.0, generator=torch.Generator().manual_seed(2), **kw)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample_loop(d, model, SHAPE, eta=-1)


def test_sample_validates_method_and_shape():
    d = make_diffusion(10)
    with pytest.raises(ValueError, match="method"):
        sample(d, ConvModel(), SHAPE, method="euler")
    with pytest.raises(ValueError, match="noise"):
        p_sample_loop(d, ConvModel(), SHAPE, noise=torch.zeros(1, 3, 4, 4), dtype=torch.float64)


def test_diffusion_methods_match_the_module_functions():
    d = make_diffusion(20)
    model = ConvModel(seed=6)
    x = torch.randn(SHAPE, dtype=torch.float64)
    t = torch.tensor([0, 7, 19])
    z = torch.randn(SHAPE, dtype=torch.float64)
    ours = d.p_sample(model, x, t, noise=z)
    assert torch.equal(ours["sample"], p_sample(d, model, x, t, noise=z)[0])
    ddim = d.ddim_sample(model, x, t, eta=0.5, noise=z)
    from diffusion.sampling import ddim_sample

    assert torch.equal(ddim["sample"], ddim_sample(d, model, x, t, noise=z, eta=0.5)[0])


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_per_sample_generators_make_a_sample_independent_of_its_batch(method):
    """Sample i drawn from generators seeded by (entropy, i): drawing 0..5 at once or as
    0..1, 2..4, 5 gives the same samples; a different index or entropy a different one."""
    d = make_diffusion(12, var_type="learned_range")
    model = ConvModel(seed=2)
    kw = {"steps": "6", "method": method, "eta": 1.0, "dtype": torch.float64}

    def draw(indices, entropy=(3, 7)):
        gens = index_generators(entropy, indices)
        return sample(d, model, (len(indices), 3, 4, 4), generators=gens, **kw)

    whole = draw(range(6))
    parts = torch.cat([draw(range(0, 2)), draw(range(2, 5)), draw(range(5, 6))])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-12)
    assert not torch.allclose(draw(range(1, 7))[:5], whole[:5])  # index-seeded, not positional
    assert not torch.allclose(draw(range(6), entropy=(3, 8)), whole)


def test_index_seeds_differ_by_length_and_refuse_negative_entropy():
    assert index_seed(1, 2) != index_seed(1, 2, 0)  # SeedSequence alone would merge these
    assert len({index_seed(0, i) for i in range(1000)}) == 1000
    assert 0 <= index_seed(5, 6, 7) < 2**63
    with pytest.raises(ValueError, match="non-negative"):
        index_seed(-1)
    with pytest.raises(ValueError, match="generators: 2 for a batch of 3"):
        p_sample_loop(
            make_diffusion(4),
            ConvModel(),
            (3, 3, 4, 4),
            generators=index_generators((0,), range(2)),
        )
