"""The label generator: an ensemble of pixel-wise MLPs on generator hypercolumns, for any subset of tasks.

Every member is HandsOff's Linear(C, 256)-ReLU-BN-Linear(256, 32)-ReLU-BN-Linear(32, K) with N(0, 0.02)
initialization; the members are stacked into one model (first layer (M * 256, C), the others batched matrix
products), so an ensemble costs one pass. The first layer reads the hypercolumn through
``features.first_layer_at``: it is never materialized. The output channels are the tasks' channels, in order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from handsoff.fileio import atomic_save
from handsoff.label_generator.features import feature_groups, first_layer_at, native_first_layer, pixel_grid
from handsoff.label_generator.tasks import task_from_config


class MLPEnsemble(nn.Module):
    """M stacked MLPs from C-channel hypercolumns to ``out_channels`` per pixel.

    ``forward_hidden`` takes first-layer pre-activations (N, M * hidden) and returns (N, M, out_channels).
    """

    def __init__(self, in_channels: int, out_channels: int, members: int = 10, hidden: int = 256,
                 hidden2: int = 32):
        super().__init__()
        self.members, self.hidden, self.hidden2, self.out_channels = members, hidden, hidden2, out_channels
        self.weight1 = nn.Parameter(torch.randn(members * hidden, in_channels) * 0.02)
        self.bias1 = nn.Parameter(torch.zeros(members * hidden))
        self.bn1 = nn.BatchNorm1d(members * hidden)
        self.weight2 = nn.Parameter(torch.randn(members, hidden, hidden2) * 0.02)
        self.bias2 = nn.Parameter(torch.zeros(members, hidden2))
        self.bn2 = nn.BatchNorm1d(members * hidden2)
        self.weight3 = nn.Parameter(torch.randn(members, hidden2, out_channels) * 0.02)
        self.bias3 = nn.Parameter(torch.zeros(members, out_channels))

    def forward_hidden(self, h: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        h = self.bn1(torch.relu(h)).reshape(n, self.members, self.hidden)
        h = torch.einsum("nmh,mhk->nmk", h, self.weight2) + self.bias2
        h = self.bn2(torch.relu(h).reshape(n, -1)).reshape(n, self.members, self.hidden2)
        return torch.einsum("nmh,mhk->nmk", h, self.weight3) + self.bias3

    def forward(self, hypercolumns: torch.Tensor) -> torch.Tensor:
        """Reference path on materialized hypercolumns (N, C) -> (N, M, out_channels)."""
        return self.forward_hidden(hypercolumns @ self.weight1.t() + self.bias1)


class LabelGenerator(nn.Module):
    """Generator features -> per-task labels with uncertainty.

    Args:
        G: the StyleGAN2 generator whose features are read (kept frozen).
        tasks: task objects (``handsoff.label_generator.tasks``), in output-channel order.
        label_size: label resolution L (labels are L x L).
        members, hidden, hidden2: ensemble size and widths (HandsOff: 10, 256, 32).
    """

    def __init__(self, G, tasks: list, label_size: int, members: int = 10, hidden: int = 256, hidden2: int = 32,
                 generator_ref: str | None = None):
        super().__init__()
        self.G = G.eval().requires_grad_(False)
        self.tasks = list(tasks)
        self.label_size = label_size
        self.generator_ref = generator_ref
        channels, resolutions = G.synthesis.feature_channels, G.synthesis.feature_resolutions
        self.groups = feature_groups(channels, resolutions)
        self.ensemble = MLPEnsemble(sum(channels), sum(t.out_channels for t in self.tasks), members, hidden, hidden2)
        self.slices, start = {}, 0
        for t in self.tasks:
            self.slices[t.name] = slice(start, start + t.out_channels)
            start += t.out_channels

    def config(self) -> dict:
        e = self.ensemble
        return {"tasks": [t.config() for t in self.tasks], "label_size": self.label_size, "members": e.members,
                "hidden": e.hidden, "hidden2": e.hidden2, "generator": self.generator_ref,
                "generator_config": self.G.config}

    def features(self, ws: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images (B, 3, R, R) and feature maps of W+ latents (B, n_latent, w_dim), const noise."""
        with torch.no_grad():
            return self.G.synthesis(ws, noise_mode="const", return_features=True)

    def outputs_at(self, features: list[torch.Tensor], points: torch.Tensor,
                   native: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Ensemble outputs at label points (B, P, 2): (B, P, M, out_channels)."""
        b, p = points.shape[:2]
        e = self.ensemble
        h = first_layer_at(features, self.groups, e.weight1, e.bias1, points, native)
        return e.forward_hidden(h.reshape(b * p, -1)).reshape(b, p, e.members, -1)

    @torch.no_grad()
    def dense_outputs(self, features: list[torch.Tensor], tile_pixels: int = 16384,
                      native_budget_gb: float = 2.0) -> torch.Tensor:
        """Outputs at every label pixel, computed in tiles of rows: (B, M, out_channels, L, L).

        Groups with fewer native pixels than label pixels get W_g applied once at native resolution (shared by
        all tiles) while the results fit in ``native_budget_gb``; the others are sampled per tile.
        """
        self.eval()
        size = self.label_size
        rows_per_tile = max(1, tile_pixels // size)
        device = self.ensemble.weight1.device
        batch, width = features[0].shape[0], self.ensemble.weight1.shape[0]
        which, budget = [], native_budget_gb * 2**30
        for i, g in sorted(enumerate(self.groups), key=lambda t: t[1].resolution):
            cost = batch * width * g.resolution**2 * 4
            if g.resolution < size and cost <= budget:
                which.append(i)
                budget -= cost
        native = native_first_layer(features, self.groups, self.ensemble.weight1, which)
        tiles = []
        for r0 in range(0, size, rows_per_tile):
            grid = pixel_grid(size, slice(r0, r0 + rows_per_tile), device)
            points = grid[None].expand(batch, -1, -1)
            tiles.append(self.outputs_at(features, points, native))
        out = torch.cat(tiles, 1)  # (B, L*L, M, O)
        b, _, m, o = out.shape
        return out.permute(0, 2, 3, 1).reshape(b, m, o, size, size)

    @torch.no_grad()
    def predict(self, ws: torch.Tensor, tile_pixels: int = 16384) -> dict:
        """For W+ latents (B, n_latent, w_dim): {"images": (B, 3, R, R) in [-1, 1], task name: [per-image dict
        from the task's ``decode``: label, uncertainty (L, L), score, ...]}."""
        images, feats = self.features(ws.to(self.ensemble.weight1.device))
        outputs = self.dense_outputs(feats, tile_pixels)
        result = {"images": images.clamp(-1, 1), "label_size": self.label_size}
        for task in self.tasks:
            sl = self.slices[task.name]
            result[task.name] = [task.decode(outputs[i, :, sl]) for i in range(len(ws))]
        return result

    @torch.no_grad()
    def predict_z(self, z: torch.Tensor, truncation_psi: float = 0.7) -> dict:
        """As ``predict`` for z (B, z_dim), mapped with truncation."""
        return self.predict(self.G.mapping(z.to(self.G.w_avg.device), truncation_psi=truncation_psi))


def prediction_sample(result: dict, i: int) -> dict:
    """Sample ``i`` of a ``predict`` result in the labeled-data layout's form: image (L, L, 3) uint8 (resized,
    antialiased, where the generator's resolution differs from the label resolution L) and, per task present,
    mask (L, L) int64, keypoints (K, 3) float32 in label pixels (COCO visibility), depth (L, L) float32."""
    import torch.nn.functional as F

    from handsoff.visualize import to_uint8

    image = result["images"][i:i + 1]
    size = result.get("label_size", image.shape[-1])
    if image.shape[-1] != size:
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    sample = {"image": to_uint8(image)[0]}
    if "seg" in result:
        sample["mask"] = result["seg"][i]["label"].cpu().numpy().astype("int64")
    if "kp" in result:
        sample["keypoints"] = result["kp"][i]["label"].cpu().numpy().astype("float32")
    if "depth" in result:
        sample["depth"] = result["depth"][i]["label"].cpu().numpy().astype("float32")
    return sample


def save_label_generator(model: LabelGenerator, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``out_dir/config.json`` + ``out_dir/model.safetensors`` (the ensemble only; the generator is referenced)."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.ensemble.state_dict().items()}
    atomic_save(out_dir / "model.safetensors", lambda tmp: save_file(state, tmp))
    config = {"format": "handsoff-label-generator", "version": 1, **model.config(), "metadata": metadata or {}}
    atomic_save(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def load_label_generator(path: str | os.PathLike, generator=None, device: str | torch.device = "cpu"
                         ) -> LabelGenerator:
    """Load a label generator; its generator is loaded from the recorded reference unless one is given."""
    from handsoff.generator import load_generator

    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing; not a label generator folder (make one with "
                                    "`handsoff fit`)")
    config = json.loads((path / "config.json").read_text())
    if generator is None:
        if not config.get("generator"):
            raise FileNotFoundError(f"{path / 'config.json'}: records no generator; pass one explicitly")
        generator = load_generator(config["generator"], device=device)
    if generator.config != config["generator_config"]:
        raise ValueError(f"{path / 'config.json'}: fitted on a generator with config {config['generator_config']}, "
                         f"got {generator.config}")
    tasks = [task_from_config(t) for t in config["tasks"]]
    model = LabelGenerator(generator, tasks, config["label_size"], config["members"], config["hidden"],
                           config["hidden2"], generator_ref=config.get("generator"))
    model.ensemble.load_state_dict(load_file(path / "model.safetensors"))
    return model.to(device).eval()
