"""Hypercolumn features of a StyleGAN2, and the factorized first layer that never materializes them.

A hypercolumn at label resolution L is every synthesis feature map (the constant, conv1 at 4x4, both convs of
each higher block; see ``SynthesisNetwork.forward``) bilinearly resized to L x L and concatenated: C channels per
pixel (6080 for FFHQ config-f). The label generator's first layer is linear, and resizing acts per channel, so

    W . concat_l(resize(f_l)) + b  ==  sum_g sample_g(W_g . f_g) + b,

where g runs over groups of maps of equal resolution and W_g is the block of W that reads them. Bilinear resizing
with ``align_corners=False`` at the centre of label pixel (i, j) is exactly ``grid_sample`` at that point (border
padding), so the same identity gives the first layer *at any set of label pixels* without resizing anything:
per group, either apply W_g at native resolution and sample the result (cheap for small maps), or sample the
group's features and apply W_g to the samples (cheap when there are fewer points than native pixels). Either
way the C-channel hypercolumn exists only for the points at hand, never for a whole full-resolution image.

Shapes: features is a list of (B, C_l, r_l, r_l) maps; points are (B, P, 2) normalized (x, y) in [-1, 1];
first-layer outputs are rows with channels last, (B, P, out_channels) or (B, L, L, out_channels), which is what the
ensemble's per-member matrix products read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Label pixels per matrix product of the lower groups in ``first_layer_bands``: each lower-resolution group adds
# about block * r / L + 2 source columns to the product's inner dimension (at 64 px: 34 columns for heads-64's four
# lower groups, against 60 for whole rows; at 512 px: 45 for FFHQ's seven). On a 2-core AVX2 EPYC, 32 was the
# fastest at 64 px (16: 5% slower, 64: 10-15%) and as fast as 64 at 512 px (16 and 128: 5-10% slower).
WIDTH_BLOCK = 32


@dataclass(frozen=True)
class FeatureGroup:
    """Feature maps of one resolution: their indices in the feature list and their channel slice of W."""

    resolution: int
    maps: tuple[int, ...]
    start: int
    stop: int


def feature_groups(channels: list[int], resolutions: list[int]) -> list[FeatureGroup]:
    """Group the hypercolumn's channel ranges by resolution (maps of one resolution are adjacent in the list)."""
    groups, offset = [], 0
    for i, (c, r) in enumerate(zip(channels, resolutions)):
        if groups and groups[-1].resolution == r:
            g = groups[-1]
            groups[-1] = FeatureGroup(r, (*g.maps, i), g.start, offset + c)
        else:
            groups.append(FeatureGroup(r, (i,), offset, offset + c))
        offset += c
    return groups


