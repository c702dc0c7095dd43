"""The torch-free estimator arithmetic shared by AdaScale and the goodput policy."""

from __future__ import annotations

import math
import sys

import pytest

from elastic.estimators import MIN_VARIANCE, SmoothedEstimates, gain_ratio, step_estimates


def test_module_is_torch_free():
    import subprocess

    code = "import sys, elastic.estimators, controller.policy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_step_estimates_are_the_papers_when_scale_is_the_gradient_count():
    # g = [1, 0], [-1, 0], [3, 0]: sum ||g_i||^2 = 11, g_bar = [1, 0]
    sigma2, mu2 = step_estimates(11.0, 1.0, 3, 3)
    assert sigma2 == pytest.approx((11 - 3 * 1) / 2)
    assert mu2 == pytest.approx(1 - sigma2 / 3)


def test_step_estimates_count_scale_one_batches():
    # Each of 4 micro-batches is two scale-1 batches (S = 8): the scale-1 variance is twice the micro one.
    micro_sigma2, _ = step_estimates(20.0, 2.0, 4, 4)
    sigma2, mu2 = step_estimates(20.0, 2.0, 4, 8)
    assert sigma2 == pytest.approx(2 * micro_sigma2)
    assert mu2 == pytest.approx(2.0 - sigma2 / 8)
    with pytest.raises(ValueError, match="at least 2"):
        step_estimates(1.0, 1.0, 1, 1)


def test_gain_ratio_bounds_and_golden_values():
    assert gain_ratio(2.0, 0.0, 4) == 4.0  # all noise: r = S
    assert gain_ratio(0.0, 1.0, 4) == pytest.approx((MIN_VARIANCE + 1) / (MIN_VARIANCE / 4 + 1))
    assert gain_ratio(1.0, 1.0, 2) == pytest.approx(2 / 1.5)
    assert gain_ratio(1.0, -5.0, 8) == 8.0  # mu^2 clipped to 0


def test_smoothed_estimates_plain_mean_then_ema():
    est = SmoothedEstimates()
    assert est.gain_at(8) == 1.0  # nothing measured yet
    for value in (1.0, 3.0, 5.0, 7.0):
        est.fold(value, 2 * value, theta=0.5)
    # weights 1, 1/2, max(1/3, 0.5), 0.5
    expect = 1.0
    for n, v in enumerate((3.0, 5.0, 7.0), start=2):
        expect += max(1 / n, 0.5) * (v - expect)
    assert est.sigma2 == pytest.approx(expect) and est.mu2 == pytest.approx(2 * expect) and est.count == 4
    with pytest.raises(ValueError):
        est.fold(math.nan, 1.0, 0.5)
