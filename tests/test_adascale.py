"""AdaScale: golden gains, estimator accuracy, distributed agreement, edge cases, typed errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.multiprocessing as mp

from elastic.adascale import AdaScale, AdaScaleError, gain_ratio
from elastic.distributed import destroy_process_group
from elastic.schedules import Step
from tests import dist_helpers as dh


def paper_gain(grads: list[torch.Tensor], scale: int) -> tuple[float, float, float]:
    """The paper's estimators and gain for one step, computed independently in float64."""
    g = [x.double() for x in grads]
    s = len(g)
    mean = torch.stack(g).mean(0)
    sum_sq = sum(float(x.dot(x)) for x in g)
    sigma2 = (sum_sq - s * float(mean.dot(mean))) / (s - 1)
    mu2 = float(mean.dot(mean)) - sigma2 / s
    sigma2_c, mu2_c = max(sigma2, 1e-6), max(mu2, 0.0)
    r = (sigma2_c + mu2_c) / (sigma2_c / scale + mu2_c)
    return min(max(r, 1.0), scale), sigma2, mu2


def linear_param_step(opt: AdaScale, w: torch.nn.Parameter, grads: list[torch.Tensor]) -> bool:
    """Backward passes whose micro-batch gradients are exactly `grads` (loss_i = <w, c_i>)."""
    for c in grads:
        (w @ c / len(grads)).backward()
    took = opt.step()
    opt.zero_grad()
    return took


def test_golden_gain_matches_paper_formula():
    torch.manual_seed(1)
    scale = 4
    w = torch.nn.Parameter(torch.zeros(5))
    opt = AdaScale(torch.optim.SGD([w], lr=0.1), accumulation_steps=scale)
    grads = [torch.randn(5) + torch.tensor([2.0, 0, 0, 0, 0]) for _ in range(scale)]
    expected, sigma2, mu2 = paper_gain(grads, scale)
    before = w.detach().clone()
    assert linear_param_step(opt, w, grads)
    assert opt.gain == pytest.approx(expected, rel=1e-6)
    assert opt.grad_variance == pytest.approx(sigma2, rel=1e-6)
    assert opt.grad_sqnorm == pytest.approx(mu2, rel=1e-6)
    assert opt.progress == pytest.approx(expected, rel=1e-6)
    # The update is r * lr * g_bar.
    g_bar = torch.stack(grads).mean(0)
    assert torch.allclose(w.detach(), before - expected * 0.1 * g_bar, atol=1e-6)
    assert opt.efficiency == pytest.approx(expected / scale)


def test_golden_hand_values():
    # Two gradients [1, 0] and [-1, 0]: g_bar = 0, so sigma^2 = 2 and mu^2 = -1 -> clipped to 0: r = S.
    w = torch.nn.Parameter(torch.zeros(2))
    opt = AdaScale(torch.optim.SGD([w], lr=1.0), accumulation_steps=2)
    linear_param_step(opt, w, [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])])
    assert opt.grad_variance == pytest.approx(2.0)
    assert opt.grad_sqnorm == pytest.approx(-1.0)
    assert opt.gain == pytest.approx(2.0)
    # Identical gradients: sigma^2 = 0 (clipped to 1e-6), mu^2 = 1 -> r = (1e-6 + 1) / (0.5e-6 + 1).
    w2 = torch.nn.Parameter(torch.zeros(2))
    opt2 = AdaScale(torch.optim.SGD([w2], lr=1.0), accumulation_steps=2)
    linear_param_step(opt2, w2, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])])
    assert opt2.gain == pytest.approx((1e-6 + 1) / (0.5e-6 + 1), abs=1e-9)


def test_smoothing_is_plain_mean_then_ema():
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = AdaScale(torch.optim.SGD([w], lr=0.0), accumulation_steps=3, smoothing=0.5)
    estimates = []
    for _ in range(4):
        grads = [torch.randn(3) for _ in range(3)]
        _, s2, _ = paper_gain(grads, 3)
        estimates.append(s2)
        linear_param_step(opt, w, grads)
    # n=1: w=1; n=2: w=max(1/2, 0.5); n=3: w=max(1/3, 0.5)=0.5; n=4: 0.5.
    expect = estimates[0]
    for n, s2 in enumerate(estimates[1:], start=2):
        expect += max(1 / n, 0.5) * (s2 - expect)
    assert opt.grad_variance == pytest.approx(expect, rel=1e-5)


