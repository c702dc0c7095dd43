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
    """S = 1 (no statistics) still checks: a bad step is skipped, and the fused check's flag is
    reset, so the finite steps before and after it run."""
    w = torch.nn.Parameter(torch.zeros(3))
    opt = AdaScale(torch.optim.SGD([w], lr=0.1))
    results = []
    for grad in ([1.0, 2.0, 3.0], [bad, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.0, 0.0]):
        w.grad = torch.tensor(grad)
        results.append(opt.step())
        opt.zero_grad()
    assert results == [True, False, True, True]
    assert (opt.steps, opt.skipped_steps, opt.progress) == (3, 1, 3.0)
    assert torch.allclose(w.detach(), -0.1 * torch.tensor([4.0, 3.0, 4.0]))


def _mixed_usage_run(flat: bool, monkeypatch, packed: bool = True) -> tuple[list, list, list[bool]]:
    """Steps with accumulation, the caller's own zeroing, no zeroing, S=1, NaNs and unused params."""
    from elastic import adascale as adascale_module

    monkeypatch.setattr(adascale_module, "FLAT_MAX_NUMEL", 1 << 18 if flat else 0)
    monkeypatch.setattr(adascale_module, "PASSES_FLATTEN_NUMEL", 1 << 21 if packed else 0)
    model = dh.make_model()
    unused = torch.nn.Parameter(torch.ones(3))
    opt = AdaScale(torch.optim.SGD([*model.parameters(), unused], lr=0.05, momentum=0.9, weight_decay=1e-2),
                   accumulation_steps=3)
    history, absent = [], []

    def steps(first: int, count: int, acc: int, zero=opt.zero_grad, nan_at=None):
        history.extend(dh.run_steps(model, opt, model, lambda s: dh.micro_batches(first + s, acc), count, acc,
                                    nan_at_step=nan_at, zero_grad=zero))
        absent.append(unused.grad is None)

    steps(0, 3, 3)
    steps(3, 2, 3, zero=model.zero_grad, nan_at=1)  # the caller zeroes (set_to_none) instead
    steps(5, 2, 3, zero=lambda: None)  # no zeroing between steps: the old g_bar stays in .grad
    opt.zero_grad(set_to_none=False)
    opt.set_scale(1, accumulation_steps=1)
    steps(7, 3, 1, nan_at=1)  # one gradient per step: only the non-finite check
    opt.set_scale(2, accumulation_steps=2)
    steps(10, 3, 2)
    if flat:  # the mode under test was really used: .grad lives in the flat buffer
        storage = opt._flat.untyped_storage().data_ptr()
        assert all(p.grad.untyped_storage().data_ptr() == storage for p in model.parameters())
    return history, [p.detach().clone() for p in (*model.parameters(), unused)], absent


@pytest.mark.parametrize("packed", [True, False], ids=["one-copy", "foreach"])
def test_flat_gradient_buffer_matches_per_tensor_norms(monkeypatch, packed):
    """A small model accumulating in one process keeps .grad as views of one buffer and norms every
    pass's gradients at step() (packed into one copy, or one norm each): same gains, skips and
    weights as the per-tensor hooks, and an unused parameter still reaches the inner optimizer as None."""
    flat_hist, flat_weights, flat_absent = _mixed_usage_run(True, monkeypatch, packed)
    ref_hist, ref_weights, ref_absent = _mixed_usage_run(False, monkeypatch)
    assert [h[4] for h in flat_hist] == [h[4] for h in ref_hist]
    assert sum(h[4] for h in flat_hist) == 2  # both NaN steps were skipped
    for got, want in zip(flat_hist, ref_hist):
        assert got[:4] == pytest.approx(want[:4], rel=1e-5, abs=1e-7)
    assert flat_hist[-1][0] > 1.0
    for got, want in zip(flat_weights, ref_weights):
        assert torch.allclose(got, want, atol=1e-6)
    assert flat_absent == ref_absent
    assert flat_absent[:2] == [True, True]  # and the unused weights were never decayed
    assert torch.equal(flat_weights[-1], torch.ones(3))


