"""The normalization layers torch lacks: Batch Renormalization, FRN + TLU, EvoNorm-S0 and -B0.

timm (1.0.31) is the usual source for the last three (``FilterResponseNormTlu2d``,
``EvoNorm2dS0``, ``EvoNorm2dB0``); they are written here instead, for measured reasons:

* timm's FRN keeps ε a fixed constant; the paper's Algorithm 1 learns it
  (``x * rsqrt(nu2 + abs(eps))``, "eps: a scalar constant or learnable variable").
* timm's EvoNorms compute their statistics with ``x.float()``, in float32 even for float64 input,
  so ``torch.autograd.gradcheck`` in float64 fails on them (Jacobian mismatch from float32
  rounding): their gradient cannot be checked against finite differences, as every layer's here is.
  A channel count their group count does not divide fails an assertion with an empty message.
* ``import timm.layers`` costs 1.5-1.9 s per job on top of torch (median 1.6 s of 5, loaded 2-core
  machine) and brings huggingface_hub, safetensors and httpx, none of which normsweep uses.
* Batch Renormalization is in neither torch nor timm.

tests/test_norm_layers.py checks each layer against its paper's formula (forward, and gradients
by float64 gradcheck) and, where timm is installed (the ``test`` extra), the EvoNorms against
timm's within float32 rounding. Statistics are computed in at least float32 and the result is
returned in the input's dtype, so the layers run under bf16 autocast as torch's norms do.
"""

from __future__ import annotations

