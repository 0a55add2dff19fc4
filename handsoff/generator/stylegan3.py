"""StyleGAN3 generator (Karras et al., "Alias-Free Generative Adversarial Networks", NeurIPS 2021) in plain PyTorch.

Both published configs: 't' (3x3 convolutions, separable Kaiser-windowed sinc filters) and 'r' (1x1 convolutions,
radially symmetric jinc down-filters in the layers that are not critically sampled). Parameter and buffer names
follow NVIDIA's stylegan3 layout (``synthesis.input.freqs``, ``synthesis.L3_52_512.down_filter``, ...), so their
network pickles load one to one. The resampling filters and the input's Fourier features are buffers: a checkpoint
fixes them exactly, and a freshly built network designs them from its config (``lowpass_filter``).

Signal model: layer i holds a grid of ``sampling_rate`` samples per image side plus ``margin_size`` extra samples on
each side (the last two layers have no margin). A layer convolves at its input rate, upsamples to a temporary rate
(2x its output rate), applies the leaky ReLU there, and low-pass filters back down, so the nonlinearity does not
alias. The hypercolumn features are the input and every layer except ToRGB with the margin cropped off, so each
covers exactly the image, at ``sampling_rate`` pixels per side.

Conventions as in ``networks.py``: images (B, 3, R, R) in about [-1, 1]; z (B, z_dim); W+ latents ``ws`` are
(B, n_latent, w_dim) with n_latent = num_layers + 2: one each for the Fourier input, the num_layers layers and ToRGB.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from handsoff.generator.networks import (
    FullyConnected,
    MappedGenerator,
    MappingNetwork,
    check_synthesis_inputs,
    reduced_dtype,
)

ARCHITECTURE = "stylegan3"


def lowpass_filter(numtaps: int, cutoff: float, width: float, fs: float, radial: bool = False) -> torch.Tensor | None:
    """A Kaiser-windowed low-pass FIR filter with unit DC gain; None for a single tap (no filtering).

    numtaps: taps per side. cutoff, width (of the transition band) and fs (sampling rate) share one unit.
    Returns (numtaps,) float32, applied separably along both axes, or with ``radial`` a (numtaps, numtaps) 2-D
    filter: a jinc (the 2-D analogue of sinc) under the outer product of the window.
    """
    if numtaps == 1:
        return None
    # Kaiser's empirical formulas: attenuation reachable with this many taps and transition width, and the
    # window shape parameter that reaches it.
    atten = 2.285 * (numtaps - 1) * math.pi * (width / (fs / 2)) + 7.95
    if atten > 50:
        beta = 0.1102 * (atten - 8.7)
    elif atten > 21:
        beta = 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21)
    else:
        beta = 0.0
    window = np.kaiser(numtaps, beta)
    offsets = np.arange(numtaps) - (numtaps - 1) / 2
    if not radial:
        c = cutoff / (fs / 2)
        f = c * np.sinc(c * offsets) * window
    else:
        x = torch.as_tensor(offsets / fs, dtype=torch.float64)
        r = torch.hypot(x[None, :], x[:, None])
        jinc = torch.special.bessel_j1(2 * math.pi * cutoff * r) / (math.pi * r.clamp_min(1e-12))
        jinc = torch.where(r == 0, torch.full_like(r, cutoff), jinc)  # the limit at the centre
        f = jinc.numpy() * np.outer(window, window)
    return torch.as_tensor(f / f.sum(), dtype=torch.float32)


def layer_geometry(resolution: int, channel_base: int, channel_max: int, img_channels: int, num_layers: int,
                   num_critical: int, first_cutoff: float, first_stopband: float, last_stopband_rel: float,
                   margin_size: int) -> list[dict]:
    """Per-layer signal parameters, index 0 the Fourier input, then ``num_layers`` layers and ToRGB.

    Cutoffs and minimum stopbands grow geometrically from the first layer to the last critically sampled ones;
    each layer samples at the smallest power of two above twice its stopband. Returns dicts with ``cutoff``,
    ``stopband``, ``sampling_rate``, ``half_width``, ``size`` (grid side incl. margins) and ``channels``.
    """
    last_cutoff = resolution / 2
    last_stopband = last_cutoff * last_stopband_rel
    exponents = np.minimum(np.arange(num_layers + 1) / (num_layers - num_critical), 1)
    cutoffs = first_cutoff * (last_cutoff / first_cutoff) ** exponents
    stopbands = first_stopband * (last_stopband / first_stopband) ** exponents
    sampling_rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, resolution))))
    half_widths = np.maximum(stopbands, sampling_rates / 2) - cutoffs
    sizes = sampling_rates + margin_size * 2
    sizes[-2:] = resolution
    channels = np.rint(np.minimum((channel_base / 2) / cutoffs, channel_max))
    channels[-1] = img_channels
    return [dict(cutoff=float(cutoffs[i]), stopband=float(stopbands[i]), sampling_rate=int(sampling_rates[i]),
                 half_width=float(half_widths[i]), size=int(sizes[i]), channels=int(channels[i]))
            for i in range(num_layers + 1)]


def upfirdn2d(x: torch.Tensor, f: torch.Tensor | None, up: int = 1, down: int = 1,
              padding: tuple[int, int, int, int] = (0, 0, 0, 0), gain: float = 1.0) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative pads crop), convolve with ``f`` times ``gain``, keep every
    ``down``-th sample. x: (B, C, H, W); f: (T,) applied separably, (T, T), or None (no filtering).
    padding: (left, right, top, bottom). The filter is applied as a true convolution (flipped), as in the paper.
    """
    batch, channels, h, w = x.shape
    if up > 1:
        x = x.reshape(batch, channels, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(batch, channels, h * up, w * up)
    x = F.pad(x, list(padding))
    if f is None:
        return x[:, :, ::down, ::down] if down > 1 else x
    f = f.to(x.dtype).flip(list(range(f.ndim)))
    if f.ndim == 1:
        taps = f * math.sqrt(gain)
        x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), stride=(1, down), groups=channels)
        return F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), stride=(down, 1), groups=channels)
    return F.conv2d(x, (f * gain)[None, None].expand(channels, 1, *f.shape), stride=down, groups=channels)


