"""``training.precision``: autocast of the forward, loss scaling of the backward, and the update."""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

import torch

from elastic.adascale import AdaScale


class Precision:
    """``training.precision``: how the forward runs and how the update is applied.

    fp32 and bf16 (autocast) back-propagate the loss as it is; fp16 scales it with a dynamic
    GradScaler, unscales before clipping and lets the scaler skip overflowing steps. AdaScale reads
    its statistics during backward, from the unclipped gradients (unscaled by the scaler it is given),
    so the clipping between backward and step does not change them."""

    def __init__(self, kind: str, device: torch.device) -> None:
        self.kind = kind
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if kind == "fp16" else None

    def autocast(self):
        if self.kind == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.kind == "bf16" else torch.float16
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def apply(self, opt: AdaScale, params: Sequence[torch.Tensor], max_grad_norm: float | None) -> tuple[bool, float | None]:
        """Clip (if asked) and step; (update applied, total gradient norm before clipping or None)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        grad_norm = None
        if max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        if self.scaler is None:
            return bool(opt.step()), grad_norm
        skipped_before = opt.skipped_steps
        result = self.scaler.step(opt)
        self.scaler.update()
        applied = bool(result) if result is not None else False
        return applied and opt.skipped_steps == skipped_before, grad_norm

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
