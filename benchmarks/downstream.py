"""Downstream training speed: the full-resolution U-Net judge vs the paper's DeepLabV3, side by side in one run.

    python benchmarks/downstream.py                          # 64 px, resnet18, batches 8 and 32
    python benchmarks/downstream.py --size 128 --backbone resnet50 --batches 8 --steps 6

One training step = forward, seg + kp + depth losses (the trainer's own ``task_losses``), backward and a fused
Adam step, on random images and labels of the heads domain's shape (12 classes, 12 keypoints, depth). Prints
images/s per architecture and batch size and the U-Net / DeepLabV3 ratio measured in the same process, and the
output resolution of each (what the network can resolve). Uses the threads torch is given (OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import time

import torch

from handsoff.downstream.model import DenseModel
from handsoff.downstream.train import autocast, autocast_dtype, task_losses
from handsoff.runtime import tune_allocator
from handsoff.tasks import Depth, Keypoints, Segmentation


def images_per_second(architecture: str, backbone: str, size: int, batch: int, steps: int,
                      device: str | torch.device = "cpu") -> float:
    """Training images/s of one network on ``device`` (mixed precision on CUDA, as the trainer runs)."""
    device = torch.device(device)
    torch.manual_seed(0)
    depth = Depth()
    depth.fit_normalization([torch.rand(size, size).numpy() * 10 + 1])
    tasks = [Segmentation([f"c{i}" for i in range(12)]), Keypoints([f"k{i}" for i in range(12)]), depth]
    model = DenseModel(backbone, {t.name: t.out_channels for t in tasks}, architecture=architecture).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    batch_data = {"image": torch.rand(batch, 3, size, size) * 2 - 1,
                  "mask": torch.randint(0, 12, (batch, size, size)),
                  "keypoints": torch.cat([torch.rand(batch, 12, 2) * size, torch.full((batch, 12, 1), 2.0)], -1),
                  "depth": torch.rand(batch, 1, size, size) * 10 + 1}
    batch_data = {k: v.to(device) for k, v in batch_data.items()}
    dtype = autocast_dtype(device)
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with autocast(device, dtype):
            outputs = model(batch_data["image"])
        loss = sum(task_losses({k: v.float() for k, v in outputs.items()}, batch_data, tasks).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    tune_allocator()
    print(f"{args.backbone} at {args.size} px, {torch.get_num_threads()} thread(s); logits at {args.size} px "
          f"(unet) vs {args.size // 8} px upsampled (deeplabv3, output stride 8)")
    for batch in (int(b) for b in args.batches.split(",")):
        speeds = {arch: images_per_second(arch, args.backbone, args.size, batch, args.steps)
                  for arch in ("unet", "deeplabv3")}
        print(f"batch {batch:3d}: unet {speeds['unet']:6.1f} img/s, deeplabv3 {speeds['deeplabv3']:6.1f} img/s, "
              f"unet / deeplabv3 {speeds['unet'] / speeds['deeplabv3']:.2f}x")


if __name__ == "__main__":
    main()