@pytest.mark.parametrize("swap", ["copy", "zeros"])
def test_grad_replaced_during_a_flat_step(swap):
    """A .grad replaced (not in place) between the passes of a step no longer accumulates into the
    flat buffer. A copy still holds the passes' sum: the step is measured as if nothing happened.
    Anything else (here zeros, dropping pass 1) does not fit the passes: the step folds no estimate,
    updates with the gradient the caller left, and the next step is measured again."""
    torch.manual_seed(7)
    w, twin, ref = (torch.nn.Parameter(torch.zeros(4)) for _ in range(3))
    opt = AdaScale(torch.optim.SGD([w], lr=0.1), accumulation_steps=2)
    twin_opt = AdaScale(torch.optim.SGD([twin], lr=0.1), accumulation_steps=2)  # never swapped
    plain = torch.optim.SGD([ref], lr=0.1)
    first = [torch.randn(4) + 1.0 for _ in range(2)]
    linear_param_step(opt, w, first)
    linear_param_step(twin_opt, twin, first)
    ref.data.copy_(w.data)
    assert opt.num_estimates == 1
    grads = [torch.randn(4) + 1.0 for _ in range(2)]
    (w @ grads[0] / 2).backward()
    w.grad = w.grad.clone() if swap == "copy" else torch.zeros(4)  # pass 2 accumulates into the new one
    (w @ grads[1] / 2).backward()
    assert opt.step()
    linear_param_step(twin_opt, twin, grads)
    if swap == "copy":
        assert opt.num_estimates == 2
        assert (opt.gain, opt.grad_variance, opt.grad_sqnorm) == (twin_opt.gain, twin_opt.grad_variance,
                                                                  twin_opt.grad_sqnorm)
        assert torch.equal(w.detach(), twin.detach())
    else:
        assert opt.num_estimates == 1
        plain.param_groups[0]["lr"] = 0.1 * opt.gain
        ref.grad = grads[1] / 2
        plain.step()
        assert torch.allclose(w.detach(), ref.detach(), atol=1e-6)
    assert w.grad.untyped_storage().data_ptr() == opt._flat.untyped_storage().data_ptr()  # adopted
    opt.zero_grad()
    linear_param_step(opt, w, [torch.randn(4) + 1.0 for _ in range(2)])
    assert opt.num_estimates == (3 if swap == "copy" else 2)


def test_zero_grad_rearms_a_resting_optimizer_when_the_world_changes(monkeypatch):
    """Resting (S = 1: nothing armed), zero_grad skips the reset and re-arm, but not the world
    size: a group that grew or shrank since the step arms or disarms the hooks."""
    w = torch.nn.Parameter(torch.zeros(4))
    opt = AdaScale(torch.optim.SGD([w], lr=0.01))
    assert linear_param_step(opt, w, [torch.randn(4)])
    assert opt._handles == []
    monkeypatch.setattr(opt, "_world_size", lambda: 2)
    opt.zero_grad()
    assert len(opt._handles) == 1
    monkeypatch.setattr(opt, "_world_size", lambda: 1)
    opt.zero_grad()
    assert opt._handles == []
    opt.accumulation_steps = 2  # by hand, not through set_scale
    opt.zero_grad()
    assert len(opt._handles) == 1


