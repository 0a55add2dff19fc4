"""The validated configuration of a whole HandsOff run (``handsoff run CONFIG``).

One YAML (or JSON) file names the generator, the labeled images and the settings of every stage; unknown keys
and out-of-range values are errors that name the file and the field. Paths inside the file are relative to the
file's folder. The smallest useful file::

    out: runs/my-cars
    generator: checkpoints/stylegan2-car-config-f.pkl   # NVIDIA .pkl, rosinality .pt or a handsoff folder
    labeled: data/cars-16          # standard layout (see `handsoff import-data`), e.g. 16 images
    validation: data/cars-val      # labeled real images for checkpoint selection (never the test set)
    test: data/cars-test           # labeled real images the networks are scored on
    tasks: [seg]

Every other key has the default of the matching ``handsoff`` command (``handsoff run --print-defaults`` prints
them all).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from handsoff.data.layout import DatasetError
from handsoff.errors import MissingInputError
from handsoff.label_generator.model import LABEL_PRECISIONS
from handsoff.tasks import DEFAULT_TASKS, KEYPOINT_SIGMA, TASK_NAMES, TASKS, pixel_class_task

TaskName = Literal[TASK_NAMES]  # the registered tasks (handsoff.tasks.TASKS)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InversionSettings(Section):
    """Stage 1 (`handsoff invert`): encoder (optional) then W+ optimization."""

    encoder: Path | None = None
    steps: int = Field(500, ge=0)
    lr: float = Field(0.1, gt=0)
    perceptual: Literal["discriminator", "lpips", "none"] = "discriminator"
    lpips_vgg: Path | None = None
    lpips_lin: Path | None = None
    lambda_perceptual: float = Field(10.0, ge=0)
    lambda_mse: float = Field(1.0, ge=0)
    lambda_reg: float = Field(1.0, ge=0)
    batch: int | None = Field(None, ge=1)  # None: the largest that fits memory_gb
    memory_gb: float | None = Field(None, gt=0)  # None: a third of the machine's memory, at most half the free


class LabelGeneratorSettings(Section):
    """Stage 2 (`handsoff fit`): the MLP ensemble (HandsOff: 10 members, widths 256 / 32, Adam 1e-3). ``mirror``:
    invert and fit on every labeled image and its left-right mirror (``write_mirrored_dataset``; the labeled set
    alone is HandsOff's protocol). Only for domains whose dataset card names its left/right classes and
    keypoints."""

    label_size: int | None = Field(None, ge=4)
    members: int = Field(10, ge=1)
    hidden: int = Field(256, ge=1)
    hidden2: int = Field(32, ge=1)
    max_steps: int = Field(3000, ge=1)
    min_steps: int = Field(300, ge=0)
    patience: int = Field(200, ge=1)
    images_per_step: int = Field(4, ge=1)
    pixels: int = Field(1024, ge=1)
    lr: float = Field(1e-3, gt=0)
    keypoint_sigma: float = Field(KEYPOINT_SIGMA, gt=0)
    mirror: bool = False


class GenerationSettings(Section):
    """Stage 3 (`handsoff generate`)."""

    n: int = Field(10000, ge=1)
    truncation: float = Field(0.7, gt=0)
    filter_top: float = Field(0.1, ge=0, lt=1)
    filter_by: Literal[("combined", *TASK_NAMES)] = "combined"
    batch: int = Field(16, ge=1)
    format: Literal["folder", "webdataset"] = "folder"
    keep_filtered: bool = False
    min_class_fraction: dict[str, float] = Field(default_factory=dict, max_length=1)
    label_precision: Literal[LABEL_PRECISIONS] = "auto"  # label maps' arithmetic (generate --label-precision)
    void_top: float = Field(0.0, ge=0, lt=1)  # per sample, this fraction of dense-label pixels left unlabeled

    @field_validator("min_class_fraction")
    @classmethod
    def _fractions(cls, quotas: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in quotas.items() if not 0 < v <= 1}
        if bad:
            raise ValueError(f"fractions must be in (0, 1], got {bad}")
        return quotas


class DownstreamSettings(Section):
    """Stage 4 (`handsoff train-downstream`): the same schedule for HandsOff and every baseline. ``architecture``:
    unet (predicts at full resolution: the default, right for low resolutions and CPU) or deeplabv3 (the
    paper's network at 512 px). ``labeled_share``: the share of HandsOff's training images drawn from the labeled
    real images beside the generated ones (0: generated only, the paper's protocol)."""

    architecture: Literal["unet", "deeplabv3"] = "unet"
    backbone: Literal["resnet18", "resnet50", "resnet101", "mobilenet_v3_large"] = "resnet18"
    backbone_weights: Path | None = None
    epochs: int = Field(20, ge=1)
    batch: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["onecycle", "constant"] = "onecycle"
    patience: int = Field(5, ge=1)
    images_per_epoch: int | None = Field(None, ge=1)
    size: int | None = Field(None, ge=16)
    labeled_share: float = Field(0.0, ge=0, lt=1)


class PipelineConfig(Section):
    """Everything a run needs. ``transfer``: also train the downstream network on the labeled images alone (the
    Transfer baseline). ``oracle``: optionally a large labeled real set to train the same network on (the upper
    bound). ``curve``: numbers of generated images to retrain HandsOff's network on, for the report's plot of the
    metric against dataset size (each costs one more downstream training)."""

    out: Path
    generator: str
    labeled: Path
    validation: Path | None = None
    test: Path | None = None
    oracle: Path | None = None
    tasks: list[TaskName] = Field(default_factory=lambda: list(DEFAULT_TASKS), min_length=1)
    seed: int = Field(0, ge=0)
    device: str = "auto"
    transfer: bool = True
    curve: list[int] = Field(default_factory=list)
    inversion: InversionSettings = Field(default_factory=InversionSettings)
    label_generator: LabelGeneratorSettings = Field(default_factory=LabelGeneratorSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    downstream: DownstreamSettings = Field(default_factory=DownstreamSettings)

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks repeat: {tasks}")
        return tasks

    @field_validator("curve")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if any(n < 1 for n in sizes):
            raise ValueError(f"curve sizes must be positive, got {sizes}")
        return sorted(set(sizes))

    @model_validator(mode="after")
    def _quota_needs_seg(self) -> PipelineConfig:
        if self.generation.min_class_fraction and pixel_class_task([TASKS[t] for t in self.tasks]) is None:
            raise ValueError("generation.min_class_fraction needs a task with classes per pixel (seg)")
        return self

    @model_validator(mode="after")
    def _filter_by_a_task(self) -> PipelineConfig:
        if self.generation.filter_by not in ("combined", *self.tasks):
            raise ValueError(f"generation.filter_by {self.generation.filter_by!r} is not one of the run's tasks "
                             f"({', '.join(self.tasks)}) or combined")
        return self

    @model_validator(mode="after")
    def _share_needs_validation(self) -> PipelineConfig:
        if self.downstream.labeled_share > 0 and self.validation is None:
            raise ValueError("downstream.labeled_share > 0 trains HandsOff's network on the labeled images, so it "
                             "needs a validation set of its own to select the network on")
        return self

    def to_json(self) -> dict:
        return json.loads(self.model_dump_json())


def _resolve(config: PipelineConfig, base: Path) -> PipelineConfig:
    """Paths in a config file are relative to the file's folder (a shipped generator name stays a name)."""
    def fix(p):
        return p if p is None or Path(p).is_absolute() else base / p

    updates = {k: fix(getattr(config, k)) for k in ("out", "labeled", "validation", "test", "oracle")}
    gen = config.generator
    if any(sep in gen for sep in ("/", os.sep)) or Path(gen).suffix or (base / gen).exists():
        updates["generator"] = str(fix(Path(gen)))
    inv = config.inversion.model_copy(update={k: fix(getattr(config.inversion, k))
                                              for k in ("encoder", "lpips_vgg", "lpips_lin")})
    ds = config.downstream.model_copy(update={"backbone_weights": fix(config.downstream.backbone_weights)})
    return config.model_copy(update={**updates, "inversion": inv, "downstream": ds})


def load_config(path: str | os.PathLike) -> PipelineConfig:
    """Read and validate a YAML or JSON run config; errors name the file and each offending field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping of settings at the top level")
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise DatasetError(f"{path}: invalid config ({problems})") from None
    return _resolve(config, path.parent.resolve())