def pixel_grid(size: int, rows: slice | None = None, device=None) -> torch.Tensor:
    """Normalized centres of label pixels, (P, 2) as (x, y), row-major; optionally only some rows."""
    rows = rows or slice(0, size)
    ys = (torch.arange(rows.start, min(rows.stop, size), device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    xs = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1).reshape(-1, 2)


def pixel_points(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Normalized centres (..., 2) of flat label-pixel indices (row-major) at label resolution ``size``."""
    y, x = indices // size, indices % size
    return torch.stack([(x.float() + 0.5) / size * 2 - 1, (y.float() + 0.5) / size * 2 - 1], -1)


def _sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of maps (B, C, r, r) at points (B, P, 2): (B, P, C)."""
    out = F.grid_sample(maps, points[:, None].to(maps.dtype), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[:, :, 0].transpose(1, 2)


def _group_maps(features: list[torch.Tensor], g: FeatureGroup, dtype: torch.dtype) -> torch.Tensor:
    f = torch.cat([features[i] for i in g.maps], 1) if len(g.maps) > 1 else features[g.maps[0]]
    return f.to(dtype)


def _apply(weight: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """1x1 conv of maps (B, C, ...) with weight (O, C): (B, O, ...), as a batched matmul."""
    b, c = maps.shape[:2]
    return (weight @ maps.reshape(b, c, -1)).reshape(b, weight.shape[0], *maps.shape[2:])


def first_layer_at(features: list[torch.Tensor], groups: list[FeatureGroup], weight: torch.Tensor,
                   bias: torch.Tensor | None, points: torch.Tensor) -> torch.Tensor:
    """weight (O, C) applied to the hypercolumns at ``points`` (B, P, 2), without materializing them: (B, P, O).

    Per group, the cheaper order is used: with at most P native pixels, W_g is applied at native resolution and
    the O-wide result is sampled; otherwise the group's features are sampled and W_g is applied to the samples.
    When ``weight`` is being trained, every group's features are sampled first (they carry no gradient) and one
    matmul applies W: the backward pass then never scatters into O-wide maps, which costs several times the
    forward pass on CPU.
    """
    b, p = points.shape[:2]
    if weight.requires_grad and torch.is_grad_enabled():
        x = torch.cat([_sample(_group_maps(features, g, weight.dtype), points) for g in groups], -1)  # (B, P, C)
        out = x @ weight.t()
        return out + bias if bias is not None else out
    out = torch.zeros(b, p, weight.shape[0], device=weight.device, dtype=weight.dtype)
    if bias is not None:
        out = out + bias
    for g in groups:
        w, f = weight[:, g.start:g.stop], _group_maps(features, g, weight.dtype)
        out = out + (_sample(_apply(w, f), points) if g.resolution**2 <= p else _sample(f, points) @ w.t())
    return out


def first_layer_dense(features: list[torch.Tensor], groups: list[FeatureGroup], weight: torch.Tensor,
                      bias: torch.Tensor | None, size: int, band: int | None = None,
                      block: int = WIDTH_BLOCK) -> torch.Tensor:
    """The first layer at every pixel of a size x size label map, channels last: (B, size, size, O).

    Groups below the label resolution: W_g at native resolution, then bilinear upsampling of the O-wide result;
    groups at it: W_g directly; groups above it: features resized down first (resizing commutes with W_g).
    Equal to resizing everything and concatenating (``materialized_hypercolumns``), without doing so. Computed
    in bands of ``band`` rows (default: all at once) by ``first_layer_bands``.
    """
    out = torch.empty(features[0].shape[0], size, size, weight.shape[0], dtype=weight.dtype, device=weight.device)
    for rows, h in first_layer_bands(features, groups, weight, bias, size, band or size, block):
        out[:, rows.start:rows.stop] = h  # each band is a view of one reused buffer
    return out


def _interpolation_matrix(size: int, r: int) -> torch.Tensor:
    """(size, r) matrix of the bilinear (align_corners=False) upsampling r -> size along one axis: row i holds the
    two weights of output i, exactly as ``F.interpolate`` computes them (source positions clamped at the border)."""
    src = ((torch.arange(size, dtype=torch.float64) + 0.5) * (r / size) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=r - 1)
    i1, a = (i0 + 1).clamp(max=r - 1), (src - i0).float()
    matrix = torch.zeros(size, r)
    matrix[torch.arange(size), i0] += 1 - a
    matrix[torch.arange(size), i1] += a
    return matrix


def _support(matrix: torch.Tensor) -> tuple[int, int]:
    """The range [c0, c1) of columns where rows of an interpolation matrix have nonzero weights."""
    cols = matrix.nonzero()[:, 1]
    return int(cols.min()), int(cols.max()) + 1


@dataclass(frozen=True)
class _LowerPlan:
    """How ``first_layer_bands`` reads the lower-resolution groups (CPU tensors; depends only on sizes).

    windows: per lower group, (offset of its source columns in K, span, first source column of each block);
    widths: (blocks, block, K) width-interpolation weights of every block; heights: per lower group, per band,
    (first source row, the band's height weights (rows, source rows)).
    """

    block: int
    blocks: int
    k: int
    windows: tuple[tuple[int, int, tuple[int, ...]], ...]
    widths: torch.Tensor
    heights: tuple[tuple[tuple[int, torch.Tensor], ...], ...]


@functools.lru_cache(maxsize=64)
def _lower_plan(size: int, resolutions: tuple[int, ...], block: int, band: int) -> _LowerPlan:
    blocks = -(-size // block)
    block = -(-size // blocks)                                     # equal blocks; rows are padded to whole blocks
    starts = range(0, size, block)
    matrices = [_interpolation_matrix(size, r) for r in resolutions]
    windows, heights, k = [], [], 0
    for r, matrix in zip(resolutions, matrices):
        supports = [_support(matrix[x0:x0 + block]) for x0 in starts]
        span = max(c1 - c0 for c0, c1 in supports)
        windows.append((k, span, tuple(min(c0, r - span) for c0, _ in supports)))
        k += span
        per_band = []
        for y0 in range(0, size, band):
            c0, c1 = _support(matrix[y0:y0 + band])                # the source rows this band reads
            per_band.append((c0, matrix[y0:y0 + band, c0:c1].contiguous()))
        heights.append(tuple(per_band))
    widths = torch.zeros(blocks, block, k)
    for matrix, (offset, span, firsts) in zip(matrices, windows):
        for j, (x0, c) in enumerate(zip(starts, firsts)):
            widths[j, :min(block, size - x0), offset:offset + span] = matrix[x0:x0 + block, c:c + span]
    return _LowerPlan(block, blocks, k, tuple(windows), widths, tuple(heights))


@torch.no_grad()
def first_layer_bands(features: list[torch.Tensor], groups: list[FeatureGroup], weight: torch.Tensor,
                      bias: torch.Tensor | None, size: int, band: int, block: int = WIDTH_BLOCK):
    """``first_layer_dense`` one band of ``band`` label rows at a time: yields (rows, (B, len(rows), size, O)),
    a view of one buffer that every band overwrites: use (or copy) it before asking for the next band.

    Two matrix products per band write the output. (1) The groups at (or resized down to) the label resolution:
    one product over all pixels of the band, (B * rows * size, C_direct) @ (C_direct, O) (the bias rides on the
    first lower group's native result where there is one: interpolation weights sum to one). (2) The
    lower-resolution groups, added in place: every ``block`` label pixels of a label row are one product
    (block, K) @ (K, O) whose K axis holds, per group, the width-interpolation weights over the few source columns
    that block reads, against those source columns of the group's O-wide result at native resolution, already
    interpolated to the row in height. So no upsampled O-wide map ever exists, and the interpolation costs a few
    multiply-adds per output value per group (the source columns a block reads) at matrix-product speed. Narrow
    blocks read fewer source columns per pixel (at 64 px with block 32: 34 of the lower groups' 60 columns) at the
    price of smaller products.
    """
    b, width, dtype, device = features[0].shape[0], weight.shape[0], weight.dtype, weight.device
    direct, direct_weights, lower = [], [], []
    for g in groups:
        w, f = weight[:, g.start:g.stop], _group_maps(features, g, dtype)
        if g.resolution > size:
            f = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
        r = f.shape[-1]
        if r == size:
            direct.append(f.permute(0, 2, 3, 1))
            direct_weights.append(w.t())
        elif bias is not None and not lower:
            # Interpolation weights sum to one, so the bias added to one lower group's native result reaches every
            # label pixel exactly; the band products then write their outputs without first copying the bias in
            # (an extra read and write of every output: 3% of the time at 64 px, A/B on a 2-core EPYC).
            lower.append(torch.addmm(bias, f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), w.t()).view(b, r, r, width))
            bias = None
        else:
            lower.append((f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) @ w.t()).view(b, r, r, width))  # (B, r, r, O)
    plan = _lower_plan(size, tuple(h.shape[1] for h in lower), block, band)
    blocks, block, k = plan.blocks, plan.block, plan.k
    padded = blocks * block
    cd = sum(d.shape[-1] for d in direct)
    if cd:  # channels last, rows padded with zeros to whole blocks
        direct_features = F.pad(torch.cat(direct, -1), (0, 0, 0, padded - size))
        direct_weight = torch.cat(direct_weights, 0)                                  # (C_direct, O)
    if k:
        # Left operand per block (block, K): the width weights, the same in every row. Right operand per row and
        # block (K, O): the lower groups' source columns, interpolated in height, written per band.
        rows_max = min(band, size)
        left = plan.widths.to(device, dtype).expand(b * rows_max, -1, -1, -1).reshape(-1, block, k)
        right = torch.empty(b * rows_max, blocks, k, width, dtype=dtype, device=device)
        heights = [[(c0, m.to(device, dtype)) for c0, m in per_band] for per_band in plan.heights]
    # One output buffer for every band: a fresh one per band is cold memory, and writing it cost the direct product
    # half its speed at 64 px (2.7 -> 5.5 ms per band on a 2-core EPYC).
    buffer = torch.empty(b * min(band, size) * padded * width, dtype=dtype, device=device)
    for index, y0 in enumerate(range(0, size, band)):
        rows = range(y0, min(y0 + band, size))
        n = len(rows)
        result = buffer[:b * n * padded * width].view(b, n, padded, width)
        if cd:
            pixels, flat = direct_features[:, y0:rows.stop].reshape(-1, cd), result.view(-1, width)
            torch.mm(pixels, direct_weight, out=flat) if bias is None else \
                torch.addmm(bias, pixels, direct_weight, out=flat)
        elif bias is None:
            result.zero_()
        else:
            result.copy_(bias.expand_as(result))
        if k:
            rhs = right[:b * n].view(b, n, blocks, k, width)
            for h, (offset, span, firsts), per_band in zip(lower, plan.windows, heights):
                c0, weights = per_band[index]                                      # (n, s)
                for i in range(b):
                    for j, c in enumerate(firsts):  # (n, s) @ (s, span * O), straight into the right operand's rows
                        torch.mm(weights, h[i, c0:c0 + weights.shape[1], c:c + span].reshape(weights.shape[1], -1),
                                 out=rhs[i, :, j, offset:offset + span].view(n, -1))
            blocked = result.view(-1, block, width)
            torch.baddbmm(blocked, left[:b * n * blocks], rhs.view(-1, k, width), out=blocked)
        yield rows, result[:, :, :size]


def materialized_hypercolumns(features: list[torch.Tensor], size: int) -> torch.Tensor:
    """The reference: every map resized to size x size (bilinear, align_corners=False) and concatenated:
    (B, C, size, size). Memory grows with C * size^2; for tests and benchmarks of small sizes only."""
    return torch.cat([F.interpolate(f.float(), size=(size, size), mode="bilinear", align_corners=False)
                      for f in features], 1)