def test_no_hooks_while_one_gradient_per_step(monkeypatch):
    """S = 1 costs no tensor hooks; they are armed again when S grows (also unseen, between steps)."""
    torch.manual_seed(6)
    w = torch.nn.Parameter(torch.zeros(4))
    opt = AdaScale(torch.optim.SGD([w], lr=0.01))
    assert opt._handles == []
    with pytest.raises(AdaScaleError, match="before any backward"):
        opt.step()
    assert linear_param_step(opt, w, [torch.randn(4)]) and opt.gain == 1.0
    assert not linear_param_step(opt, w, [torch.tensor([float("nan"), 0, 0, 0])])
    opt.set_scale(2, accumulation_steps=2)
    assert len(opt._handles) == 1
    for _ in range(3):
        linear_param_step(opt, w, [torch.randn(4) + 1.0 for _ in range(2)])
    estimates = (opt.num_estimates, opt.grad_variance, opt.grad_sqnorm)
    opt.set_scale(1, accumulation_steps=1)
    assert opt._handles == []
    # The process group grows to 2 ranks after zero_grad looked: this step measured nothing, so it
    # applies the gain the estimates predict at S = 2, and the next step is measured again.
    monkeypatch.setattr(opt, "_world_size", lambda: 2)
    opt._fixed_scale = None
    (w @ torch.randn(4)).backward()
    assert opt.step()
    assert (opt.num_estimates, opt.grad_variance, opt.grad_sqnorm) == estimates
    assert opt.gain == pytest.approx(gain_ratio(estimates[1], estimates[2], 2))
    assert len(opt._handles) == 1  # armed for the next step
    monkeypatch.undo()  # (a real second rank would need a process group; measure locally instead)
    opt.set_scale(2, accumulation_steps=2)
    linear_param_step(opt, w, [torch.randn(4) + 1.0 for _ in range(2)])
    assert opt.num_estimates == estimates[0] + 1
    opt.remove_hooks()
    opt.zero_grad()
    assert opt._handles == []


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


def _run_ddp(world_size: int, accumulation: int, steps: int, tmp_path, nan_rank=None, nan_step=None, **options):
    mp.spawn(dh.ddp_worker, args=(world_size, accumulation, steps, nan_rank, nan_step, str(tmp_path),
                                  options.get("attach", False), options.get("no_sync", True),
                                  options.get("piggyback_max"), options.get("flat_max"),
                                  options.get("zero", "adascale")),
             nprocs=world_size, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


@pytest.mark.slow
@pytest.mark.parametrize("world_size, accumulation, options", [
    (2, 1, {}),
    (2, 2, {}),
    (4, 1, {}),
    # Attached (AdaScale.attach_ddp) to this small model, AdaScale all-reduces the flat gradient
    # buffer with the statistics in its tail, in step(); DDP's reducer stays idle, also for a
    # caller who does not use no_sync.
    (4, 1, {"attach": True}),
    (2, 2, {"attach": True}),
    (2, 2, {"attach": True, "no_sync": False}),
    # FLAT_MAX_NUMEL = 0 (a large model): the statistics ride on DDP's all-reduce in its comm hook,
    # packed into the last bucket, or as a separate one-float reduce.
    (2, 1, {"attach": True, "flat_max": 0}),
    (2, 2, {"attach": True, "flat_max": 0}),
    (2, 1, {"attach": True, "flat_max": 0, "piggyback_max": 0}),
], ids=["2x1", "2x2", "4x1", "4x1-attached-flat", "2x2-attached-flat", "2x2-attached-flat-no-no-sync",
        "2x1-attached-buckets", "2x2-attached-hooks", "2x1-attached-separate-reduce"])
def test_ddp_gain_equals_single_process_accumulation(world_size, accumulation, options, tmp_path):
    steps = 4
    results = _run_ddp(world_size, accumulation, steps, tmp_path, nan_rank=world_size - 1, nan_step=2, **options)
    # Every rank computes the same gains, and the NaN injected on the last rank skipped step 2 everywhere.
    for other in results[1:]:
        assert other["history"] == results[0]["history"]
    assert [h[4] for h in results[0]["history"]] == [False, False, True, False]
    # One synced backward pass per step into an attached DDP model: the comm hook sees it all.
    attached = bool(options.get("attach"))
    comm_hook = attached and options.get("flat_max") == 0
    hooks_needed = not (comm_hook and accumulation == 1)
    assert all((r["tensor_hooks"] > 0) == hooks_needed for r in results)
    # DDP's own gradient sync is off exactly when AdaScale all-reduces the flat buffer itself.
    flat_sync = attached and not comm_hook
    assert all(r["ddp_sync"] == (not flat_sync) for r in results)

    total = world_size * accumulation
    model = dh.make_model()
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), accumulation_steps=total)
    single = dh.run_steps(model, opt, model, lambda s: dh.micro_batches(s, total), steps, total, nan_at_step=2)
    for dist_row, single_row in zip(results[0]["history"], single):
        assert dist_row[0] == pytest.approx(single_row[0], rel=1e-6, abs=1e-6)  # gain
        assert dist_row[1] == pytest.approx(single_row[1], rel=1e-6, abs=1e-6)  # tau
        assert dist_row[4] == single_row[4]
    for p_dist, p_single in zip(results[0]["params"], model.parameters()):
        assert torch.allclose(p_dist, p_single.detach(), atol=1e-5)
    assert single[-1][0] > 1.0  # the test is not vacuous: the gain moved away from 1


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["none", "model"])
def test_attached_flat_one_pass_without_adascale_zero_grad(zero, tmp_path):
    """With one pass per step, the buffer's own dot stands for the pass's norm, but only in a buffer
    that AdaScale.zero_grad zeroed: gradients carried over from the last step (``none``) or set to
    None by the model (``model``) must still give the gains of one process accumulating the same
    micro-batches, ended the same way."""
    steps, world = 4, 2
    results = _run_ddp(world, 1, steps, tmp_path, attach=True, zero=zero)
    assert results[1]["history"] == results[0]["history"]
    assert not results[0]["ddp_sync"]  # AdaScale's own flat all-reduce ran
    model = dh.make_model()
    opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), accumulation_steps=world)
    opt.zero_grad()
    single = dh.run_steps(model, opt, model, lambda s: dh.micro_batches(s, world), steps, world,
                          zero_grad=dh.zero_grad_for(zero, model, opt))
    for dist_row, single_row in zip(results[0]["history"], single):
        assert dist_row[0] == pytest.approx(single_row[0], rel=1e-6, abs=1e-6)  # gain
        assert dist_row[2] == pytest.approx(single_row[2], rel=1e-5, abs=1e-7)  # sigma^2
    assert single[-1][0] > 1.0 and not any(row[4] for row in single)


