"""The downstream network that judges a dataset: a backbone, a decoder and one head per task.

Two decoders on the same backbones:

* ``unet`` (default): a U-Net decoder on the backbone's feature pyramid (strides 32 -> 16 -> 8 -> 4 -> 2 -> 1, a
  skip connection at every stride, the last one from a light convolution of the image itself) that predicts at
  the input resolution. Small parts (a 5 x 3-px eye at 64 px, a keypoint within 1.3 px) survive it; the backbone
  keeps its ordinary strides, so it is also the cheapest choice on CPU.
* ``deeplabv3``: the paper's network (torchvision's DeepLabHead / ASPP on a dilated backbone at output stride 8,
  16 for MobileNetV3; logits bilinearly upsampled). Right at 512 px with an ImageNet ResNet, blind to parts of a
  few pixels at 64 px.

Backbones: ``resnet18``, ``resnet50``, ``resnet101``, ``mobilenet_v3_large`` (torchvision). Outputs, for images
(B, 3, H, W) in [-1, 1] (the model applies ImageNet normalization itself):

    seg    (B, K, H, W) class logits
    kp     (B, K, H, W) keypoint heatmaps (Gaussian targets, peak 1)
    depth  (B, 1, H, W) normalized log depth (see ``handsoff.tasks.Depth``)

ImageNet weights are never downloaded: ``backbone_weights`` takes a local torchvision classification state dict
(e.g. ``resnet50-0676ba61.pth``); its classifier keys are ignored and anything else missing is an error.
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

from handsoff.errors import UsageError
from handsoff.generator.checkpoints import CheckpointError

BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenet_v3_large")
ARCHITECTURES = ("unet", "deeplabv3")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# U-Net decoder widths at strides 16, 8, 4 and 2 (outputs at stride 1 come from the last by a pixel shuffle).
UNET_DECODER = (256, 128, 64, 32)
# Feature maps of each backbone at strides 2, 4, 8, 16, 32 (module names inside the feature network).
_PYRAMID = {"resnet": ("relu", "layer1", "layer2", "layer3", "layer4"),
            "mobilenet_v3_large": ("1", "3", "6", "12", "16")}


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


def classification_network(name: str, dilated: bool = False) -> nn.Module:
    """The torchvision classification network behind a backbone (random init); ``dilated``: DeepLabV3's output
    stride (8 for ResNets, 16 for MobileNetV3)."""
    if name not in BACKBONES:
        raise UsageError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    if name == "mobilenet_v3_large":
        return torchvision.models.mobilenet_v3_large(weights=None, dilated=dilated)
    if name == "resnet18":
        net = torchvision.models.resnet18(weights=None)
        if dilated:
            _dilate_basic_resnet(net)
        return net
    return getattr(torchvision.models, name)(weights=None,
                                            replace_stride_with_dilation=[False, dilated, dilated])


def build_backbone(name: str) -> tuple[nn.Module, nn.Module, int]:
    """DeepLabV3's backbone: (classification network, feature extractor returning {'out': map}, its channels)."""
    net = classification_network(name, dilated=True)
    if name == "mobilenet_v3_large":
        return net, IntermediateLayerGetter(net.features, {str(len(net.features) - 1): "out"}), 960
    return net, IntermediateLayerGetter(net, {"layer4": "out"}), 512 if name == "resnet18" else 2048


def build_pyramid(name: str) -> tuple[nn.Module, nn.Module, list[int]]:
    """The U-Net's backbone: (classification network, extractor returning maps at strides 2..32, their channels)."""
    net = classification_network(name)
    kind = "mobilenet_v3_large" if name == "mobilenet_v3_large" else "resnet"
    body = net.features if kind == "mobilenet_v3_large" else net
    extractor = IntermediateLayerGetter(body, {layer: f"s{2 ** (i + 1)}" for i, layer in enumerate(_PYRAMID[kind])})
    with torch.no_grad():
        channels = [f.shape[1] for f in extractor.eval()(torch.zeros(1, 3, 32, 32)).values()]
    return net, extractor.train(), channels


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


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """Upsample x2 (nearest), concatenate the skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(cin + skip, cout), conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        return self.convs(torch.cat([x, skip], 1))


class UNetDecoder(nn.Module):
    """Feature pyramid (strides 2..32) and the image -> per-pixel outputs (B, out_channels, H, W).

    Blocks of two convolutions climb from stride 32 to stride 2, each with the backbone's map of that stride as a
    skip; at stride 2 the image itself joins the skip, rearranged losslessly (each 2 x 2 pixel block becomes 12
    channels). The last convolution predicts, per stride-2 cell, the outputs of its 2 x 2 pixels, which a pixel
    shuffle puts in place (sub-pixel convolution, Shi et al. 2016): every output pixel has its own prediction,
    and no convolution runs at full resolution (those are the slowest per FLOP on CPU)."""

    def __init__(self, channels: list[int], out_channels: int, widths: tuple[int, ...] = UNET_DECODER):
        super().__init__()
        skips = [*channels[-2:0:-1], channels[0] + 12]  # strides 16, 8, 4, then 2 with the image's pixels
        ins = [channels[-1], *widths[:-1]]
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, widths))
        self.predict = nn.Conv2d(widths[-1], 4 * out_channels, 3, padding=1)
        # Start from near-zero outputs: with several tasks sharing the decoder, a random prediction layer makes the
        # first steps' keypoint and depth errors (large, from random outputs) dominate the shared gradients.
        nn.init.normal_(self.predict.weight, std=1e-3)
        nn.init.zeros_(self.predict.bias)

    def forward(self, pyramid: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        skips = [*pyramid[-2:0:-1], torch.cat([pyramid[0], F.pixel_unshuffle(image, 2)], 1)]
        x = pyramid[-1]
        for block, skip in zip(self.blocks, skips):
            x = block(x, skip)
        return F.pixel_shuffle(self.predict(x), 2)


class DenseModel(nn.Module):
    """Backbone + decoder + one head per task. ``heads``: {task name: output channels};
    ``architecture``: "unet" (full-resolution decoder) or "deeplabv3" (the paper's network)."""

    def __init__(self, backbone: str, heads: dict[str, int], backbone_weights: str | os.PathLike | None = None,
                 architecture: str = "unet"):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise UsageError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
        self.config = {"architecture": architecture, "backbone": backbone, "heads": dict(heads),
                       "backbone_init": "imagenet (local file)" if backbone_weights else "random"}
        if architecture == "unet":
            net, self.backbone, channels = build_pyramid(backbone)
            self.decoder = UNetDecoder(channels, sum(heads.values()))  # every task's outputs from one decoder
        else:
            net, self.backbone, width = build_backbone(backbone)
            self.decoder = None
            self.heads = nn.ModuleDict({name: DeepLabHead(width, c) for name, c in heads.items()})
        if backbone_weights:
            load_backbone_weights(net, backbone_weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[None, :, None, None])
        self.register_buffer("std", torch.tensor(IMAGENET_STD)[None, :, None, None])

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = ((images + 1) / 2 - self.mean) / self.std
        h, w = images.shape[-2:]
        if self.decoder is None:
            features = self.backbone(x)["out"]
            return {name: F.interpolate(head(features), size=(h, w), mode="bilinear", align_corners=False)
                    for name, head in self.heads.items()}
        # The pyramid halves the size five times: pad to a multiple of 32, crop the outputs back.
        pad_h, pad_w = -h % 32, -w % 32
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        outputs = self.decoder(list(self.backbone(x).values()), x)[..., :h, :w]
        return dict(zip(self.config["heads"], outputs.split(list(self.config["heads"].values()), 1)))