class SynthesisInput(nn.Module):
    """Fourier features: ``channels`` sinusoids of fixed frequency (|f| <= bandwidth), rotated and translated per
    sample by an affine of w, sampled on a ``size`` x ``size`` grid at ``sampling_rate``, then mixed by a learned
    channels x channels matrix. Returns (B, channels, size, size)."""

    def __init__(self, w_dim: int, channels: int, size: int, sampling_rate: float, bandwidth: float):
        super().__init__()
        self.channels, self.size, self.sampling_rate, self.bandwidth = channels, size, sampling_rate, bandwidth
        freqs = torch.randn(channels, 2)
        radii = freqs.square().sum(dim=1, keepdim=True).sqrt()
        freqs = freqs / (radii * radii.square().exp().pow(0.25)) * bandwidth
        self.weight = nn.Parameter(torch.randn(channels, channels))
        self.affine = FullyConnected(w_dim, 4)
        with torch.no_grad():  # starts as the identity transform: rotation cos 1, sin 0, no translation
            self.affine.weight.zero_()
            self.affine.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        self.register_buffer("transform", torch.eye(3))  # a user transform, identity unless set
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", torch.rand(channels) - 0.5)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        t = self.affine(w)  # (B, 4): rotation (cos, sin) and translation (x, y)
        t = t / t[:, :2].norm(dim=1, keepdim=True)
        batch = len(w)
        rotation = torch.eye(3, device=w.device).repeat(batch, 1, 1)
        rotation[:, 0, 0], rotation[:, 0, 1], rotation[:, 1, 0], rotation[:, 1, 1] = t[:, 0], -t[:, 1], t[:, 1], t[:, 0]
        translation = torch.eye(3, device=w.device).repeat(batch, 1, 1)
        translation[:, 0, 2], translation[:, 1, 2] = -t[:, 2], -t[:, 3]
        transform = rotation @ translation @ self.transform[None]
        # Transforming the coordinates is the same as transforming the frequencies and shifting the phases.
        phases = self.phases[None] + (self.freqs[None] @ transform[:, :2, 2:]).squeeze(2)  # (B, C)
        freqs = self.freqs[None] @ transform[:, :2, :2]  # (B, C, 2)
        # Fade out the frequencies that would alias after the rotation.
        amplitudes = (1 - (freqs.norm(dim=2) - self.bandwidth) / (self.sampling_rate / 2 - self.bandwidth)).clamp(0, 1)
        # Sample centres in image units: spacing 1 / sampling_rate, centred on 0 (the image spans [-0.5, 0.5]).
        coords = (torch.arange(self.size, device=w.device, dtype=torch.float32) - (self.size - 1) / 2) \
            / self.sampling_rate
        grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=-1)  # (S, S, 2) as (x, y)
        x = torch.einsum("hwd,bcd->bhwc", grid, freqs) + phases[:, None, None, :]
        x = torch.sin(x * (2 * math.pi)) * amplitudes[:, None, None, :]
        x = x @ (self.weight / math.sqrt(self.channels)).t()
        return x.permute(0, 3, 1, 2)