@pytest.mark.parametrize("flat", [True, False], ids=["flat-sync", "comm-hook"])
@pytest.mark.parametrize("bucket_view", [False, True], ids=["copied-grads", "gradient-as-bucket-view"])
def test_attach_ddp_carries_statistics_in_ddp_all_reduce(tmp_path, monkeypatch, bucket_view, flat):
    """One-process gloo group: with attach_ddp, step() runs no all-reduce beside the gradients' own
    and gets the same gains and weights as without; misuse is a typed error. A small model leaves
    DDP's reducer idle (AdaScale reduces its flat buffer; with one rank there is nothing to reduce)
    until remove_hooks(); with FLAT_MAX_NUMEL = 0 the statistics ride on DDP's comm hook."""
    import torch.distributed as dist

    from elastic import adascale as adascale_module

    if not flat:
        monkeypatch.setattr(adascale_module, "FLAT_MAX_NUMEL", 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(AdaScaleError, match="DistributedDataParallel"):
            AdaScale(torch.optim.SGD(dh.make_model().parameters(), lr=0.1)).attach_ddp(dh.make_model())
        gains, weights = {}, {}
        for attach in (False, True):
            model = dh.make_model()
            ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
            opt = AdaScale(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), accumulation_steps=2)
            if attach:
                opt.attach_ddp(ddp)
                with pytest.raises(AdaScaleError, match="attach_ddp"):
                    opt.attach_ddp(ddp)  # DDP takes one comm hook
            calls = {"step": 0, "comm hook": 0}
            real, real_async = adascale_module.dist.all_reduce, adascale_module._all_reduce

            def counted(key, fn):
                def call(*a, **k):
                    calls[key] += 1
                    return fn(*a, **k)
                return call

            monkeypatch.setattr(adascale_module.dist, "all_reduce", counted("step", real))
            monkeypatch.setattr(adascale_module, "_all_reduce", counted("comm hook", real_async))
            history = dh.run_steps(model, opt, ddp, lambda s: dh.micro_batches(s, 2), 3, 2)
            monkeypatch.setattr(adascale_module.dist, "all_reduce", real)
            monkeypatch.setattr(adascale_module, "_all_reduce", real_async)
            gains[attach] = [row[0] for row in history]
            weights[attach] = [p.detach().clone() for p in model.parameters()]
            if attach and not flat:  # the statistics rode on DDP's own reduction: step() ran none of its own
                assert calls == {"step": 0, "comm hook": 3}
            else:  # one rank: AdaScale reduces nothing, and without a comm hook neither does DDP's
                assert calls == {"step": 0, "comm hook": 0}
            # Attached to a small model, AdaScale holds DDP's gradient sync off, and gives it back.
            assert ddp.require_backward_grad_sync is not (attach and flat)
            opt.remove_hooks()
            assert ddp.require_backward_grad_sync
        assert gains[True] == pytest.approx(gains[False], rel=1e-6)  # float32 sums in a different order
        assert gains[True][-1] > 1.0
        for attached, plain in zip(weights[True], weights[False]):
            assert torch.allclose(attached, plain, atol=1e-6)
    finally:
        destroy_process_group()


