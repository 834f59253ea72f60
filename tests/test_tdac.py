import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

import dmq_fx
from dmq_fx.graph.unet_configs import (
    TINY_CLASS_CONDITIONAL,
    TINY_DDPM,
    TINY_SD,
    build_unet,
    example_inputs,
)
from dmq_fx.graph.units import capture_unit_inputs
from dmq_fx.methods.tdac import allocate_samples, mid_attention_input, tdac_weights
from dmq_fx.workflow.calibration_data import select_samples


def ddim():
    return DDIMScheduler(beta_schedule="squaredcos_cap_v2")


@given(
    st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=30),
    st.integers(0, 200),
    st.integers(0, 3),
)
@settings(max_examples=200, deadline=None)
def test_allocation_sums_to_n_is_nonnegative_and_monotone(weights, n, minimum):
    w = torch.tensor(weights, dtype=torch.float64)
    if minimum * len(w) > n:
        with pytest.raises(dmq_fx.ConfigError, match="min_per_step"):
            allocate_samples(w, n, minimum)
        return
    counts = allocate_samples(w, n, minimum)
    assert int(counts.sum()) == n
    assert (counts >= minimum).all()
    for i in range(len(w)):
        for j in range(len(w)):
            if w[i] > w[j]:
                assert counts[i] >= counts[j]
    # floor or ceil of the quota
    rest = n - minimum * len(w)
    quota = rest * w / w.sum() if w.sum() > 0 else torch.full_like(w, rest / len(w))
    assert ((counts - minimum - quota).abs() < 1).all()
    assert torch.equal(counts, allocate_samples(w, n, minimum))  # deterministic


def test_allocation_by_hand():
    # quotas 5.5, 3.3, 1.2 -> floors 5, 3, 1, the one left goes to the largest remainder
    assert allocate_samples(torch.tensor([5.5, 3.3, 1.2]), 10).tolist() == [6, 3, 1]
    assert allocate_samples(torch.tensor([1.0, 0.0, 0.0]), 6, min_per_step=1).tolist() == [4, 1, 1]
    assert allocate_samples(torch.zeros(3), 7).tolist() == [3, 2, 2]
    with pytest.raises(dmq_fx.ConfigError, match="finite"):
        allocate_samples(torch.tensor([1.0, -1.0]), 4)


def test_density_and_diversity_by_hand():
    e0 = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    e1 = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    near = torch.tensor([1.1, 0.0]).reshape(1, 2, 1, 1)
    feats = [e0, near, e1, 2 * e1]
    scores = tdac_weights(feats, radius=0.01, lam=1.0)
    # mean squared distances: e0-near 0.005 (within), every other pair > 0.01
    assert scores.density.tolist() == [1, 1, 0, 0]
    # 1 - cos: parallel pairs 0, orthogonal pairs 1: each step has two orthogonal partners
    assert scores.diversity.tolist() == pytest.approx([2, 2, 2, 2])
    assert scores.weights.tolist() == pytest.approx([1, 1, 0, 0])  # diversity is constant
    far = torch.tensor([-1.0, 0.0]).reshape(1, 2, 1, 1)  # 1 - cos = 2 against e0 and near
    scores = tdac_weights([e0, near, e1, far], radius=0.01, lam=2.0)
    assert scores.diversity.tolist() == pytest.approx([3, 3, 3, 5])
    assert scores.weights.tolist() == pytest.approx([1, 1, 0, 2])
    with pytest.raises(dmq_fx.ConfigError, match="two sampling steps"):
        tdac_weights([e0], 1.0, 1.0)


@pytest.mark.parametrize(
    "config", [TINY_DDPM, TINY_SD, TINY_CLASS_CONDITIONAL], ids=["ddpm", "sd", "class"]
)
def test_feature_is_the_input_of_the_mid_attention_block(config):
    model = build_unet(config)
    args, kwargs = example_inputs(model, batch=2)
    seen = []
    handle = model.mid_block.attentions[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(*args, **kwargs)
    handle.remove()
    gm = dmq_fx.trace(model, args, kwargs)
    got = capture_unit_inputs(gm, [mid_attention_input(gm)], [(args, kwargs)], None)
    assert torch.allclose(got.values[0], seen[0], atol=1e-5)


def test_selection_picks_n_samples_from_distinct_trajectories():
    model = build_unet(TINY_DDPM)
    kw = dict(num_inference_steps=5, batch_size=8, progress=False)
    data = select_samples(model, ddim(), 12, radius=0.5, seed=1, **kw)
    assert len(data) == 12
    assert len(set(data.trajectory.tolist())) == 12
    assert (data.step_index.diff() >= 0).all()  # noisiest step first
    again = select_samples(model, ddim(), 12, radius=0.5, seed=1, **kw)
    assert torch.equal(data.sample, again.sample)
    every = select_samples(model, ddim(), 12, radius=0.5, seed=1, min_per_step=2, **kw)
    assert torch.bincount(every.step_index, minlength=5).min() >= 2
    # each selected row is the trajectory's x_t at that step: rerunning the sampler gives it
    pool = dmq_fx.workflow.calibration_data.collect_calibration_data(
        model, ddim(), samples_per_step=12, independent_trajectories=False, seed=1, **kw
    )
    for i in range(len(data)):
        match = (pool.trajectory == data.trajectory[i]) & (pool.step_index == data.step_index[i])
        assert torch.equal(pool.sample[match][0], data.sample[i])


def test_selection_under_guidance_keeps_both_halves():
    model = build_unet(TINY_SD)
    prompts, empty = torch.randn(3, 7, 24), torch.zeros(1, 7, 24)
    data = select_samples(
        model,
        ddim(),
        6,
        num_inference_steps=3,
        prompt_embeds=prompts,
        negative_prompt_embeds=empty,
        guidance_scale=4.0,
        progress=False,
    )
    assert len(data) == 12 and int(data.unconditional.sum()) == 6
    for t in set(data.trajectory.tolist()):
        rows = data.trajectory == t
        assert rows.sum() == 2 and data.unconditional[rows].sum() == 1
        assert torch.equal(data.sample[rows][0], data.sample[rows][1])
