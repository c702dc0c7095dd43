"""The goodput policy (Pollux-style): maximise throughput x statistical efficiency.

Efficiency at a candidate scale is predicted from AdaScale's current sigma^2 / mu^2 estimates,
r(S') / S' (the arithmetic is :mod:`elastic.estimators`', shared with the optimizer); throughput
from a step-time model fitted to the measured step times per world size. Pure: no I/O, no clocks.
This module must not import ray, kubernetes or torch (tests check it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from controller.decisions import (
    Decision,
    JobSnapshot,
    PolicyConfigError,
    PolicyError,
    _bounds_text,
    _decision,
    _is_int,
    _is_real,
    _plural,
    worker_bounds,
)
from elastic.estimators import gain_ratio

__all__ = ["predicted_gain", "predicted_efficiency", "StepTimeModel", "fit_step_time", "GoodputPolicy"]


# --------------------------------------------------------------------------- AdaScale predictions


def predicted_gain(scale: float, sigma2: float, mu2: float) -> float:
    """Gain ratio r(S) = (sigma^2 + mu^2) / (sigma^2 / S + mu^2), in [1, S] (PAPER.md).

    ``sigma2`` (sigma^2, gradient variance of a scale-1 batch) is clipped to >= 1e-6 and ``mu2``
    (mu^2, squared norm of the true gradient) to >= 0, as AdaScale does, so r stays in [1, S].
    """
    if not _is_real(scale) or scale < 1:
        raise PolicyError(f"scale must be a finite number >= 1, got {scale!r}")
    if not _is_real(sigma2) or not _is_real(mu2):
        raise PolicyError(f"sigma2 and mu2 must be finite numbers, got {sigma2!r} and {mu2!r}")
    return gain_ratio(float(sigma2), float(mu2), scale)


def predicted_efficiency(scale: float, sigma2: float, mu2: float) -> float:
    """Statistical efficiency r(S) / S in [1/S, 1]: the fraction of scale-S samples that count."""
    return predicted_gain(scale, sigma2, mu2) / scale


# --------------------------------------------------------------------------- step-time model


@dataclass(frozen=True)
class StepTimeModel:
    """Predicted step seconds t(n) = intercept_s + slope_s_per_worker * n, positive for n >= 1.

    With a fixed per-worker batch, a data-parallel step costs the same compute at every size plus
    communication that grows with the world size, hence the affine model.
    """

    intercept_s: float
    slope_s_per_worker: float

    def __call__(self, workers: int) -> float:
        return self.intercept_s + self.slope_s_per_worker * workers


def fit_step_time(step_time_s_by_workers: Mapping[int, float]) -> StepTimeModel:
    """Least-squares fit of t(n) = a + b*n to the measured (workers, seconds) points.

    * One measured size: t(n) = t1 for every n (perfect scaling assumed until a second size is seen).
    * b < 0 (more workers measured faster: noise) is clipped to b = 0, a = mean(t).
    * a < 0 (would predict t <= 0 at small n) falls back to the fit through the origin, t = b'n.
    Every branch keeps t(n) > 0 for n >= 1.
    """
    if not step_time_s_by_workers:
        raise PolicyError("step_time_s_by_workers is empty: no step time measured yet")
    points = sorted(step_time_s_by_workers.items())
    ns = [float(n) for n, _ in points]
    ts = [float(t) for _, t in points]
    mean_t = sum(ts) / len(ts)
    if len(points) == 1:
        return StepTimeModel(mean_t, 0.0)
    mean_n = sum(ns) / len(ns)
    var_n = sum((n - mean_n) ** 2 for n in ns)
    slope = sum((n - mean_n) * (t - mean_t) for n, t in zip(ns, ts)) / var_n
    if slope <= 0:
        return StepTimeModel(mean_t, 0.0)
    intercept = mean_t - slope * mean_n
    if intercept < 0:
        return StepTimeModel(0.0, sum(n * t for n, t in zip(ns, ts)) / sum(n * n for n in ns))
    return StepTimeModel(intercept, slope)



# --------------------------------------------------------------------------- goodput


@dataclass(frozen=True)
class _Prediction:
    workers: int
    efficiency: float
    goodput: float  # tau per second


@dataclass(frozen=True)
class GoodputPolicy:
    """Choose the size that maximises predicted goodput, in tau (scale-invariant iterations) per second.

    For a candidate n workers, S' = n * accumulation_steps and, with the paper's symbols,

        throughput(n) = S' / t(n)                 scale-1 batches per second (batch size cancels)
        efficiency(n) = r(S') / S'                r from AdaScale's sigma^2 and mu^2 (predicted_gain)
        goodput(n)    = throughput * efficiency = r(S') / t(n)

    where t(n) is the step-time model fitted to the measured sizes (:func:`fit_step_time`).

    Candidates are n in [min, min(max, capacity)].  A size other than the current one is eligible
    only if efficiency >= ``min_efficiency`` (``min_workers`` is always eligible); the current size
    stays eligible down to ``min_efficiency / (1 + hysteresis)**2``.  The policy moves to the best
    eligible size (ties: fewer workers) only when its goodput beats the current size's by more than
    the factor (1 + ``hysteresis``) -- or when the current size is no longer eligible -- and at least
    ``cooldown_s`` after the last resize.  ``max_step`` (if set) limits how many workers one decision
    adds or removes.  A current size outside the bounds is clamped at once, ignoring hysteresis and
    cooldown.

    Why these bands: undoing a move A -> B needs a predicted log-goodput ratio or a log-efficiency
    to swing by 2 ln(1 + h) between two snapshots.  If sigma^2 and mu^2 are each estimated within
    +-j, every such quantity moves by less than ln((1+j)/(1-j)), so the policy never flaps
    (A -> B -> A with the truth unchanged) when h >= (1+j)/(1-j) - 1, about 2j
    (tests/test_policy.py checks this property).

    Without gradient statistics (at S = 1 AdaScale has nothing to estimate) the policy grows to the
    smallest size with S >= 2 so that they can be measured; without any step time it keeps the size.
    """

    min_efficiency: float = 0.5
    """Efficiency floor r/S for growing to a size (0 <= floor <= 1)."""
    hysteresis: float = 0.05
    """Relative goodput improvement a move must exceed; also widens the floor for the current size."""
    cooldown_s: float = 30.0
    """Seconds after the last resize during which the policy does not move by preference."""
    max_step: int | None = None
    """Most workers added or removed by one decision; None for no limit."""

    def __post_init__(self) -> None:
        if not _is_real(self.min_efficiency) or not 0.0 <= self.min_efficiency <= 1.0:
            raise PolicyConfigError(f"goodput min_efficiency must be in [0, 1], got {self.min_efficiency!r}")
        if not _is_real(self.hysteresis) or self.hysteresis < 0:
            raise PolicyConfigError(f"goodput hysteresis must be a finite number >= 0, got {self.hysteresis!r}")
        if not _is_real(self.cooldown_s) or self.cooldown_s < 0:
            raise PolicyConfigError(f"goodput cooldown_s must be a finite number >= 0, got {self.cooldown_s!r}")
        if self.max_step is not None and (not _is_int(self.max_step) or self.max_step < 1):
            raise PolicyConfigError(f"goodput max_step must be an integer >= 1 or None, got {self.max_step!r}")

    def _cooldown_left_s(self, snapshot: JobSnapshot) -> float:
        if snapshot.last_resize_s is None:
            return 0.0
        return max(0.0, self.cooldown_s - (snapshot.now_s - snapshot.last_resize_s))

    def _limit_step(self, start: int, wanted: int) -> int:
        if self.max_step is None:
            return wanted
        return start + max(-self.max_step, min(self.max_step, wanted - start))

    def decide(self, snapshot: JobSnapshot) -> Decision:
        low, high = worker_bounds(snapshot)
        current = snapshot.current_workers
        # Where the bounds force us, whatever the preference (ignores hysteresis and cooldown).
        start = min(max(current, low), high)
        forced = ""
        if start != current:
            forced = f"{_plural(current)} outside bounds ({_bounds_text(snapshot)}); "
        if snapshot.total_progress is not None and snapshot.progress >= snapshot.total_progress:
            return _decision(snapshot, start, f"{forced}job finished (tau {snapshot.progress:.1f})")

        cooldown_left_s = self._cooldown_left_s(snapshot)
        sigma2, mu2 = snapshot.grad_variance, snapshot.grad_sqnorm
        acc = snapshot.accumulation_steps
        if sigma2 is None or mu2 is None:
            explore = max(start, math.ceil(2 / acc))
            if start * acc >= 2 or explore > high:
                return _decision(snapshot, start, f"{forced}no gradient statistics yet: keeping {_plural(start)}")
            if cooldown_left_s > 0:
                return _decision(snapshot, start, f"{forced}no gradient statistics yet; cooldown {cooldown_left_s:.1f} s left")
            return _decision(
                snapshot,
                self._limit_step(start, explore),
                f"{forced}no gradient statistics at scale 1: growing to {_plural(explore)} to measure them",
            )
        if not snapshot.step_time_s_by_workers:
            return _decision(snapshot, start, f"{forced}no step time measured yet: keeping {_plural(start)}")

        model = fit_step_time(snapshot.step_time_s_by_workers)

        def predict(n: int) -> _Prediction:
            scale = n * acc
            gain = predicted_gain(scale, sigma2, mu2)
            return _Prediction(n, gain / scale, gain / model(n))

        predictions = {n: predict(n) for n in range(low, high + 1)}
        eligible = [p for p in predictions.values() if p.workers == low or p.efficiency >= self.min_efficiency]
        # Ties go to the fewer workers (cheaper).
        best = max(eligible, key=lambda p: (p.goodput, -p.workers))
        here = predictions[start]
        floor_here = self.min_efficiency / (1.0 + self.hysteresis) ** 2
        summary = (
            f"goodput {_plural(best.workers)} {best.goodput:#.3g} vs {_plural(start)} {here.goodput:#.3g} tau/s "
            f"(eff {best.efficiency:.2f} vs {here.efficiency:.2f})"
        )
        if start != low and here.efficiency < floor_here:
            why = f"efficiency {here.efficiency:.2f} at {_plural(start)} below floor {self.min_efficiency:g}; {summary}"
        elif best.workers != start and best.goodput > here.goodput * (1.0 + self.hysteresis):
            why = summary
        else:
            return _decision(snapshot, start, f"{forced}{summary}: within hysteresis {self.hysteresis:g}")
        if cooldown_left_s > 0:
            return _decision(snapshot, start, f"{forced}{why}; cooldown {cooldown_left_s:.1f} s left")
        return _decision(snapshot, self._limit_step(start, best.workers), f"{forced}{why}")