def test_estimates_match_exact_values_on_linear_regression():
    """sigma^2 and mu^2 of least squares at a fixed point, computed exactly from the data."""
    g = torch.Generator().manual_seed(3)
    n, dim, batch, scale = 4096, 20, 8, 8
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w_true = torch.randn(dim, generator=g, dtype=torch.float64)
    y = x @ w_true + 0.7 * torch.randn(n, generator=g, dtype=torch.float64)
    w_eval = w_true + 0.4 * torch.randn(dim, generator=g, dtype=torch.float64)
    # Per-sample gradients of 0.5 * (x.w - y)^2 at w_eval.
    per_sample = (x @ w_eval - y).unsqueeze(1) * x
    full = per_sample.mean(0)
    mu2_exact = float(full.dot(full))
    # A scale-1 batch is `batch` samples drawn with replacement: its covariance is cov/batch.
    sigma2_exact = float(((per_sample - full) ** 2).sum(1).mean()) / batch

    w = torch.nn.Parameter(w_eval.clone().float())
    opt = AdaScale(torch.optim.SGD([w], lr=0.0), accumulation_steps=scale)
    for _ in range(400):
        for _ in range(scale):
            idx = torch.randint(0, n, (batch,), generator=g)
            loss = 0.5 * ((x[idx].float() @ w - y[idx].float()) ** 2).mean()
            (loss / scale).backward()
        opt.step()
        opt.zero_grad()
    assert opt.grad_variance == pytest.approx(sigma2_exact, rel=0.10)
    assert opt.grad_sqnorm == pytest.approx(mu2_exact, rel=0.10)
    assert opt.gain == pytest.approx(gain_ratio(sigma2_exact, mu2_exact, scale), rel=0.10)


def test_scale_one_gain_is_exactly_one():
    model = dh.make_model()
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.1))
    hist = dh.run_steps(model, opt, model, lambda s: dh.micro_batches(s, 1), steps=3, accumulation=1)
    assert [h[0] for h in hist] == [1.0, 1.0, 1.0]
    assert opt.progress == 3.0
    assert opt.scale == 1.0 and opt.efficiency == 1.0


def test_set_scale_gives_gain_at_new_scale():
    torch.manual_seed(4)
    w = torch.nn.Parameter(torch.zeros(4))
    opt = AdaScale(torch.optim.SGD([w], lr=0.01), accumulation_steps=4)
    for _ in range(5):
        linear_param_step(opt, w, [torch.randn(4) + 1.0 for _ in range(4)])
    assert opt.scale == 4
    opt.set_scale(2, accumulation_steps=2)
    grads = [torch.randn(4) + 1.0 for _ in range(2)]
    linear_param_step(opt, w, grads)
    assert opt.scale == 2
    # The estimates folded this step's sample in; the gain is the formula at the NEW scale.
    assert opt.gain == pytest.approx(gain_ratio(opt.grad_variance, opt.grad_sqnorm, 2), rel=1e-9)
    assert 1.0 <= opt.gain <= 2.0
    assert opt.efficiency == pytest.approx(opt.gain / 2)


def test_state_dict_round_trip_continues_bit_identically():
    model = dh.make_model()
    sched = Step(total_progress=20, milestones=(0.3,), gamma=0.5)
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
                   accumulation_steps=3, lr_schedule=sched)
    micro = lambda s: dh.micro_batches(s, 3)  # noqa: E731
    dh.run_steps(model, opt, model, micro, steps=4, accumulation=3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    later = lambda s: dh.micro_batches(s + 4, 3)  # noqa: E731
    hist_a = dh.run_steps(model, opt, model, later, steps=4, accumulation=3)

    model_b = dh.make_model()
    model_b.load_state_dict(saved_model)
    opt_b = AdaScale(torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
                     accumulation_steps=3, lr_schedule=sched)
    opt_b.load_state_dict(saved_opt)
    hist_b = dh.run_steps(model_b, opt_b, model_b, later, steps=4, accumulation=3)
    assert hist_a == hist_b
    for pa, pb in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_parameters_without_grad_are_ignored():
    used = torch.nn.Parameter(torch.ones(3))
    unused = torch.nn.Parameter(torch.ones(3))
    opt = AdaScale(torch.optim.SGD([used, unused], lr=0.1, momentum=0.9), accumulation_steps=2)
    for c in (torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])):
        (used @ c / 2).backward()
    assert opt.step()
    assert unused.grad is None
    assert torch.equal(unused.detach(), torch.ones(3))
    assert math.isfinite(opt.gain) and 1.0 <= opt.gain <= 2.0


