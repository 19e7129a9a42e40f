import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion.schedules import (
    cosine_alpha_bar,
    get_beta_schedule,
    space_timesteps,
)


@pytest.mark.parametrize(
    ("name", "T"),
    [("linear", t) for t in (21, 100, 1000, 4000)]
    + [("cosine", t) for t in (1, 2, 10, 1000, 4000)],
)
def test_schedules_are_float64_in_range_and_abar_decreasing(name, T):
    betas = get_beta_schedule(name, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert (betas > 0).all() and (betas <= 0.999).all()
    abar = np.cumprod(1 - betas)
    assert (np.diff(abar) < 0).all()


def test_linear_rejects_T_whose_betas_reach_one():
    with pytest.raises(ValueError, match="T >= 21"):
        get_beta_schedule("linear", 20)


def test_linear_is_ho_et_al_scaled_by_1000_over_T():
    b = get_beta_schedule("linear", 1000)
    assert b[0] == pytest.approx(1e-4, abs=0) and b[-1] == pytest.approx(0.02, abs=0)
    b4 = get_beta_schedule("linear", 4000)
    assert b4[0] == pytest.approx(2.5e-5, rel=1e-15) and b4[-1] == pytest.approx(0.005, rel=1e-15)
    assert np.allclose(np.diff(b4), np.diff(b4)[0], rtol=1e-9, atol=0)


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_cosine_reproduces_eq17_alpha_bar(T):
    betas = get_beta_schedule("cosine", T)
    abar = np.cumprod(1 - betas)
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    expected = np.array([cosine_alpha_bar((t + 1) / T) / f0 for t in range(T)])
    # abar_t = f((t+1)/T) / f(0) wherever no beta was clipped (all but the last steps).
    unclipped = np.cumprod(betas < 0.999).astype(bool)
    assert unclipped[: T - 2].all()
    assert np.allclose(abar[unclipped], expected[unclipped], rtol=1e-10, atol=1e-14)
    assert betas[-1] == 0.999  # the singular last step is clipped (Eq. 17)


def test_unknown_schedule_names_allowed_values():
    with pytest.raises(ValueError, match=r"schedule.*'quadratic'.*\['cosine', 'linear'\]"):
        get_beta_schedule("quadratic", 10)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_num_timesteps(bad):
    with pytest.raises(ValueError, match="num_timesteps"):
        get_beta_schedule("linear", bad)


def test_spacing_reference_examples():
    assert space_timesteps(10, "5") == [0, 2, 4, 7, 9]  # 4.5 rounds half to even -> 4
    steps = space_timesteps(1000, "10,10,10")
    assert len(steps) == 30
    first = [s for s in steps if s < 334]
    assert first == [round(i * 333 / 9) for i in range(10)] and first[-1] == 333
    assert min(s for s in steps if s >= 334) == 334  # second section starts after 334 steps
    assert steps[-1] == 999


def test_spacing_even_and_list_forms_agree():
    assert space_timesteps(1000, "50") == space_timesteps(1000, [50])
    assert space_timesteps(4000, "25,25") == space_timesteps(4000, (25, 25))
    assert space_timesteps(100, "100") == list(range(100))
    assert space_timesteps(7, "1") == [0]


def test_spacing_ddim_forms():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(4000, "ddim100") == list(range(0, 4000, 40))
    # the smallest stride wins: 10 steps of 7 cannot be taken, 4 steps of 10 take stride 3
    assert space_timesteps(10, "ddim4") == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="exactly 7 steps"):
        space_timesteps(10, "ddim7")


@pytest.mark.parametrize("bad", ["abc", "10,x", "ddimX", ""])
def test_spacing_parse_errors_name_the_forms(bad):
    with pytest.raises(ValueError, match="spacing"):
        space_timesteps(100, bad)


def test_spacing_too_many_steps_in_a_section():
    with pytest.raises(ValueError, match="cannot take 60 steps"):
        space_timesteps(100, "60,10")


@settings(max_examples=200, deadline=None)
@given(T=st.integers(2, 5000), data=st.data())
def test_spacing_properties(T, data):
    count = data.draw(st.integers(2, T))
    steps = space_timesteps(T, str(count))
    assert len(steps) == count and steps == sorted(set(steps))
    assert steps[0] == 0 and steps[-1] == T - 1
