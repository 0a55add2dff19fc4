"""An independent, deliberately plain StyleGAN2 forward pass used as ground truth by the tests.

It reads a handsoff ``Generator``'s parameters but none of its code: weight modulation with grouped convolutions
(the paper's form), and resampling by explicit zero insertion, padding and a 2D filter (the generic up-fir-down
form), written from the StyleGAN2 paper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kernel(device) -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device)
    k = k[:, None] * k[None, :]
    return k / k.sum()


def upfirdn2d(x, kernel, up=1, pad=(0, 0)):
    b, c, h, w = x.shape
    if up > 1:
        y = x.new_zeros(b, c, h * up, w * up)
        y[:, :, ::up, ::up] = x
        x = y
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    weight = torch.flip(kernel, [0, 1]).expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, groups=c)


def modulated_conv(x, weight, styles, demodulate, up=False):
    b, i, h, w = x.shape
    o, _, k, _ = weight.shape
    wt = weight[None] / math.sqrt(i * k * k) * styles[:, None, :, None, None]
    if demodulate:
        wt = wt / torch.sqrt(wt.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
    x = x.reshape(1, b * i, h, w)
    if up:
        wt = wt.transpose(1, 2).reshape(b * i, o, k, k)
        x = F.conv_transpose2d(x, wt, stride=2, groups=b)
        x = x.reshape(b, o, *x.shape[2:])
        return upfirdn2d(x, _kernel(x.device) * 4, pad=(1, 1))
    x = F.conv2d(x, wt.reshape(b * o, i, k, k), padding=k // 2, groups=b)
    return x.reshape(b, o, h, w)


def affine(fc, w):
    return w @ (fc.weight / math.sqrt(fc.weight.shape[1])).t() + fc.bias


def styled_conv(layer, x, w, up=False):
    x = modulated_conv(x, layer.weight, affine(layer.affine, w), True, up)
    x = x + layer.noise_const * layer.noise_strength
    return F.leaky_relu(x + layer.bias[:, None, None], 0.2) * math.sqrt(2)


def to_rgb(layer, x, w):
    return modulated_conv(x, layer.weight, affine(layer.affine, w), False) + layer.bias[:, None, None]


@torch.no_grad()
def mapping(G, z, truncation_psi=1.0):
    m = G.mapping
    x = z / torch.sqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
    for i in range(m.n_mlp):
        fc = getattr(m, f"fc{i}")
        lr_mul = fc.bias_gain
        x = x @ (fc.weight * lr_mul / math.sqrt(fc.weight.shape[1])).t() + fc.bias * lr_mul
        x = F.leaky_relu(x, 0.2) * math.sqrt(2)
    w = m.w_avg + truncation_psi * (x - m.w_avg)
    return w[:, None, :].repeat(1, G.n_latent, 1)


@torch.no_grad()
def synthesis(G, ws):
    s = G.synthesis
    b4 = s.b4
    x = b4.const[None].repeat(ws.shape[0], 1, 1, 1)
    x = styled_conv(b4.conv1, x, ws[:, 0])
    img = to_rgb(b4.torgb, x, ws[:, 1])
    i = 1
    for res in s.resolutions[1:]:
        block = getattr(s, f"b{res}")
        x = styled_conv(block.conv0, x, ws[:, i], up=True)
        x = styled_conv(block.conv1, x, ws[:, i + 1])
        img = upfirdn2d(img, _kernel(img.device) * 4, up=2, pad=(2, 1)) + to_rgb(block.torgb, x, ws[:, i + 2])
        i += 2
    return img