def test_nonfinite_gradient_skips_step_and_keeps_estimates():
    torch.manual_seed(5)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = AdaScale(torch.optim.SGD([w], lr=0.1, momentum=0.9), accumulation_steps=2)
    linear_param_step(opt, w, [torch.randn(3), torch.randn(3)])
    state = (opt.grad_variance, opt.grad_sqnorm, opt.progress, opt.gain, w.detach().clone())
    assert not linear_param_step(opt, w, [torch.tensor([float("nan"), 0, 0]), torch.randn(3)])
    assert not linear_param_step(opt, w, [torch.tensor([float("inf"), 0, 0]), torch.randn(3)])
    assert opt.skipped_steps == 2
    assert (opt.grad_variance, opt.grad_sqnorm, opt.progress, opt.gain) == state[:4]
    assert torch.equal(w.detach(), state[4])
    assert linear_param_step(opt, w, [torch.randn(3), torch.randn(3)])  # and it goes on
    assert opt.steps == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_at_scale_one_skips_only_that_step(bad):
    """S = 1 (nothing to estimate) still checks: a bad step is skipped, the steps around it run."""
    w = torch.nn.Parameter(torch.zeros(3))
    opt = AdaScale(torch.optim.SGD([w], lr=0.1))
    results = []
    for grad in ([1.0, 2.0, 3.0], [bad, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.0, 0.0]):
        (w @ torch.tensor(grad)).backward()
        results.append(opt.step())
        opt.zero_grad()
    assert results == [True, False, True, True]
    assert (opt.steps, opt.skipped_steps, opt.progress) == (3, 1, 3.0)
    assert torch.allclose(w.detach(), -0.1 * torch.tensor([4.0, 3.0, 4.0]))


def test_adam_uses_square_root_gain():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = AdaScale(torch.optim.Adam([w], lr=0.01), accumulation_steps=2)
    linear_param_step(opt, w, [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])])
    assert opt.gain == pytest.approx(2.0)
    assert opt.learning_rate == pytest.approx(0.01 * math.sqrt(2.0))


def test_lr_schedule_uses_floor_of_progress():
    w = torch.nn.Parameter(torch.zeros(2))
    seen = []
    opt = AdaScale(torch.optim.SGD([w], lr=1.0), lr_schedule=lambda tau: seen.append(tau) or 0.5)
    for _ in range(3):
        (w @ torch.ones(2)).backward()
        opt.step()
        opt.zero_grad()
    assert seen == [0, 1, 2]
    assert opt.learning_rate == 0.5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda w: AdaScale(torch.optim.SGD([w], lr=0.1), accumulation_steps=0), "accumulation_steps"),
        (lambda w: AdaScale(torch.optim.SGD([w], lr=0.1), scale=0.5), "scale"),
        (lambda w: AdaScale(torch.optim.SGD([w], lr=0.1), smoothing=1.0), "smoothing"),
        (lambda w: AdaScale("sgd"), "optimizer"),
    ],
)
def test_bad_arguments_raise_typed_errors(make, message):
    with pytest.raises(AdaScaleError, match=message):
        make(torch.nn.Parameter(torch.zeros(2)))


def test_misuse_raises_typed_errors():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = AdaScale(torch.optim.SGD([w], lr=0.1), accumulation_steps=2)
    with pytest.raises(AdaScaleError, match="before any backward"):
        opt.step()
    (w @ torch.ones(2)).backward()
    with pytest.raises(AdaScaleError, match="2 but 1 backward"):
        opt.step()
    with pytest.raises(AdaScaleError, match="scale"):
        opt.set_scale(0)
    with pytest.raises(AdaScaleError, match="not an AdaScale state"):
        opt.load_state_dict({"state": {}})



