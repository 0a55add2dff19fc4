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
first-layer outputs are (B, P, out_channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def native_first_layer(features: list[torch.Tensor], groups: list[FeatureGroup], weight: torch.Tensor,
                       which: list[int]) -> dict[int, torch.Tensor]:
    """W_g applied at native resolution for the groups listed in ``which``: {group index: (B, O, r, r)}."""
    return {i: torch.einsum("oc,bchw->bohw", weight[:, groups[i].start:groups[i].stop],
                            _group_maps(features, groups[i], weight.dtype)) for i in which}


def first_layer_at(features: list[torch.Tensor], groups: list[FeatureGroup], weight: torch.Tensor,
                   bias: torch.Tensor | None, points: torch.Tensor,
                   native: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """weight (O, C) applied to the hypercolumns at ``points`` (B, P, 2), without materializing them: (B, P, O).

    Per group, the cheaper order is used: groups in ``native`` (precomputed by ``native_first_layer``, e.g. once
    for all tiles of an image) are sampled after W_g; by default that is every group with at most P native
    pixels. The other groups' features are sampled at the points and W_g is applied to the samples.
    """
    b, p = points.shape[:2]
    if native is None:
        native = native_first_layer(features, groups, weight, [i for i, g in enumerate(groups)
                                                               if g.resolution**2 <= p])
    out = torch.zeros(b, p, weight.shape[0], device=weight.device, dtype=weight.dtype) if bias is None \
        else bias.expand(b, p, -1).clone()
    for i, g in enumerate(groups):
        if i in native:
            out = out + _sample(native[i], points)
        else:
            out = out + _sample(_group_maps(features, g, weight.dtype), points) @ weight[:, g.start:g.stop].t()
    return out


def materialized_hypercolumns(features: list[torch.Tensor], size: int) -> torch.Tensor:
    """The reference: every map resized to size x size (bilinear, align_corners=False) and concatenated:
    (B, C, size, size). Memory grows with C * size^2; for tests and benchmarks of small sizes only."""
    return torch.cat([F.interpolate(f.float(), size=(size, size), mode="bilinear", align_corners=False)
                      for f in features], 1)