@pytest.mark.slow
def test_attached_flat_sync_gives_the_optimizer_what_ddp_gives(tmp_path):
    """A head used on one rank only and a parameter no rank uses: with AdaScale reducing the flat
    buffer itself, the gradients after backward() and those the inner optimizer sees are exactly
    DDP's (find_unused_parameters), None for the unused one included, and the weights stay
    identical across ranks."""
    world_size = 2
    mp.spawn(dh.unused_params_worker, args=(world_size, str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    for seen in ranks:
        # Between backward() and step() the gradients are already averaged, as with DDP's reducer
        # (the spare parameter aside: None there until step() knows no rank reached it).
        for bare_step, ada_step in zip(seen["bare"]["before_step"], seen["adascale"]["before_step"]):
            for b, a in zip(bare_step[:-2], ada_step[:-2]):
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
        for bare_step, ada_step in zip(seen["bare"]["grads"], seen["adascale"]["grads"]):
            assert [g is None for g in ada_step] == [g is None for g in bare_step]
            assert bare_step[-1] is None and bare_step[-2] is None  # spare: reached by no rank
            for b, a in zip(bare_step, ada_step):
                if b is not None:
                    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
            assert bare_step[2].abs().sum() > 0  # head_a: rank 0's gradient, averaged onto both ranks
        for b, a in zip(seen["bare"]["params"], seen["adascale"]["params"]):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    for p0, p1 in zip(ranks[0]["adascale"]["params"], ranks[1]["adascale"]["params"]):
        assert torch.equal(p0, p1)


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["adascale", "model", "none"])
def test_attached_flat_no_gradient_flags_do_not_outlive_their_step(zero, tmp_path):
    """The tail's "no gradient" flags of one step (head_a reached by no rank) must not mark head_a
    gradient-less at the next step, which reaches every parameter, however the caller zeroes
    between steps (opt.zero_grad zeroes the flags with the buffer; otherwise the all-reduce does)."""
    world_size = 2
    mp.spawn(dh.head_switch_worker, args=(world_size, str(tmp_path), zero), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    initial = [p.detach() for p in dh.TwoHeads(spare=False).head_a.parameters()]
    for seen in ranks:
        assert seen["none"] == [[True, True], [False, False]]
        assert all(not torch.equal(a, b) for a, b in zip(seen["head_a"], initial))  # step 1 moved it
    for a, b in zip(ranks[0]["head_a"], ranks[1]["head_a"]):
        assert torch.equal(a, b)