# --------------------------------------------------------------- what real training loops do


def _accumulated_run(steps: int = 4, accumulation: int = 4, lr: float = 0.05, **loop) -> tuple[list, torch.nn.Module, AdaScale]:
    model = dh.make_model()
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), accumulation_steps=accumulation,
                   grad_scaler=loop.get("scaler"))
    micro = lambda s: dh.micro_batches(s, accumulation)  # noqa: E731
    zero = dh.zero_grad_for(loop.pop("zero", "adascale"), model, opt)
    return dh.run_steps(model, opt, model, micro, steps, accumulation, zero_grad=zero, **loop), model, opt


@pytest.mark.parametrize("zero", ["adascale", "model"])
def test_clipping_does_not_change_the_statistics(zero):
    """clip_grad_norm_ between backward() and step() rescales .grad; sigma^2, mu^2 and the gain
    are those of the unclipped gradients, with either way of zeroing (lr 0: the same weights each step)."""
    plain, _, _ = _accumulated_run(lr=0.0)
    clipped, _, opt = _accumulated_run(lr=0.0, clip=1e-3, zero=zero)
    assert opt.num_estimates == 4
    for a, b in zip(plain, clipped):
        assert b[0] == pytest.approx(a[0], rel=1e-6)  # gain
        assert b[2] == pytest.approx(a[2], rel=1e-6)  # sigma^2
        assert b[3] == pytest.approx(a[3], rel=1e-6)  # mu^2
    assert plain[-1][0] > 1.2  # not vacuous: a clipped g_bar would push the gain to S


def test_grad_scaler_statistics_are_unscaled_and_inf_steps_skipped():
    """fp16's loss scaling (here a CPU GradScaler with a large scale): the estimates equal the
    unscaled run's, and a step the scaler skips (inf) is counted and leaves them alone."""
    plain, _, _ = _accumulated_run(steps=5, nan_at_step=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaled, _, opt = _accumulated_run(steps=5, nan_at_step=2, scaler=scaler)
    assert [row[4] for row in scaled] == [False, False, True, False, False]
    assert opt.skipped_steps == 1 and opt.steps == 4
    for a, b in zip(plain, scaled):
        assert b[0] == pytest.approx(a[0], rel=1e-6)
        assert b[2] == pytest.approx(a[2], rel=1e-6)
        assert b[3] == pytest.approx(a[3], rel=1e-6)
    assert scaler.get_scale() < 2.0 ** 16  # the inf step backed the scale off


def test_bf16_gradients_are_normed_in_float32():
    """A model in bfloat16: the statistics match a float64 computation over the same bf16 gradients
    (bf16 norms were 7-71% off when mu^2 >> sigma^2 / S). Here mu^2 is 100x sigma^2 / S, so the
    variance is a difference of two numbers 10^4 times larger than it."""
    torch.manual_seed(6)
    w = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    opt = AdaScale(torch.optim.SGD([w], lr=0.0), accumulation_steps=4, smoothing=0.0)
    base = torch.randn(4096) * 3.0
    grads = [(base + 0.05 * torch.randn(4096)).to(torch.bfloat16) for _ in range(4)]
    for c in grads:
        (w @ c).backward()  # this pass's gradient is exactly c
    g_bar = w.grad.double()  # the bf16 sum of the passes, as the optimizer gets it
    opt.step()
    # The hooks saw c; with the loss / accumulation_steps convention g_i = 4 c and g_bar = sum c.
    micro_sum = sum(16 * float(c.double() @ c.double()) for c in grads)
    sigma2 = (micro_sum - 4 * float(g_bar @ g_bar)) / 3
    mu2 = float(g_bar @ g_bar) - sigma2 / 4
    assert sigma2 > 0 and mu2 > 100 * sigma2 / 4
    assert opt.grad_variance == pytest.approx(sigma2, rel=1e-3)
    assert opt.grad_sqnorm == pytest.approx(mu2, rel=1e-5)


def test_param_groups_each_scaled_and_late_groups_refused():
    torch.manual_seed(7)
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    sgd = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    opt = AdaScale(sgd, accumulation_steps=2)
    grads = [torch.randn(3) + 1, torch.randn(3) + 1]
    for c in grads:
        ((a @ c + b @ c) / 2).backward()
    opt.step()
    g_bar = torch.stack(grads).mean(0)
    assert torch.allclose(a.detach(), -opt.gain * 0.1 * g_bar, atol=1e-6)
    assert torch.allclose(b.detach(), -opt.gain * 0.01 * g_bar, atol=1e-7)
    assert [g["lr"] for g in sgd.param_groups] == [0.1, 0.01]  # restored after the step
    opt.zero_grad()
    c = torch.nn.Parameter(torch.zeros(3))
    sgd.add_param_group({"params": [c], "lr": 0.5})  # behind AdaScale's back: never silent
    for _ in range(2):
        ((a.sum() + c.sum()) / 2).backward()
    with pytest.raises(AdaScaleError, match="add_param_group"):
        opt.step()
    opt.zero_grad()
    d = torch.nn.Parameter(torch.zeros(3))
    late = AdaScale(torch.optim.SGD([a], lr=0.1), accumulation_steps=2)
    late.add_param_group({"params": [d], "lr": 0.2})
    for x in (torch.ones(3), -torch.ones(3) * 0.5):
        ((a @ x + d @ (2 * x)) / 2).backward()
    assert late.step()
    assert late.grad_variance > 0 and torch.allclose(d.detach(), -late.gain * 0.2 * torch.full((3,), 0.5), atol=1e-6)


def test_torch_lr_scheduler_composes_with_the_gain():
    torch.manual_seed(8)
    w = torch.nn.Parameter(torch.zeros(4))
    sgd = torch.optim.SGD([w], lr=1.0)
    opt = AdaScale(sgd, accumulation_steps=2, lr_schedule=lambda tau: 0.5)
    sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.1)
    for step in range(3):
        before = w.detach().clone()
        grads = [torch.randn(4) + 1, torch.randn(4) + 1]
        linear_param_step(opt, w, grads)
        expected_lr = 1.0 * 0.1 ** step * 0.5 * opt.gain
        assert opt.learning_rate == pytest.approx(expected_lr)
        assert torch.allclose(w.detach(), before - expected_lr * torch.stack(grads).mean(0), atol=1e-6)
        sched.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(1e-3)  # the scheduler's value, not AdaScale's


