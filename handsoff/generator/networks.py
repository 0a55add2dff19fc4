"""StyleGAN2 generator and discriminator (Karras et al., CVPR 2020) in plain PyTorch.

Parameter names follow NVIDIA's stylegan2-ada-pytorch layout (``mapping.fc0.weight``,
``synthesis.b64.conv1.affine.weight``, ``b4.fc.weight``, ...), so their network pickles map one to one and the
rosinality layout maps by a fixed table (see ``checkpoints.py``). Weights are stored unscaled and multiplied by
their equalized-learning-rate gain at run time, as in both reference implementations.

Conventions: images are (B, 3, R, R) with values in about [-1, 1]; latents z are (B, z_dim); W+ latents ``ws``
are (B, n_latent, w_dim) with n_latent = 2 * log2(R) - 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from handsoff.generator import ops

NOISE_MODES = ("const", "random", "none")


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    """Feature maps at one resolution: min(channel_base // resolution, channel_max) (NVIDIA's rule)."""
    return min(channel_base // resolution, channel_max)


def channel_base_from_multiplier(channel_multiplier: int) -> int:
    """rosinality's ``channel_multiplier`` as NVIDIA's ``channel_base`` (channel_max 512): 2 -> 32768."""
    return 16384 * channel_multiplier


def _check_resolution(resolution: int) -> int:
    log2 = int(round(math.log2(resolution))) if resolution > 0 else 0
    if resolution < 4 or 2**log2 != resolution or not 16 <= resolution <= 1024:
        raise ValueError(f"resolution must be a power of two in 16..1024, got {resolution}")
    return log2


def reduced_dtype(device: torch.device) -> torch.dtype:
    """The low-precision dtype for 'fp16' layers: float16 on CUDA, bfloat16 elsewhere (CPUs with AMX/AVX512-BF16)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def check_synthesis_inputs(ws: torch.Tensor, noise_mode: str, n_latent: int, w_dim: int) -> torch.Tensor:
    """ws as float32 (B, n_latent, w_dim) (a (B, w_dim) w is broadcast to every layer); ValueError for a bad shape
    or noise mode."""
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
    if ws.ndim == 2:
        ws = ws[:, None, :].expand(-1, n_latent, -1)
    if ws.ndim != 3 or ws.shape[1:] != (n_latent, w_dim):
        raise ValueError(f"ws must have shape (batch, {n_latent}, {w_dim}) or (batch, {w_dim}), got {tuple(ws.shape)}")
    return ws.float()


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


class FullyConnected(nn.Module):
    """Equalized-lr linear layer: y = x @ (weight * lr_mul / sqrt(in)).T + bias * lr_mul, optional lrelu."""

    def __init__(self, in_features: int, out_features: int, *, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain
        if self.activation:
            return ops.bias_lrelu(F.linear(x, w), b)
        return F.linear(x, w, b)


class MappingNetwork(nn.Module):
    """z (B, z_dim) -> ws (B, n_latent, w_dim): pixel norm, n_mlp lrelu layers (lr_mul 0.01), broadcast, truncation."""

    def __init__(self, z_dim: int, w_dim: int, n_latent: int, n_mlp: int = 8, lr_mul: float = 0.01):
        super().__init__()
        self.z_dim, self.w_dim, self.n_latent, self.n_mlp = z_dim, w_dim, n_latent, n_mlp
        for i in range(n_mlp):
            in_features = z_dim if i == 0 else w_dim
            setattr(self, f"fc{i}", FullyConnected(in_features, w_dim, lr_mul=lr_mul, activation=True))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                broadcast: bool = True) -> torch.Tensor:
        """Map z to W+. truncation_psi < 1 pulls the first ``truncation_cutoff`` (default all) latents to w_avg."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape (batch, {self.z_dim}), got {tuple(z.shape)}")
        x = z.float()
        x = x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.n_mlp):
            x = getattr(self, f"fc{i}")(x)
        if not broadcast:
            return x
        ws = x[:, None, :].repeat(1, self.n_latent, 1)
        if truncation_psi != 1:
            cutoff = self.n_latent if truncation_cutoff is None else truncation_cutoff
            ws[:, :cutoff] = self.w_avg.lerp(ws[:, :cutoff], truncation_psi)
        return ws

    @torch.no_grad()
    def update_w_avg(self, n: int = 10_000, seed: int = 0, batch: int = 1000) -> torch.Tensor:
        """Set w_avg to the mean of mapping(z) over n seeded draws (for networks that did not track it)."""
        gen = torch.Generator().manual_seed(seed)
        total = torch.zeros(self.w_dim, dtype=torch.float64)
        for start in range(0, n, batch):
            z = torch.randn(min(batch, n - start), self.z_dim, generator=gen).to(self.w_avg.device)
            total += self(z, broadcast=False).double().sum(0).cpu()
        self.w_avg.copy_((total / n).to(self.w_avg))
        return self.w_avg


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x upsampling) + noise + bias + lrelu: one 'StyledConv'."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *, up: bool = False,
                 conv_clamp: float | None = None):
        super().__init__()
        self.up, self.resolution, self.conv_clamp = up, resolution, conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.weight_gain = 1 / math.sqrt(in_channels * 9)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const",
                fused: bool = False) -> torch.Tensor:
        styles = self.affine(w)
        weight = self.weight * self.weight_gain
        res = self.resolution
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, res, res, device=x.device) * self.noise_strength
        elif noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        else:
            noise = None

        if fused:
            x = ops.modulated_conv2d(x, weight.to(x.dtype), styles.to(x.dtype), up=self.up, fused=True)
            if noise is not None:
                x = x + noise.to(x.dtype)
            return ops.bias_lrelu(x, self.bias, clamp=self.conv_clamp)

        # Fast path: demodulation, bias, noise and the lrelu gain folded into one addcmul and an in-place lrelu
        # (lrelu is positively homogeneous, so the gain may be applied before it). Elementwise passes are
        # memory-bound on CPU, so fewer of them is what makes low precision pay.
        x = ops.modulated_conv2d(x, weight.to(x.dtype), styles, demodulate=False, up=self.up)
        scale = ops.demodulation_coefficients(weight, styles) * ops.LRELU_GAIN
        shift = self.bias[None, :, None, None] if noise is None else self.bias[None, :, None, None] + noise
        # Match x's memory format: a broadcast operand in the other layout makes addcmul several times slower.
        shift = (shift * ops.LRELU_GAIN).to(x.dtype).contiguous(memory_format=_memory_format(x))
        x = torch.addcmul(shift, x, scale.to(x.dtype)[:, :, None, None])
        x = F.leaky_relu_(x, ops.LRELU_SLOPE)
        if self.conv_clamp is not None:
            x = x.clamp_(-self.conv_clamp, self.conv_clamp)
        return x


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB without demodulation, plus bias."""

    def __init__(self, in_channels: int, w_dim: int, img_channels: int = 3, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(img_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool = False) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = ops.modulated_conv2d(x, self.weight.to(x.dtype), styles.to(x.dtype), demodulate=False, fused=fused)
        x = x + self.bias.to(x.dtype)[:, None, None]
        return x.clamp(-self.conv_clamp, self.conv_clamp) if self.conv_clamp is not None else x


class SynthesisBlock(nn.Module):
    """One resolution: [const at 4x4 | upsampling conv0] -> conv1 -> ToRGB added to the upsampled image skip."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int = 3,
                 use_fp16: bool = False, conv_clamp: float | None = None):
        super().__init__()
        self.resolution, self.use_fp16 = resolution, use_fp16
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
            self.num_conv = 1
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True, conv_clamp=conv_clamp)
            self.num_conv = 2
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGB(out_channels, w_dim, img_channels, conv_clamp=conv_clamp)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, *,
                noise_mode: str, dtype: torch.dtype, fused: bool, memory_format: torch.memory_format,
                features: list[torch.Tensor] | None):
        """ws: (B, num_conv + 1, w_dim), the last one for ToRGB. Returns (x, img); img stays float32."""
        if self.resolution == 4:
            x = self.const.to(dtype)[None].expand(ws.shape[0], -1, -1, -1)
            if features is not None:
                features.append(x)
            x = x.contiguous(memory_format=memory_format)
            x = self.conv1(x, ws[:, 0], noise_mode, fused)
        else:
            x = x.to(dtype=dtype, memory_format=memory_format)
            x = self.conv0(x, ws[:, 0], noise_mode, fused)
            if features is not None:
                features.append(x)
            x = self.conv1(x, ws[:, 1], noise_mode, fused)
        if features is not None:
            features.append(x)
        y = self.torgb(x, ws[:, -1], fused).float()
        img = y if img is None else ops.upsample2d(img) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws (B, n_latent, w_dim) -> image (B, img_channels, R, R) in about [-1, 1]."""

    def __init__(self, w_dim: int, resolution: int, channel_base: int = 32768, channel_max: int = 512,
                 img_channels: int = 3, num_fp16_res: int = 0, conv_clamp: float | None = None):
        super().__init__()
        log2 = _check_resolution(resolution)
        self.w_dim, self.resolution, self.img_channels = w_dim, resolution, img_channels
        self.resolutions = [2**i for i in range(2, log2 + 1)]
        self.n_latent = 2 * log2 - 2
        fp16_from = max(2 ** (log2 + 1 - num_fp16_res), 8)  # as NVIDIA: the 4x4 block always runs in fp32
        self.fused_modconv = False
        for res in self.resolutions:
            in_channels = channels_at(res // 2, channel_base, channel_max) if res > 4 else 0
            block = SynthesisBlock(in_channels, channels_at(res, channel_base, channel_max), w_dim, res,
                                   img_channels, use_fp16=res >= fp16_from, conv_clamp=conv_clamp)
            setattr(self, f"b{res}", block)

    @property
    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.resolutions]

    @property
    def feature_channels(self) -> list[int]:
        """Channels of each map returned by ``return_features``: const, conv1 at 4x4, then conv0, conv1 per block."""
        out = []
        for block in self.blocks:
            out += [block.conv1.weight.shape[0]] * 2
        return out

    @property
    def feature_resolutions(self) -> list[int]:
        return [res for res in self.resolutions for _ in range(2)]

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", return_features: bool = False,
                force_fp32: bool = False):
        """Synthesize images from W+ latents.

        Args:
            ws: (B, n_latent, w_dim) W+ latents, or (B, w_dim) to broadcast one w to every layer.
            noise_mode: "const" (the stored noise maps; deterministic), "random" or "none".
            return_features: also return the hypercolumn source maps.
            force_fp32: run every block in float32 even where the config asks for reduced precision.

        Returns:
            img (B, img_channels, R, R) float32, about [-1, 1]; with ``return_features`` a tuple
            (img, features) where features is a list of 2 * log2(R) - 2 maps: the constant input, the 4x4 conv,
            then both convs of every higher resolution, each (B, C_i, r_i, r_i) in its block's compute dtype.
        """
        ws = check_synthesis_inputs(ws, noise_mode, self.n_latent, self.w_dim)
        features: list[torch.Tensor] | None = [] if return_features else None
        low = reduced_dtype(ws.device)
        x = img = None
        index = 0
        for block in self.blocks:
            reduced = block.use_fp16 and not force_fp32
            dtype = low if reduced else torch.float32
            # oneDNN's convolutions (fp32 and bf16) are fastest channels-last, as are cuDNN's fp16 ones.
            memory_format = torch.contiguous_format if self.fused_modconv else torch.channels_last
            block_ws = ws[:, index:index + block.num_conv + 1]
            x, img = block(x, img, block_ws, noise_mode=noise_mode, dtype=dtype, fused=self.fused_modconv,
                           memory_format=memory_format, features=features)
            index += block.num_conv
        img = img.contiguous()
        return (img, features) if return_features else img


class MappedGenerator(nn.Module):
    """What every generator here shares: ``G(z)`` is ``G.synthesis(G.mapping(z))``, and ``G.w_avg``."""

    mapping: MappingNetwork

    @property
    def w_avg(self) -> torch.Tensor:
        return self.mapping.w_avg

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                noise_mode: str = "const", return_features: bool = False, force_fp32: bool = False):
        ws = self.mapping(z, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, return_features=return_features, force_fp32=force_fp32)


class Generator(MappedGenerator):
    """StyleGAN2 generator with NVIDIA's API: ``G.mapping``, ``G.synthesis``, ``G(z)``.

    Keyword arguments are the whole config (stored in ``G.config`` and in saved checkpoints):
        resolution: output size R, a power of two in 16..1024.
        z_dim, w_dim: latent sizes (rosinality's style_dim is both).
        n_mlp: mapping layers.
        channel_base, channel_max: feature maps per resolution = min(channel_base // res, channel_max);
            rosinality's channel_multiplier m is channel_base = 16384 * m with channel_max = 512.
        mapping_lr_mul: learning-rate multiplier of the mapping layers.
        img_channels: output channels.
        num_fp16_res: run this many of the highest resolutions in reduced precision (bf16 on CPU, fp16 on CUDA).
        conv_clamp: clamp every conv output to [-conv_clamp, conv_clamp] (NVIDIA uses 256 with fp16).
    """

    def __init__(self, resolution: int = 64, z_dim: int = 512, w_dim: int = 512, n_mlp: int = 8,
                 channel_base: int = 32768, channel_max: int = 512, mapping_lr_mul: float = 0.01,
                 img_channels: int = 3, num_fp16_res: int = 0, conv_clamp: float | None = None):
        super().__init__()
        self.config = dict(resolution=resolution, z_dim=z_dim, w_dim=w_dim, n_mlp=n_mlp, channel_base=channel_base,
                           channel_max=channel_max, mapping_lr_mul=mapping_lr_mul, img_channels=img_channels,
                           num_fp16_res=num_fp16_res, conv_clamp=conv_clamp)
        self.synthesis = SynthesisNetwork(w_dim, resolution, channel_base, channel_max, img_channels, num_fp16_res,
                                          conv_clamp)
        self.mapping = MappingNetwork(z_dim, w_dim, self.synthesis.n_latent, n_mlp, mapping_lr_mul)
        self.z_dim, self.w_dim, self.n_latent = z_dim, w_dim, self.synthesis.n_latent
        self.img_resolution, self.img_channels = resolution, img_channels


class Conv2dLayer(nn.Module):
    """Equalized-lr conv with optional blur-then-stride-2 downsampling, bias and lrelu (discriminator layer)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True,
                 activation: bool = True, down: bool = False, conv_clamp: float | None = None):
        super().__init__()
        self.activation, self.down, self.conv_clamp = activation, down, conv_clamp
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        k = w.shape[-1]
        if self.down and k == 1:
            x = F.conv2d(ops.blur(x, padding=1, stride=2), w)
        elif self.down:
            x = F.conv2d(ops.blur(x, padding=2), w, stride=2)
        else:
            x = F.conv2d(x, w, padding=k // 2)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        if self.activation:
            return ops.bias_lrelu(x, self.bias, gain=ops.LRELU_GAIN * gain, clamp=clamp)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)[:, None, None]
        x = x * gain if gain != 1 else x
        return x.clamp(-clamp, clamp) if clamp is not None else x


class DiscriminatorBlock(nn.Module):
    """Residual block: (fromrgb) -> conv0 -> conv1 (down), plus a 1x1 downsampling skip, summed with 1/sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int, resolution: int, *, first: bool,
                 img_channels: int = 3, use_fp16: bool = False, conv_clamp: float | None = None):
        super().__init__()
        self.resolution, self.use_fp16 = resolution, use_fp16
        if first:
            self.fromrgb = Conv2dLayer(img_channels, in_channels, 1, conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(in_channels, in_channels, 3, conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(in_channels, out_channels, 3, down=True, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(in_channels, out_channels, 1, bias=False, activation=False, down=True)

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        if hasattr(self, "fromrgb"):
            x = self.fromrgb(x)
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        return y + x


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: minibatch standard deviation, conv, fully connected, score."""

    def __init__(self, in_channels: int, mbstd_group_size: int = 4, mbstd_num_channels: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.mbstd_group_size, self.mbstd_num_channels = mbstd_group_size, mbstd_num_channels
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, 3, conv_clamp=conv_clamp)
        self.fc = FullyConnected(in_channels * 16, in_channels, activation=True)
        self.out = FullyConnected(in_channels, 1)

    def minibatch_std(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        group = min(self.mbstd_group_size, n)
        if n % group:
            raise ValueError(f"batch size {n} must be divisible by the minibatch-std group size {group}")
        f = self.mbstd_num_channels
        y = x.float().reshape(group, -1, f, c // f, h, w)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(2, 3, 4))  # (n / group, f)
        y = y.reshape(-1, f, 1, 1).repeat(group, 1, h, w)
        return torch.cat([x, y.to(x.dtype)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.minibatch_std(x.float()))
        return self.out(self.fc(x.flatten(1)))


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator: image (B, C, R, R) in [-1, 1] -> logit (B, 1).

    Keyword arguments (stored in ``D.config``): resolution, channel_base, channel_max, img_channels,
    mbstd_group_size, mbstd_num_channels, num_fp16_res, conv_clamp -- as for ``Generator``.
    """

    def __init__(self, resolution: int = 64, channel_base: int = 32768, channel_max: int = 512,
                 img_channels: int = 3, mbstd_group_size: int = 4, mbstd_num_channels: int = 1,
                 num_fp16_res: int = 0, conv_clamp: float | None = None):
        super().__init__()
        log2 = _check_resolution(resolution)
        self.config = dict(resolution=resolution, channel_base=channel_base, channel_max=channel_max,
                           img_channels=img_channels, mbstd_group_size=mbstd_group_size,
                           mbstd_num_channels=mbstd_num_channels, num_fp16_res=num_fp16_res, conv_clamp=conv_clamp)
        self.resolution = resolution
        self.resolutions = [2**i for i in range(log2, 2, -1)]
        fp16_from = max(2 ** (log2 + 1 - num_fp16_res), 8)
        for res in self.resolutions:
            block = DiscriminatorBlock(channels_at(res, channel_base, channel_max),
                                       channels_at(res // 2, channel_base, channel_max), res,
                                       first=res == resolution, img_channels=img_channels,
                                       use_fp16=res >= fp16_from, conv_clamp=conv_clamp)
            setattr(self, f"b{res}", block)
        self.b4 = DiscriminatorEpilogue(channels_at(4, channel_base, channel_max), mbstd_group_size,
                                        mbstd_num_channels, conv_clamp=conv_clamp)

    def block_features(self, img: torch.Tensor, force_fp32: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last block's output and the list of every block's output, highest resolution first (each
        (B, C_r, r/2, r/2), float32). Per-sample: unlike the logits, no minibatch statistics are involved."""
        x = img
        features = []
        low = reduced_dtype(img.device)
        for res in self.resolutions:
            block = getattr(self, f"b{res}")
            x = block(x, low if block.use_fp16 and not force_fp32 else torch.float32)
            features.append(x.float())
        return x, features

    def forward(self, img: torch.Tensor, return_features: bool = False, force_fp32: bool = False):
        """Returns logits (B, 1); with ``return_features`` also the block outputs (see ``block_features``), used
        as a perceptual feature space."""
        x, features = self.block_features(img, force_fp32)
        logits = self.b4(x)
        return (logits, features) if return_features else logits
