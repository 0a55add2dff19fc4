"""The label generator: an ensemble of pixel-wise MLPs on generator hypercolumns, for any subset of tasks.

Every member is HandsOff's Linear(C, 256)-ReLU-BN-Linear(256, 32)-ReLU-BN-Linear(32, K) with N(0, 0.02)
initialization; the members are stacked into one model (first layer (M * 256, C), the others batched matrix
products), so an ensemble costs one pass. The first layer reads the hypercolumn through
``features.first_layer_at``: it is never materialized. The output channels are the tasks' channels, in order.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from handsoff.errors import DataError, MissingInputError
from handsoff.fileio import read_weights_folder, save_weights_folder
from handsoff.generator.trunk import Trunk
from handsoff.label_generator.features import feature_groups, first_layer_at, first_layer_bands
from handsoff.tasks import task_from_config

# Label pixels per band of ``LabelGenerator.dense_outputs`` (at most ``BAND_ROWS`` rows): 8 rows at 64-512 px. On a
# 2-core AVX2 EPYC (one thread, 21 runs alternating), 1 row at 512 px was 10-15% slower, 2-8 rows within 2%; at 64 px
# 16 rows (a 10 MB band of first-layer outputs, which the interpolation product and the ReLU then re-read) was 5-8%
# slower than 8 (the fastest with 6), 32 or 64 rows 20-35% slower.
BAND_PIXELS = 4096
BAND_ROWS = 8
# Generator features ``predict`` holds at a time: images are run through the generator in chunks of this many
# bytes of features (float32), e.g. 2 images at 256 px (config-f: 0.12 GiB each), the whole batch at 64 px. A batch
# of 16 at once held 1.9 GiB at 256 px and set the peak of fitting (keypoint calibration) and generation.
PREDICT_FEATURE_BYTES = 256 * 2**20
# Arithmetic of dense label maps (``LabelGenerator.dense_outputs``): 'auto' takes bf16 where it is faster. bf16 halves
# the bytes the memory-bound factorized first layer moves and runs its products on native bf16 units; products
# accumulate in float32 and only stored values are rounded. Against float32, measured on the demo's fitted label
# generator (heads-64, 100 samples at psi 0.7): segmentation labels 99.98% of pixels identical (worst image
# 99.93%), depth within 0.04 (0.4% of its mean), 99.5% of keypoints within 0.5 px (0.25% moved over 1 px: near-tied
# heatmap peaks), uncertainty scores ranked alike (rank correlation 0.9999 segmentation, 0.98 keypoints).
LABEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LABEL_PRECISIONS = ("auto", *LABEL_DTYPES)


def resolve_label_precision(precision: str, device) -> str:
    """'fp32' or 'bf16' for ``precision`` (one of ``LABEL_PRECISIONS``) on ``device``: 'auto' is bf16 on CUDA cards
    that support it and on CPUs whose bf16 matrix products measured faster than float32
    (``runtime.reduced_precision_pays(device, 'matmul')``: once per machine, cached), fp32 elsewhere."""
    from handsoff.runtime import reduced_precision_pays

    if precision not in LABEL_PRECISIONS:
        raise ValueError(f"label precision must be one of {', '.join(LABEL_PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and reduced_precision_pays(device, "matmul") else "fp32"


def label_map_dtype(precision: str, device) -> torch.dtype:
    """The dtype of dense label maps for ``precision`` on ``device`` (see ``resolve_label_precision``)."""
    return LABEL_DTYPES[resolve_label_precision(precision, device)]


def feature_bytes_per_image(G: Trunk) -> int:
    """Bytes of one image's generator feature maps in float32 (what a label generator reads per image)."""
    return 4 * sum(c * r * r for c, r in zip(G.synthesis.feature_channels, G.synthesis.feature_resolutions))


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

    @staticmethod
    def _fold(bn: nn.BatchNorm1d, weight: torch.Tensor, bias: torch.Tensor, members: slice
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold an eval-mode BatchNorm (per input channel of ``weight`` (M, I, O)) into the next layer."""
        m, i, _ = weight.shape
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, i)[members]
        shift = bn.bias.view(-1, i)[members] - bn.running_mean.view(-1, i)[members] * scale
        return weight * scale[..., None], bias + torch.einsum("mi,mio->mo", shift, weight)

    def folded(self, members: slice | None = None) -> tuple[torch.Tensor, ...]:
        """Eval-mode layers 2 and 3 of ``members`` with both BatchNorms folded in: (w2 (M', hidden, hidden2),
        b2 (M', hidden2), w3 (M', hidden2, out_channels), b3 (M', out_channels))."""
        members = members or slice(0, self.members)
        w2, b2 = self._fold(self.bn1, self.weight2[members], self.bias2[members], members)
        w3, b3 = self._fold(self.bn2, self.weight3[members], self.bias3[members], members)
        return w2, b2, w3, b3

    def inference_parameters(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        """Eval-mode parameters of every member in ``dtype``: (weight1 (M * hidden, C), bias1 (M * hidden,)) and
        ``folded()``'s four, for ``LabelGenerator.dense_outputs``."""
        return tuple(t.to(dtype) for t in (self.weight1, self.bias1, *self.folded()))

    def forward_hidden(self, h: torch.Tensor, members: slice | None = None,
                       folded: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """First-layer pre-activations as rows (N, M' * hidden) -> outputs (N, M', out_channels), for all members
        or (eval mode only) the slice ``members`` whose first-layer rows ``h`` holds.

        In eval mode both BatchNorms are folded into the following layers (``folded``: that result, when the
        caller runs many row chunks), and the per-member products read the rows in place (strided batched
        matmul), so a dense label map costs few passes over its activations.
        """
        members = members or slice(0, self.members)
        n, m = h.shape[0], len(range(self.members)[members])
        h = F.relu(h, inplace=not torch.is_grad_enabled())
        if self.training:
            if m != self.members:
                raise ValueError("training runs all members at once (BatchNorm statistics span the ensemble)")
            h = torch.bmm(self.bn1(h).view(n, m, self.hidden).transpose(0, 1), self.weight2) + self.bias2[:, None]
            h = self.bn2(F.relu(h).transpose(0, 1).reshape(n, -1)).view(n, m, self.hidden2).transpose(0, 1)
            return (torch.bmm(h, self.weight3) + self.bias3[:, None]).transpose(0, 1)
        w2, b2, w3, b3 = folded or self.folded(members)
        h = torch.baddbmm(b2[:, None], h.view(n, m, self.hidden).transpose(0, 1), w2)  # (M', N, hidden2)
        h = F.relu(h, inplace=not torch.is_grad_enabled())
        return torch.baddbmm(b3[:, None], h, w3).transpose(0, 1)  # (N, M', out_channels)

    def forward(self, hypercolumns: torch.Tensor) -> torch.Tensor:
        """Reference path on materialized hypercolumns (N, C) -> (N, M, out_channels)."""
        return self.forward_hidden(hypercolumns @ self.weight1.t() + self.bias1)


class LabelGenerator(nn.Module):
    """Generator features -> per-task labels with uncertainty.

    Args:
        G: the StyleGAN2 generator whose features are read (kept frozen).
        tasks: task objects (``handsoff.tasks``), in output-channel order.
        label_size: label resolution L (labels are L x L).
        members, hidden, hidden2: ensemble size and widths (HandsOff: 10, 256, 32).
    """

    def __init__(self, G: Trunk, tasks: list, label_size: int, members: int = 10, hidden: int = 256, hidden2: int = 32,
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

    def outputs_at(self, features: list[torch.Tensor], points: torch.Tensor) -> torch.Tensor:
        """Ensemble outputs at label points (B, P, 2): (B, P, M, out_channels)."""
        e = self.ensemble
        h = first_layer_at(features, self.groups, e.weight1, e.bias1, points)
        return e.forward_hidden(h.reshape(-1, h.shape[-1])).reshape(*points.shape[:2], e.members, -1)

    @torch.no_grad()
    def dense_outputs(self, features: list[torch.Tensor], memory_gb: float = 1.0, band: int | None = None,
                      dtype: torch.dtype = torch.float32, parameters: tuple[torch.Tensor, ...] | None = None
                      ) -> torch.Tensor:
        """Outputs at every label pixel: (B, M, out_channels, L, L) float32, computed in ``dtype`` (float32 or
        bfloat16: see ``LABEL_PRECISIONS``). ``parameters``: ``ensemble.inference_parameters(dtype)``, for callers
        that run many images (by default computed here).

        The first layer runs in bands of label rows (``first_layer_bands``) and each band goes through the rest
        of the ensemble at once, so no full-size hidden map is ever held. Members are independent: the native-
        resolution first-layer results of as many members as fit in ``memory_gb`` are computed at a time.
        ``band`` (rows per band) defaults to ``BAND_PIXELS`` label pixels, at most ``BAND_ROWS`` rows.
        """
        self.eval()
        e, size = self.ensemble, self.label_size
        weight1, bias1, *folded = parameters or e.inference_parameters(dtype)
        batch = features[0].shape[0]
        features = [f.to(dtype) for f in features]
        native_pixels = sum(g.resolution**2 for g in self.groups if g.resolution < size) or 1
        chunk = int(min(e.members, max(1, memory_gb * 2**30 // (native_pixels * e.hidden * 4 * batch))))
        band = band or max(1, min(BAND_ROWS, BAND_PIXELS // size))
        out = torch.empty(batch, size, size, e.members, e.out_channels, device=e.weight1.device)
        for m0 in range(0, e.members, chunk):
            members = slice(m0, min(m0 + chunk, e.members))
            weights = slice(members.start * e.hidden, members.stop * e.hidden)
            layers = tuple(t[members] for t in folded)
            for rows, h in first_layer_bands(features, self.groups, weight1[weights], bias1[weights], size, band):
                o = e.forward_hidden(h.reshape(-1, h.shape[-1]), members, layers)  # (B * rows * L, M', O)
                out[:, rows.start:rows.stop, :, members] = o.view(batch, len(rows), size, *o.shape[1:])
        return out.permute(0, 3, 4, 1, 2).contiguous()

    @torch.no_grad()
    def predict(self, ws: torch.Tensor, precision: str = "auto") -> dict:
        """For W+ latents (B, n_latent, w_dim): {"images": (B, 3, R, R) in [-1, 1], "label_size": L, "tasks": the
        task objects, task name: [per-image dict from the task's ``decode``: label, uncertainty (L, L), score, ...]}.
        ``precision``: the label maps' arithmetic (``LABEL_PRECISIONS``)."""
        ws = ws.to(self.ensemble.weight1.device)
        dtype = label_map_dtype(precision, ws.device)
        parameters = self.ensemble.inference_parameters(dtype)  # once, not per image
        chunk = max(1, PREDICT_FEATURE_BYTES // feature_bytes_per_image(self.G))
        result = {"images": [], "label_size": self.label_size, "tasks": self.tasks,
                  **{task.name: [] for task in self.tasks}}
        for first in range(0, len(ws), chunk):
            images, feats = self.features(ws[first:first + chunk])
            result["images"].append(images.clamp(-1, 1))
            for i in range(len(images)):
                # One image's outputs at a time: (M, O, L, L) is 0.65 GB for 10 members and 25 channels at 256 px,
                # so a whole batch of them (and their decoding) would set the peak memory of generation and fitting.
                outputs = self.dense_outputs([f[i:i + 1] for f in feats], dtype=dtype, parameters=parameters)[0]
                for task in self.tasks:
                    result[task.name].append(task.decode(outputs[:, self.slices[task.name]]))
            del images, feats
        result["images"] = torch.cat(result["images"])
        return result

    @torch.no_grad()
    def predict_z(self, z: torch.Tensor, truncation_psi: float = 0.7, precision: str = "auto") -> dict:
        """As ``predict`` for z (B, z_dim), mapped with truncation."""
        return self.predict(self.G.mapping(z.to(self.G.w_avg.device), truncation_psi=truncation_psi), precision)


def prediction_sample(result: dict, i: int, void_top: float = 0.0) -> dict:
    """Sample ``i`` of a ``predict`` result in the labeled-data layout's form: image (L, L, 3) uint8 (resized,
    antialiased, where the generator's resolution differs from the label resolution L) and, per task present,
    mask (L, L) int64, keypoints (K, 3) float32 in label pixels (COCO visibility), depth (L, L) float32; with
    ``void_top`` > 0 that fraction of each dense label's most uncertain pixels is void (mask 255, depth NaN)."""
    import torch.nn.functional as F

    from handsoff.visualize import to_uint8

    image = result["images"][i:i + 1]
    size = result.get("label_size", image.shape[-1])
    if image.shape[-1] != size:
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    sample = {"image": to_uint8(image)[0]}
    for task in result["tasks"]:
        sample[task.sample_key] = task.label(result[task.name][i], void_top)
    return sample


def save_label_generator(model: LabelGenerator, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``out_dir/config.json`` + ``out_dir/model.safetensors`` (the ensemble only; the generator is referenced)."""
    config = {"format": "handsoff-label-generator", "version": 1, **model.config(), "metadata": metadata or {}}
    return save_weights_folder(out_dir, model.ensemble.state_dict(), config)


def load_label_generator(path: str | os.PathLike, generator=None, device: str | torch.device = "cpu"
                         ) -> LabelGenerator:
    """Load a label generator; its generator is loaded from the recorded reference unless one is given."""
    from handsoff.generator import load_generator
    from handsoff.generator.checkpoints import RUNTIME_KEYS

    path = Path(path)
    config, state = read_weights_folder(path, "a label generator folder (make one with `handsoff fit`)")
    if generator is None:
        if not config.get("generator"):
            raise MissingInputError(f"{path / 'config.json'}: records no generator; pass one explicitly")
        generator = load_generator(config["generator"], device=device)
    def architecture(c: dict) -> dict:  # runtime settings (precision, clamping) may be overridden at load time
        return {k: v for k, v in c.items() if k not in RUNTIME_KEYS}

    if architecture(generator.config) != architecture(config["generator_config"]):
        raise DataError(f"{path / 'config.json'}: fitted on a generator with config {config['generator_config']}, "
                        f"got {generator.config}")
    tasks = [task_from_config(t) for t in config["tasks"]]
    model = LabelGenerator(generator, tasks, config["label_size"], config["members"], config["hidden"],
                           config["hidden2"], generator_ref=config.get("generator"))
    model.ensemble.load_state_dict(state)
    return model.to(device).eval()