def test_state_dict_keeps_accumulation_steps_and_old_states_load():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = AdaScale(torch.optim.SGD([w], lr=0.1), accumulation_steps=3)
    linear_param_step(opt, w, [torch.tensor([1.0, 0]), torch.tensor([0.0, 1]), torch.tensor([1.0, 1])])
    state = copy.deepcopy(opt.state_dict())
    fresh = AdaScale(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    fresh.load_state_dict(state)
    assert fresh.accumulation_steps == 3 and fresh.progress == opt.progress and fresh.gain == opt.gain
    # A state written when the effective lr was left in the groups: the base lr comes back.
    state["optimizer"]["param_groups"][0]["lr"] = 0.37
    state["adascale"]["base_lrs"] = [0.1]
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == 0.1


def test_scale_other_than_gradient_count_counts_scale_one_batches():
    """S = 2n (each micro-batch is two scale-1 batches): sigma^2 doubles, mu^2 and r follow."""
    torch.manual_seed(9)
    grads = [torch.randn(5) + 0.5 for _ in range(4)]
    _, sigma2_micro, _ = paper_gain(grads, 4)
    w = torch.nn.Parameter(torch.zeros(5))
    opt = AdaScale(torch.optim.SGD([w], lr=0.1), scale=8, accumulation_steps=4)
    linear_param_step(opt, w, grads)
    g_bar = torch.stack(grads).double().mean(0)
    assert opt.grad_variance == pytest.approx(2 * sigma2_micro, rel=1e-6)
    assert opt.grad_sqnorm == pytest.approx(float(g_bar @ g_bar) - 2 * sigma2_micro / 8, rel=1e-6)
    assert opt.gain == pytest.approx(gain_ratio(opt.grad_variance, opt.grad_sqnorm, 8), rel=1e-12)
    one = AdaScale(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), scale=4)
    (one.param_groups[0]["params"][0].sum()).backward()
    with pytest.raises(AdaScaleError, match="one gradient"):
        one.step()


