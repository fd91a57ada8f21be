"""Convolutions with a bounded operator norm (spectral normalisation of the convolution itself).

``torch.nn.utils.parametrizations.spectral_norm`` normalises the ``(out, in·k·k)`` reshaped kernel, which bounds
a k×k convolution's operator norm only up to a factor k (3 for 3×3 kernels: a smooth kernel reaches it). A
fixed-point map needs the real Lipschitz constant, so here the power iteration runs on the convolution operator
and its adjoint (``conv2d`` with the kernel, and with the kernel's channels swapped and taps flipped, i.e.
``conv_transpose2d``) over a probe image, as in invertible
residual networks (Behrmann et al., ICML 2019, arXiv:1811.00995; Gouk et al. 2021, arXiv:1804.04368):

    u ← Kᵀ K u / ‖Kᵀ K u‖,    σ = ‖K u‖,    W̃ = W / max(1, σ / max_norm).

The estimate σ is a lower bound converging to ‖K‖ on the probe size (zero padding makes the norm grow slightly
with the image size, towards the norm on the infinite grid). One iteration per training-mode call tracks the
slowly changing weight (σ is read from the probe before that call's update, sharing its ``K u``); evaluation does
not update the probe, so it is deterministic. Compute the normalised
weight once per use (:meth:`SpectralNormConv2d.normalized_weight`) and reuse it, so that it stays fixed within,
for example, a fixed-point solve.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['SpectralNormConv2d']


class SpectralNormConv2d(nn.Conv2d):
    """Stride-1 "same" ``nn.Conv2d`` whose kernel is rescaled so the convolution's norm is at most ``max_norm``.

    Args:
        probe_size: side of the probe image the power iteration runs on (the feature-map size it is used at).
        power_iterations: power iterations per training-mode call of :meth:`normalized_weight`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True,
                 max_norm: float = 1.0, probe_size: int = 8, power_iterations: int = 1):
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be odd (a "same" convolution), got {kernel_size}')
        if not max_norm > 0:
            raise ValueError(f'max_norm must be positive, got {max_norm}')
        if probe_size < 1 or power_iterations < 1:
            raise ValueError(f'probe_size and power_iterations must be positive, got {probe_size}, {power_iterations}')
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.max_norm = float(max_norm)
        self.power_iterations = power_iterations
        probe = torch.randn(1, in_channels, probe_size, probe_size)
        self.register_buffer('probe', probe / probe.norm())

    def _adjoint_step(self, v: torch.Tensor) -> None:
        """``u ← Kᵀ v / ‖Kᵀ v‖`` into the probe (conv2d with the channel-swapped, flipped kernel is
        ``conv_transpose2d``, but takes a faster path on CPU)."""
        adjoint = self.weight.detach().transpose(0, 1).flip(2, 3).contiguous()
        u = F.conv2d(v, adjoint, padding=self.padding)
        self.probe.copy_(u / u.norm().clamp_min(torch.finfo(u.dtype).tiny))

    @torch.no_grad()
    def power_iterate_(self, iterations: int) -> None:
        """Move the probe ``iterations`` power-iteration steps towards the top right singular vector."""
        for _ in range(iterations):
            self._adjoint_step(F.conv2d(self.probe, self.weight, padding=self.padding))

    def operator_norm(self) -> torch.Tensor:
        """The current estimate ``σ = ‖K u‖`` (differentiable in the weight)."""
        return F.conv2d(self.probe, self.weight, padding=self.padding).norm()

    def normalized_weight(self) -> torch.Tensor:
        """``W / max(1, σ / max_norm)`` with ``σ = ‖K u‖``; in training mode the probe then takes one power-iteration
        step from the same ``K u`` (``power_iterations`` steps in all), so σ costs no extra convolution."""
        ku = F.conv2d(self.probe.clone(), self.weight, padding=self.padding)  # the probe is updated in place below
        sigma = ku.norm()
        if self.training:
            with torch.no_grad():
                self._adjoint_step(ku)
                self.power_iterate_(self.power_iterations - 1)
        return self.weight / (sigma / self.max_norm).clamp_min(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding)