class SynthesisLayer(nn.Module):
    """Modulated conv at the input rate, bias, up-filter to the temporary rate, leaky ReLU and clamp there,
    down-filter to the output rate. ToRGB is the same layer with a 1x1 conv, no demodulation and no filters.

    x (B, in_channels, in_size, in_size) -> (B, out_channels, out_size, out_size).
    """

    def __init__(self, w_dim: int, *, is_torgb: bool, is_critically_sampled: bool, in_channels: int,
                 out_channels: int, in_size: int, out_size: int, in_sampling_rate: int, out_sampling_rate: int,
                 in_cutoff: float, out_cutoff: float, in_half_width: float, out_half_width: float,
                 conv_kernel: int = 3, filter_size: int = 6, lrelu_upsampling: int = 2,
                 use_radial_filters: bool = False, conv_clamp: float | None = 256, use_fp16: bool = False):
        super().__init__()
        self.is_torgb, self.use_fp16, self.conv_clamp = is_torgb, use_fp16, conv_clamp
        self.in_channels, self.out_channels, self.out_size = in_channels, out_channels, out_size
        self.conv_kernel = 1 if is_torgb else conv_kernel
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, self.conv_kernel, self.conv_kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("magnitude_ema", torch.ones([]))  # running mean square of the input (training only)

        temp_rate = max(in_sampling_rate, out_sampling_rate) * (1 if is_torgb else lrelu_upsampling)
        self.up_factor = int(round(temp_rate / in_sampling_rate))
        up_taps = filter_size * self.up_factor if self.up_factor > 1 and not is_torgb else 1
        self.register_buffer("up_filter", lowpass_filter(up_taps, in_cutoff, in_half_width * 2, temp_rate))
        self.down_factor = int(round(temp_rate / out_sampling_rate))
        down_taps = filter_size * self.down_factor if self.down_factor > 1 and not is_torgb else 1
        self.register_buffer("down_filter", lowpass_filter(down_taps, out_cutoff, out_half_width * 2, temp_rate,
                                                           radial=use_radial_filters and not is_critically_sampled))
        # Pad so that out_size samples remain after both filters, with sample positions kept symmetric about the
        # centre (the paper's appendix C.3).
        pad_total = (out_size - 1) * self.down_factor + 1 - (in_size + self.conv_kernel - 1) * self.up_factor \
            + up_taps + down_taps - 2
        pad_lo = (pad_total + self.up_factor) // 2
        self.padding = (pad_lo, pad_total - pad_lo, pad_lo, pad_total - pad_lo)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)
        weight = self.weight.float()
        input_gain = self.magnitude_ema.rsqrt()
        if self.is_torgb:
            styles = styles * (1 / math.sqrt(self.in_channels * self.conv_kernel**2))
            demod = None
        else:  # normalize weight and styles first: demodulation undoes their scale, this keeps fp16 in range
            weight = weight * weight.square().mean(dim=(1, 2, 3), keepdim=True).rsqrt()
            styles = styles * styles.square().mean(dim=1, keepdim=True).rsqrt()
            demod = (styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8).rsqrt()  # (B, O)
        # Modulate activations instead of weights (the same result, one shared convolution for the batch).
        x = x * (styles * input_gain).to(x.dtype)[:, :, None, None]
        x = F.conv2d(x, weight.to(x.dtype), padding=self.conv_kernel - 1)
        if demod is not None:
            x = x * demod.to(x.dtype)[:, :, None, None]
        x = x + self.bias.to(x.dtype)[None, :, None, None]
        x = upfirdn2d(x, self.up_filter, up=self.up_factor, padding=self.padding, gain=self.up_factor**2)
        if not self.is_torgb:
            x = F.leaky_relu(x, 0.2) * math.sqrt(2)
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return upfirdn2d(x, self.down_filter, down=self.down_factor)


