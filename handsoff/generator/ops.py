"""Low-level StyleGAN2 operations in plain PyTorch (no compiled extensions).

All resampling uses the separable [1, 3, 3, 1] binomial filter that StyleGAN2 uses everywhere, applied as a
depthwise convolution: on CPU that is an order of magnitude faster than a generic up-fir-down kernel and gives
the same result.

Modulated convolution comes in two mathematically equal forms:

* ``fused=False`` (default, fast on CPU): scale the *activations* by the style, run one ordinary convolution
  with the shared weight, then scale the output channels by the demodulation coefficients.
* ``fused=True``: modulate and demodulate a per-sample copy of the *weight* and run a grouped convolution, the
  form written in the StyleGAN2 paper and used by the reference implementations. Kept as the reference that
  tests and benchmarks compare against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)

_FILTER_TAPS = (1.0, 3.0, 3.0, 1.0)


def resample_filter(device=None, dtype=torch.float32) -> torch.Tensor:
    """The normalized 4x4 binomial filter, shape (4, 4), summing to 1."""
    taps = torch.tensor(_FILTER_TAPS, device=device, dtype=dtype)
    f = taps[:, None] * taps[None, :]
    return f / f.sum()


def _depthwise_filter(x: torch.Tensor, gain: float) -> torch.Tensor:
    channels = x.shape[1]
    return (resample_filter(x.device, x.dtype) * gain).expand(channels, 1, 4, 4)


def blur(x: torch.Tensor, padding: int, stride: int = 1, gain: float = 1.0) -> torch.Tensor:
    """Filter every channel of x (B, C, H, W) with the 4x4 binomial filter times ``gain``.

    Output size is (H + 2 * padding - 4) // stride + 1. With stride 2 this is the blur-then-subsample used by
    the discriminator's 1x1 skip connections; gain 4 follows a stride-2 transposed conv, whose zero-inserted
    output has a quarter of the energy.
    """
    return F.conv2d(x, _depthwise_filter(x, gain), padding=padding, stride=stride, groups=x.shape[1])


def upsample2d(x: torch.Tensor) -> torch.Tensor:
    """2x upsampling of x (B, C, H, W) -> (B, C, 2H, 2W) with the binomial filter (gain 4 keeps the mean).

    Equal to zero-insertion, padding (2, 1) and filtering, done as one strided depthwise transposed conv.
    """
    y = F.conv_transpose2d(x, _depthwise_filter(x, 4.0), stride=2, groups=x.shape[1])
    return y[:, :, 1:-1, 1:-1]


def bias_lrelu(x: torch.Tensor, bias: torch.Tensor | None, gain: float = LRELU_GAIN,
               clamp: float | None = None) -> torch.Tensor:
    """leaky_relu(x + bias, 0.2) * gain, optionally clamped to [-clamp, clamp]. bias: (C,) over dim 1."""
    if bias is not None:
        x = x + bias.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 2)))
    x = F.leaky_relu(x, LRELU_SLOPE) * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def demodulation_coefficients(weight: torch.Tensor, styles: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 / ||weight * style|| per sample and output channel.

    weight: (O, I, k, k); styles: (B, I). Returns (B, O). Computed as a matrix product rather than by building
    the (B, O, I, k, k) modulated weight.
    """
    return (styles.square() @ weight.square().sum(dim=(2, 3)).t() + eps).rsqrt()


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True,
                     up: bool = False, fused: bool = False) -> torch.Tensor:
    """StyleGAN2 modulated convolution with 'same' padding, optionally preceded by 2x upsampling.

    Args:
        x: (B, I, H, W) input activations.
        weight: (O, I, k, k) convolution weight, already multiplied by its equalized-lr gain.
        styles: (B, I) per-sample input-channel scales.
        demodulate: normalize each output channel of the modulated weight to unit norm.
        up: transposed 3x3 conv with stride 2 followed by the binomial blur (output 2H x 2W).
        fused: use the grouped-conv weight-modulation reference form (see module docstring).

    Returns:
        (B, O, H, W), or (B, O, 2H, 2W) with ``up``; the dtype of x.
    """
    batch, in_channels = x.shape[:2]
    out_channels, _, kh, kw = weight.shape
    if fused:
        w = weight[None] * styles[:, None, :, None, None]
        if demodulate:
            w = w * (w.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
        x = x.reshape(1, batch * in_channels, *x.shape[2:])
        if up:
            w = w.transpose(1, 2).reshape(batch * in_channels, out_channels, kh, kw)
            x = F.conv_transpose2d(x, w, stride=2, groups=batch)
        else:
            x = F.conv2d(x, w.reshape(batch * out_channels, in_channels, kh, kw), padding=kh // 2, groups=batch)
        x = x.reshape(batch, out_channels, *x.shape[2:])
        return blur(x, padding=1, gain=4.0) if up else x

    x = x * styles.to(x.dtype)[:, :, None, None]
    if up:
        x = blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2), padding=1, gain=4.0)
    else:
        x = F.conv2d(x, weight, padding=kh // 2)
    if demodulate:
        x = x * demodulation_coefficients(weight.float(), styles.float()).to(x.dtype)[:, :, None, None]
    return x
