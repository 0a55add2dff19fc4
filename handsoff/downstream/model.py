"""The downstream network: a torchvision DeepLabV3 with one head per task.

Backbones: ``resnet50`` / ``resnet101`` (DeepLabV3's own, output stride 8, for real use), ``mobilenet_v3_large``
(output stride 16) and ``resnet18`` (dilated like DeepLabV3's ResNets, output stride 8; the CPU default).
Every task gets a ``DeepLabHead`` (ASPP) on the last backbone stage; outputs are bilinearly upsampled to the
input size:

    seg    (B, K, H, W) class logits
    kp     (B, K, H, W) keypoint heatmaps (Gaussian targets, peak 1)
    depth  (B, 1, H, W) normalized log depth (see ``handsoff.label_generator.tasks.Depth``)

ImageNet weights are never downloaded: ``backbone_weights`` takes a local torchvision classification state dict
(e.g. ``resnet50-0676ba61.pth``); its classifier keys are ignored and anything else missing is an error.
Inputs are images in [-1, 1]; the model applies ImageNet normalization itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from handsoff.generator.checkpoints import CheckpointError

BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenet_v3_large")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _dilate_basic_resnet(net: nn.Module) -> None:
    """Output stride 8 for a BasicBlock ResNet: layer3 / layer4 keep resolution with dilation 2 / 4."""
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for i, block in enumerate(layer):
            if i == 0:
                block.conv1.stride = (1, 1)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)
                first = dilation // 2
                block.conv1.dilation, block.conv1.padding = (first, first), (first, first)
            else:
                block.conv1.dilation, block.conv1.padding = (dilation, dilation), (dilation, dilation)
            block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)


def build_backbone(name: str) -> tuple[nn.Module, nn.Module, int]:
    """(classification network, feature extractor returning {'out': map}, channels of that map)."""
    if name == "resnet18":
        net = torchvision.models.resnet18(weights=None)
        _dilate_basic_resnet(net)
        return net, IntermediateLayerGetter(net, {"layer4": "out"}), 512
    if name in ("resnet50", "resnet101"):
        net = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, True, True])
        return net, IntermediateLayerGetter(net, {"layer4": "out"}), 2048
    if name == "mobilenet_v3_large":
        net = torchvision.models.mobilenet_v3_large(weights=None, dilated=True)
        return net, IntermediateLayerGetter(net.features, {str(len(net.features) - 1): "out"}), 960
    raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")


def load_backbone_weights(net: nn.Module, path: str | os.PathLike) -> None:
    """Load a local torchvision classification checkpoint into ``net`` (classifier keys ignored)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: backbone weights not found (handsoff never downloads weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"{path}: cannot read backbone weights ({e})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    head = ("fc.", "classifier.")
    wanted = {k: v for k, v in state.items() if not k.startswith(head)}
    own = {k for k in net.state_dict() if not k.startswith(head)}
    missing = sorted(own - set(wanted))
    if missing:
        raise CheckpointError(f"{path}: not weights for this backbone (missing {', '.join(missing[:4])} ...)")
    try:
        net.load_state_dict(wanted, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: backbone weights of the wrong shape ({e})") from None


class DenseModel(nn.Module):
    """Backbone + one DeepLabV3 head per task. ``heads``: {task name: output channels}."""

    def __init__(self, backbone: str, heads: dict[str, int], backbone_weights: str | os.PathLike | None = None):
        super().__init__()
        self.config = {"backbone": backbone, "heads": dict(heads),
                       "backbone_init": "imagenet (local file)" if backbone_weights else "random"}
        net, self.backbone, channels = build_backbone(backbone)
        if backbone_weights:
            load_backbone_weights(net, backbone_weights)
        self.heads = nn.ModuleDict({name: DeepLabHead(channels, c) for name, c in heads.items()})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[None, :, None, None])
        self.register_buffer("std", torch.tensor(IMAGENET_STD)[None, :, None, None])

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = ((images + 1) / 2 - self.mean) / self.std
        features = self.backbone(x)["out"]
        size = images.shape[-2:]
        return {name: F.interpolate(head(features), size=size, mode="bilinear", align_corners=False)
                for name, head in self.heads.items()}