class SynthesisNetwork(nn.Module):
    """ws (B, n_latent, w_dim) -> image (B, img_channels, R, R) in about [-1, 1]; see the module docstring."""

    def __init__(self, w_dim: int, resolution: int, channel_base: int = 32768, channel_max: int = 512,
                 img_channels: int = 3, num_layers: int = 14, num_critical: int = 2, first_cutoff: float = 2,
                 first_stopband: float = 2**2.1, last_stopband_rel: float = 2**0.3, margin_size: int = 10,
                 output_scale: float = 0.25, conv_kernel: int = 3, filter_size: int = 6, lrelu_upsampling: int = 2,
                 use_radial_filters: bool = False, num_fp16_res: int = 0, conv_clamp: float | None = 256):
        super().__init__()
        self.w_dim, self.resolution, self.img_channels = w_dim, resolution, img_channels
        self.n_latent, self.output_scale, self.margin_size = num_layers + 2, output_scale, margin_size
        self.geometry = layer_geometry(resolution, channel_base, channel_max, img_channels, num_layers, num_critical,
                                       first_cutoff, first_stopband, last_stopband_rel, margin_size)
        first = self.geometry[0]
        self.input = SynthesisInput(w_dim, first["channels"], first["size"], first["sampling_rate"],
                                    first["cutoff"])
        self.layer_names = []
        for i, g in enumerate(self.geometry):
            prev = self.geometry[max(i - 1, 0)]
            layer = SynthesisLayer(
                w_dim, is_torgb=i == num_layers, is_critically_sampled=i >= num_layers - num_critical,
                in_channels=prev["channels"], out_channels=g["channels"], in_size=prev["size"], out_size=g["size"],
                in_sampling_rate=prev["sampling_rate"], out_sampling_rate=g["sampling_rate"],
                in_cutoff=prev["cutoff"], out_cutoff=g["cutoff"], in_half_width=prev["half_width"],
                out_half_width=g["half_width"], conv_kernel=conv_kernel, filter_size=filter_size,
                lrelu_upsampling=lrelu_upsampling, use_radial_filters=use_radial_filters, conv_clamp=conv_clamp,
                use_fp16=g["sampling_rate"] * 2**num_fp16_res > resolution)
            name = f"L{i}_{g['size']}_{g['channels']}"  # NVIDIA's attribute names, so pickles map one to one
            setattr(self, name, layer)
            self.layer_names.append(name)

    @property
    def layers(self) -> list[SynthesisLayer]:
        return [getattr(self, name) for name in self.layer_names]

    @property
    def feature_channels(self) -> list[int]:
        """Channels of each map returned by ``return_features``: the Fourier input, then every layer but ToRGB."""
        return [self.geometry[0]["channels"]] + [g["channels"] for g in self.geometry[:-1]]

    @property
    def feature_resolutions(self) -> list[int]:
        """Side of each feature map after cropping the margin: the layer's sampling rate."""
        return [self.geometry[0]["sampling_rate"]] + [g["sampling_rate"] for g in self.geometry[:-1]]

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", return_features: bool = False,
                force_fp32: bool = False):
        """Synthesize images from W+ latents; the signature of ``networks.SynthesisNetwork.forward``.

        StyleGAN3 has no noise inputs, so ``noise_mode`` only is checked. With ``return_features`` returns
        (img, features): num_layers + 1 maps (B, C_i, r_i, r_i), each cropped to the image extent.
        """
        ws = check_synthesis_inputs(ws, noise_mode, self.n_latent, self.w_dim)
        low = reduced_dtype(ws.device)
        x = self.input(ws[:, 0])
        features = [self._crop(x, self.geometry[0])] if return_features else None
        for i, layer in enumerate(self.layers):
            dtype = low if layer.use_fp16 and not force_fp32 else torch.float32
            x = layer(x.to(dtype), ws[:, i + 1])
            if features is not None and not layer.is_torgb:
                features.append(self._crop(x, self.geometry[i]))
        img = (x.float() * self.output_scale).contiguous()
        return (img, features) if return_features else img

    @staticmethod
    def _crop(x: torch.Tensor, geometry: dict) -> torch.Tensor:
        m = (geometry["size"] - geometry["sampling_rate"]) // 2
        return x[:, :, m:x.shape[2] - m, m:x.shape[3] - m] if m else x


