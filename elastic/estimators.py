"""AdaScale's estimator arithmetic, torch-free: one home for the optimizer and the goodput policy.

Symbols are PAPER.md's. A step averages ``n`` micro-batch gradients ``g_i`` (``n = world_size *
accumulation_steps``) into ``g_bar``; the step's scale ``S`` counts scale-1 batches, so one
micro-batch is ``S / n`` scale-1 batches (1 when ``S = n``, the default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: sigma^2 is clipped from below so that r stays finite and inside [1, S].
MIN_VARIANCE = 1e-6


def gain_ratio(grad_variance: float, grad_sqnorm: float, scale: float) -> float:
    """r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2), with sigma^2 >= 1e-6 and mu^2 >= 0, in [1, S]."""
    sigma2 = max(grad_variance, MIN_VARIANCE)
    mu2 = max(grad_sqnorm, 0.0)
    return min(max((sigma2 + mu2) / (sigma2 / scale + mu2), 1.0), float(scale))


def step_estimates(micro_sqnorm_sum: float, mean_sqnorm: float, num_grads: int, scale: float) -> tuple[float, float]:
    """Unbiased (sigma2_hat, mu2_hat) of scale-1 quantities from one step's ``num_grads`` >= 2 gradients.

    ``micro_sqnorm_sum`` is sum_i ||g_i||^2 over the micro-batch gradients, ``mean_sqnorm`` is
    ||g_bar||^2. With n micro-batches of S / n scale-1 batches each (PAPER.md when S = n):

        sigma2_hat = (S / n) * (sum_i ||g_i||^2 - n ||g_bar||^2) / (n - 1)
        mu2_hat    = ||g_bar||^2 - sigma2_hat / S
    """
    if num_grads < 2:
        raise ValueError(f"num_grads: the variance needs at least 2 gradients, got {num_grads}")
    micro_variance = (micro_sqnorm_sum - num_grads * mean_sqnorm) / (num_grads - 1)
    sigma2_hat = micro_variance * scale / num_grads
    return sigma2_hat, mean_sqnorm - sigma2_hat / scale


def default_smoothing(scale: float) -> float:
    """The paper's theta = max(1 - S/1000, 0)."""
    return max(1.0 - scale / 1000.0, 0.0)


@dataclass
class SmoothedEstimates:
    """sigma^2 and mu^2 averaged over steps: a plain mean of the first 1/(1 - theta) estimates,
    then an exponential moving average with factor theta (a debiased EMA)."""

    sigma2: float = 0.0
    """Smoothed sigma^2: variance (trace of the covariance) of one scale-1 batch gradient."""
    mu2: float = 0.0
    """Smoothed mu^2: squared norm of the true gradient."""
    count: int = 0
    """Estimates folded in so far (0: nothing measured yet)."""

    def fold(self, sigma2_hat: float, mu2_hat: float, theta: float) -> None:
        if not (math.isfinite(sigma2_hat) and math.isfinite(mu2_hat)):
            raise ValueError("estimates must be finite")
        self.count += 1
        weight = max(1.0 / self.count, 1.0 - theta)
        self.sigma2 += weight * (sigma2_hat - self.sigma2)
        self.mu2 += weight * (mu2_hat - self.mu2)

    def gain_at(self, scale: float) -> float:
        """The gain these estimates predict at scale S (1.0 before any estimate)."""
        return gain_ratio(self.sigma2, self.mu2, scale) if self.count else 1.0