import torch
from torch import nn


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _precise(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype its statistics are computed in: float32 for bf16/fp16/fp32, float64 for float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _std(var: torch.Tensor, eps: float) -> torch.Tensor:
    return (var + eps).sqrt()


class BatchRenorm2d(nn.Module):
    """Batch Renormalization (Ioffe 2017, arXiv:1702.03275, Algorithm 1) for conv feature maps.

    Training, per channel over (N, H, W): ``σ_B = sqrt(var_B + ε)`` (biased variance),
    ``r = clip(σ_B / σ, 1/r_max, r_max)``, ``d = clip((μ_B − μ) / σ, −d_max, d_max)``, both held
    constant in backpropagation, ``y = γ · ((x − μ_B) / σ_B · r + d) + β``; then the moving averages
    move toward the batch's: ``μ += α (μ_B − μ)``, ``σ += α (σ_B − σ)``. Evaluation:
    ``y = γ (x − μ) / σ + β``. With r = 1 and d = 0 training is exactly BatchNorm's.

    The clipping bounds warm up as the paper's: plain BatchNorm (``r_max = 1``, ``d_max = 0``) for
    the first ``warmup_steps`` training steps, then relaxed linearly (the paper: "gradually") to reach
    ``r_max`` at step ``r_max_steps`` and ``d_max`` at step ``d_max_steps``. A step is one training
    forward pass of this layer, counted in the ``num_batches_tracked`` buffer; it is saved with the
    weights, so a resumed run continues the schedule where it stopped.
    """

    momentum = 0.1  # α, as nn.BatchNorm2d's
    eps = 1e-5  # as nn.BatchNorm2d's

    def __init__(self, channels: int, r_max: float, d_max: float, warmup_steps: int, r_max_steps: int,
                 d_max_steps: int):  # fmt: skip
        super().__init__()
        self.r_max, self.d_max = r_max, d_max
        self.warmup_steps, self.r_max_steps, self.d_max_steps = warmup_steps, r_max_steps, d_max_steps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_std", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _ramp(self, step: int, reached_at: int, start: float, end: float) -> float:
        if step < self.warmup_steps:
            return start
        if reached_at <= self.warmup_steps:
            return end
        return start + min(1.0, (step - self.warmup_steps) / (reached_at - self.warmup_steps)) * (end - start)

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """(r_max, d_max) at training step ``step`` (default: the next step this layer takes)."""
        step = int(self.num_batches_tracked) if step is None else step
        return self._ramp(step, self.r_max_steps, 1.0, self.r_max), self._ramp(step, self.d_max_steps, 0.0, self.d_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _precise(x)
        if not self.training:
            x_hat = (xf - _per_channel(self.running_mean)) / _per_channel(self.running_std)
        else:
            var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
            std = _std(var, self.eps)
            r_max, d_max = self.limits()
            with torch.no_grad():
                r = (std / self.running_std).clamp(1 / r_max, r_max)
                d = ((mean - self.running_mean) / self.running_std).clamp(-d_max, d_max)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_std.lerp_(std.to(self.running_std.dtype), self.momentum)
                self.num_batches_tracked += 1
            x_hat = (xf - _per_channel(mean)) / _per_channel(std) * _per_channel(r) + _per_channel(d)
        return (x_hat * _per_channel(self.weight) + _per_channel(self.bias)).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{len(self.weight)}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
                f"r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}")  # fmt: skip


class FilterResponseNormTLU2d(nn.Module):
    """Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan 2020,
    arXiv:1911.09737, Algorithm 1): a norm and an activation in one layer.

    Per sample and channel over (H, W): ``ν² = mean(x²)``, ``x̂ = x / sqrt(ν² + |ε|)``,
    ``y = γ x̂ + β``, ``z = max(y, τ)``. No mean is subtracted and nothing is shared across the
    batch. ε is learned, one scalar per layer starting at ``eps``, used as ``|ε|`` as in the paper.
    """

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))  # γ
        self.bias = nn.Parameter(torch.zeros(channels))  # β
        self.tau = nn.Parameter(torch.zeros(channels))  # τ, TLU's threshold
        self.eps = nn.Parameter(torch.tensor(float(eps)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _precise(x)
        nu2 = xf.square().mean(dim=(2, 3), keepdim=True)
        y = xf * torch.rsqrt(nu2 + self.eps.abs()) * _per_channel(self.weight) + _per_channel(self.bias)
        return torch.maximum(y, _per_channel(self.tau)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{len(self.weight)}, eps={self.eps.item():g} (learned)"


class EvoNorm2dS0(nn.Module):
    """EvoNorm-S0 (Liu et al. 2020, arXiv:2004.02967): a norm and an activation in one layer,
    batch-independent.

    ``y = x · sigmoid(v · x) / sqrt(s²_g(x) + ε) · γ + β``, ``s²_g`` the variance of the group of
    ``channels / groups`` channels that x is in, over those channels and (H, W), in the same sample
    (GroupNorm's statistic). ``v`` is learned per channel, starting at 1; ε = 1e-5.
    """

    eps = 1e-5

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(channels))  # γ
        self.bias = nn.Parameter(torch.zeros(channels))  # β
        self.v = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = _precise(x)
        n, c, h, w = xs.shape
        grouped = xs.reshape(n, self.groups, c // self.groups, h, w)
        group_std = _std(grouped.var(dim=(2, 3, 4), unbiased=False, keepdim=True), self.eps)
        num = xs * torch.sigmoid(_per_channel(self.v) * xs)
        y = (num.reshape(grouped.shape) / group_std).reshape(n, c, h, w)
        return (y * _per_channel(self.weight) + _per_channel(self.bias)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{len(self.weight)}, groups={self.groups}"


class EvoNorm2dB0(nn.Module):
    """EvoNorm-B0 (Liu et al. 2020, arXiv:2004.02967): a norm and an activation in one layer that
    uses batch statistics.

    ``y = x / max(sqrt(s²_b(x) + ε), v · x + sqrt(s²_i(x) + ε)) · γ + β``: ``s²_b`` the variance per
    channel over (N, H, W), ``s²_i`` per sample and channel over (H, W). Training uses the batch's
    ``s²_b`` and updates ``running_var`` as BatchNorm does (momentum 0.1, unbiased); evaluation uses
    ``running_var``. ``v`` is learned per channel, starting at 1; ε = 1e-5.
    """

    momentum = 0.1  # as nn.BatchNorm2d's
    eps = 1e-5

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))  # γ
        self.bias = nn.Parameter(torch.zeros(channels))  # β
        self.v = nn.Parameter(torch.ones(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = _precise(x)
        if self.training:
            var = xs.var(dim=(0, 2, 3), unbiased=False)
            n = xs.numel() // xs.shape[1]
            with torch.no_grad():
                self.running_var.lerp_((var * n / max(n - 1, 1)).to(self.running_var.dtype), self.momentum)
        else:
            var = self.running_var.to(xs.dtype)
        instance_std = _std(xs.var(dim=(2, 3), unbiased=False, keepdim=True), self.eps)
        denominator = torch.maximum(_per_channel(_std(var, self.eps)), _per_channel(self.v) * xs + instance_std)
        return (xs / denominator * _per_channel(self.weight) + _per_channel(self.bias)).to(x.dtype)
