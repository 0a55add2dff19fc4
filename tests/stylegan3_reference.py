"""An independent, deliberately plain StyleGAN3 synthesis pass used as ground truth by the tests.

It reads a handsoff ``StyleGAN3Generator``'s parameters and buffers but none of its code, and computes each step in
the form the paper and NVIDIA's reference ops state it: Fourier features sampled through ``affine_grid``; weight
modulation with the batch-wide style normalization, then demodulation, and a grouped convolution; bias, then
upsampling by explicit zero insertion, padding and a 2-D filter (the outer product of a separable one), leaky ReLU
times sqrt(2), clamping, filtering and keeping every ``down``-th sample. The layer padding is recomputed here from
the sizes stated in the layer names. This file and handsoff's StyleGAN3 were both compared once with NVIDIA's stylegan3
code on CPU (configs t and r, pickles written by it): both within 1e-6 of it. That code is not used here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _fc(x, fc, activation=False):
    y = x @ (fc.weight * fc.weight_gain).t() + fc.bias * fc.bias_gain
    return F.leaky_relu(y, 0.2) * math.sqrt(2) if activation else y


def mapping(G, z, psi=1.0):
    x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
    for i in range(G.mapping.n_mlp):
        x = _fc(x, getattr(G.mapping, f"fc{i}"), activation=True)
    ws = x[:, None].repeat(1, G.n_latent, 1)
    return G.w_avg + psi * (ws - G.w_avg)


def fourier_input(inp, w):
    t = _fc(w, inp.affine)
    t = t / t[:, :2].norm(dim=1, keepdim=True)
    batch = len(w)
    m_r = torch.eye(3).repeat(batch, 1, 1)
    m_r[:, 0, 0], m_r[:, 0, 1], m_r[:, 1, 0], m_r[:, 1, 1] = t[:, 0], -t[:, 1], t[:, 1], t[:, 0]
    m_t = torch.eye(3).repeat(batch, 1, 1)
    m_t[:, 0, 2], m_t[:, 1, 2] = -t[:, 2], -t[:, 3]
    transforms = m_r @ m_t @ inp.transform[None]
    phases = inp.phases[None] + (inp.freqs[None] @ transforms[:, :2, 2:]).squeeze(2)
    freqs = inp.freqs[None] @ transforms[:, :2, :2]
    amp = (1 - (freqs.norm(dim=2) - inp.bandwidth) / (inp.sampling_rate / 2 - inp.bandwidth)).clamp(0, 1)
    theta = torch.tensor([[0.5 * inp.size / inp.sampling_rate, 0, 0], [0, 0.5 * inp.size / inp.sampling_rate, 0]])
    grid = F.affine_grid(theta[None], [1, 1, inp.size, inp.size], align_corners=False)  # (1, S, S, 2)
    x = (grid[:, :, :, None, :] * freqs[:, None, None, :, :]).sum(-1) + phases[:, None, None, :]
    x = torch.sin(2 * math.pi * x) * amp[:, None, None, :]
    x = x @ (inp.weight / math.sqrt(inp.channels)).t()
    return x.permute(0, 3, 1, 2)


def _filter2d(f):
    if f is None:
        return torch.ones(1, 1)
    return f[:, None] * f[None, :] if f.ndim == 1 else f


def _upfirdn(x, f, up, down, pad, gain):
    b, c, h, w = x.shape
    if up > 1:
        y = x.new_zeros(b, c, h * up, w * up)
        y[:, :, ::up, ::up] = x
        x = y
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    f = _filter2d(f) * gain
    x = F.conv2d(x, torch.flip(f, [0, 1]).expand(c, 1, *f.shape), groups=c)
    return x[:, :, ::down, ::down]


def layer(lay, x, w, in_size, out_size):
    styles = _fc(w, lay.affine)
    weight = lay.weight
    o, i, k, _ = weight.shape
    torgb = lay.is_torgb
    if torgb:
        styles = styles / math.sqrt(i * k * k)
    else:
        weight = weight * weight.square().mean(dim=(1, 2, 3), keepdim=True).rsqrt()
        styles = styles * styles.square().mean().rsqrt()
    wt = weight[None] * styles[:, None, :, None, None]
    if not torgb:
        wt = wt * (wt.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    wt = wt * lay.magnitude_ema.rsqrt()
    b = x.shape[0]
    x = F.conv2d(x.reshape(1, b * i, *x.shape[2:]), wt.reshape(b * o, i, k, k), padding=k - 1, groups=b)
    x = x.reshape(b, o, *x.shape[2:]) + lay.bias[None, :, None, None]
    up, down = lay.up_factor, lay.down_factor
    up_taps = 1 if lay.up_filter is None else lay.up_filter.shape[0]
    down_taps = 1 if lay.down_filter is None else lay.down_filter.shape[0]
    total = (out_size - 1) * down + 1 - (in_size + k - 1) * up + up_taps + down_taps - 2
    lo = (total + up) // 2
    x = _upfirdn(x, lay.up_filter, up, 1, (lo, total - lo), up * up)
    if not torgb:
        x = F.leaky_relu(x, 0.2) * math.sqrt(2)
    if lay.conv_clamp is not None:
        x = x.clamp(-lay.conv_clamp, lay.conv_clamp)
    return _upfirdn(x, lay.down_filter, 1, down, (0, 0), 1)


@torch.no_grad()
def synthesize(G, ws):
    """ws (B, n_latent, w_dim) -> images (B, C, R, R), float32."""
    s = G.synthesis
    x = fourier_input(s.input, ws[:, 0])
    size = s.input.size
    for n, name in enumerate(s.layer_names):
        out_size = int(name.split("_")[1])
        x = layer(getattr(s, name), x, ws[:, n + 1], size, out_size)
        size = out_size
    return x * s.output_scale