def test_distributed_without_attached_ddp_is_an_error(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(AdaScaleError, match="DistributedDataParallel"):
            AdaScale(torch.optim.SGD(dh.make_model().parameters(), lr=0.1)).attach_ddp(dh.make_model())
        model = dh.make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), accumulation_steps=2)
        opt.attach_ddp(ddp)
        with pytest.raises(AdaScaleError, match="attach_ddp"):
            opt.attach_ddp(ddp)  # DDP takes one comm hook
        history = dh.run_steps(model, opt, ddp, lambda s: dh.micro_batches(s, 2), 3, 2)
        plain, _, _ = _accumulated_run(steps=3, accumulation=2)
        assert [row[0] for row in history] == pytest.approx([row[0] for row in plain], rel=1e-6)
        del ddp, model, opt
    finally:
        destroy_process_group()


# ------------------------------------------------------------------------ DDP, several processes


def _run_ddp(world_size: int, tmp_path, **options) -> list[dict]:
    mp.spawn(dh.ddp_worker, args=(world_size, str(tmp_path), options), nprocs=world_size, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


@pytest.mark.slow
@pytest.mark.parametrize("world_size, options", [
    (2, {"accumulation": 1, "large": True}),
    (2, {"accumulation": 2, "large": True, "clip": 1e-2}),
    (2, {"accumulation": 2, "zero": "model", "no_sync": False}),
    (4, {"accumulation": 1}),
    (2, {"accumulation": 2, "scaler": True}),
], ids=["2x1-large", "2x2-large-clipped", "2x2-model-zero-no-no-sync", "4x1", "2x2-grad-scaler"])
def test_ddp_gain_equals_single_process_accumulation(world_size, options, tmp_path):
    """Gains bit-identical on every rank (so replicas stay identical), equal to one process
    accumulating the same micro-batches to 1e-6; a NaN on the last rank skips the step everywhere."""
    steps = 4
    results = _run_ddp(world_size, tmp_path, steps=steps, nan_rank=world_size - 1, nan_step=2, **options)
    for other in results[1:]:
        assert other["history"] == results[0]["history"]
        for p0, p in zip(results[0]["params"], other["params"]):
            assert torch.equal(p0, p)
    assert [h[4] for h in results[0]["history"]] == [False, False, True, False]

    accumulation = options["accumulation"]
    total = world_size * accumulation
    model = dh.make_large_model() if options.get("large") else dh.make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 14) if options.get("scaler") else None
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), accumulation_steps=total,
                   grad_scaler=scaler)
    single = dh.run_steps(model, opt, model, lambda s: dh.micro_batches(s, total), steps, total, nan_at_step=2,
                          clip=options.get("clip"), scaler=scaler)
    for dist_row, single_row in zip(results[0]["history"], single):
        assert dist_row[0] == pytest.approx(single_row[0], rel=1e-6, abs=1e-6)  # gain
        assert dist_row[1] == pytest.approx(single_row[1], rel=1e-6, abs=1e-6)  # tau
        assert dist_row[4] == single_row[4]
    for p_dist, p_single in zip(results[0]["params"], model.parameters()):
        assert torch.allclose(p_dist, p_single.detach(), atol=1e-5)
    assert single[-1][0] > 1.0  # not vacuous: the gain moved away from 1


@pytest.mark.slow
def test_ddp_unused_parameters_get_what_plain_ddp_gives(tmp_path):
    """A head used on one rank only and a parameter no rank uses (find_unused_parameters): the
    gradients before and inside step() and the weights are exactly plain DDP's at scale 1."""
    world_size = 2
    mp.spawn(dh.unused_params_worker, args=(world_size, str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    for seen in ranks:
        for bare_step, ada_step in zip(seen["bare"]["before_step"], seen["adascale"]["before_step"]):
            assert [g is None for g in ada_step] == [g is None for g in bare_step]
            for b, a in zip(bare_step, ada_step):
                if b is not None:
                    assert torch.equal(a, b)
        for b, a in zip(seen["bare"]["params"], seen["adascale"]["params"]):
            assert torch.equal(a, b)
    for p0, p1 in zip(ranks[0]["adascale"]["params"], ranks[1]["adascale"]["params"]):
        assert torch.equal(p0, p1)