class StyleGAN3Generator(MappedGenerator):
    """StyleGAN3 generator with the API of ``networks.Generator``: ``G.mapping``, ``G.synthesis``, ``G(z)``.

    Keyword arguments are the whole config (stored in ``G.config`` with ``architecture="stylegan3"``):
        resolution: output size R (any even size; the published configs use powers of two).
        z_dim, w_dim, n_mlp, mapping_lr_mul: the mapping network (StyleGAN3 uses 2 layers).
        channel_base, channel_max: feature maps per layer = min(channel_base / 2 / cutoff, channel_max);
            config 'r' doubles both (65536, 1024).
        num_layers, num_critical, first_cutoff, first_stopband, last_stopband_rel, margin_size, output_scale:
            the signal schedule (NVIDIA's defaults).
        conv_kernel: 3 for config 't', 1 for config 'r'. use_radial_filters: True for config 'r'.
        filter_size, lrelu_upsampling: taps per unit of resampling factor, and the leaky ReLU's oversampling.
        img_channels, num_fp16_res, conv_clamp: as for StyleGAN2 (NVIDIA clamps at 256 unless trained in fp32).
    """

    def __init__(self, resolution: int = 64, z_dim: int = 512, w_dim: int = 512, n_mlp: int = 2,
                 channel_base: int = 32768, channel_max: int = 512, mapping_lr_mul: float = 0.01,
                 img_channels: int = 3, num_layers: int = 14, num_critical: int = 2, first_cutoff: float = 2,
                 first_stopband: float = 2**2.1, last_stopband_rel: float = 2**0.3, margin_size: int = 10,
                 output_scale: float = 0.25, conv_kernel: int = 3, filter_size: int = 6, lrelu_upsampling: int = 2,
                 use_radial_filters: bool = False, num_fp16_res: int = 0, conv_clamp: float | None = 256):
        super().__init__()
        synthesis = dict(channel_base=channel_base, channel_max=channel_max, img_channels=img_channels,
                         num_layers=num_layers, num_critical=num_critical, first_cutoff=first_cutoff,
                         first_stopband=first_stopband, last_stopband_rel=last_stopband_rel,
                         margin_size=margin_size, output_scale=output_scale, conv_kernel=conv_kernel,
                         filter_size=filter_size, lrelu_upsampling=lrelu_upsampling,
                         use_radial_filters=use_radial_filters, num_fp16_res=num_fp16_res, conv_clamp=conv_clamp)
        self.config = dict(architecture=ARCHITECTURE, resolution=resolution, z_dim=z_dim, w_dim=w_dim, n_mlp=n_mlp,
                           mapping_lr_mul=mapping_lr_mul, **synthesis)
        self.synthesis = SynthesisNetwork(w_dim, resolution, **synthesis)
        self.mapping = MappingNetwork(z_dim, w_dim, self.synthesis.n_latent, n_mlp, mapping_lr_mul)
        self.z_dim, self.w_dim, self.n_latent = z_dim, w_dim, self.synthesis.n_latent
        self.img_resolution, self.img_channels = resolution, img_channels
