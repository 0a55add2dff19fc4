"""Tasks: segmentation, keypoints, depth. Each is one module with one class implementing ``Task`` (base.py);
``TASKS`` registers them by name. Adding a task: write its module, add it here (see the README)."""

from __future__ import annotations

from handsoff.errors import UsageError
from handsoff.tasks.base import Task, TaskBase, entropy, top_fraction_mean
from handsoff.tasks.depth import Depth
from handsoff.tasks.keypoints import KEYPOINT_SIGMA, Keypoints, gaussian_heat, heatmaps
from handsoff.tasks.segmentation import Segmentation, soft_dice_loss

TASKS: dict[str, type] = {cls.name: cls for cls in (Segmentation, Keypoints, Depth)}
ALIASES = {alias: cls.name for cls in TASKS.values() for alias in (cls.name, *cls.aliases)}
TASK_NAMES = tuple(TASKS)
DEFAULT_TASKS = (Segmentation.name,)  # what --tasks and a run config mean when they name none


def task_from_config(config: dict) -> Task:
    """Rebuild a task from ``task.config()`` (its name, settings and fitted values)."""
    kwargs = {k: v for k, v in config.items() if k != "name"}
    return TASKS[config["name"]](**kwargs)


def tasks_from_card(names: list[str], card, **settings) -> list[Task]:
    """Task objects for ``names`` labeled as ``card`` declares (classes, keypoint names); UsageError where the
    card lacks a task's labels. ``settings`` go to each task's ``from_card`` (min_class_pixels, keypoint_sigma)."""
    return [TASKS[name].from_card(card, **settings) for name in names]


def card_tasks(card) -> list[type]:
    """The task classes whose labels ``card`` declares, in registry order (what a dataset's files hold)."""
    return [cls for cls in TASKS.values() if getattr(card, cls.card_field) is not None]


def sample_tasks(sample: dict) -> list[type]:
    """The task classes whose labels a sample dict holds (by their ``sample_key``), in registry order."""
    return [cls for cls in TASKS.values() if cls.sample_key in sample]


def pixel_class_task(tasks):
    """The task (object or class) among ``tasks`` whose labels are a class per pixel (segmentation), or None:
    class quotas, class statistics and class tables are about its classes."""
    return next((t for t in tasks if t.pixel_classes), None)


def parse_task_names(text: str) -> list[str]:
    """'seg,kp,depth' (or full names) -> canonical names, in that order, no duplicates."""
    names = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part not in ALIASES:
            raise UsageError(f"unknown task {part!r}; choose from {', '.join(TASK_NAMES)}")
        if ALIASES[part] not in names:
            names.append(ALIASES[part])
    if not names:
        raise UsageError(f"no task given; choose from {', '.join(TASK_NAMES)}")
    return names


__all__ = ["ALIASES", "DEFAULT_TASKS", "Depth", "KEYPOINT_SIGMA", "Keypoints", "Segmentation", "TASKS", "TASK_NAMES",
           "Task", "TaskBase", "card_tasks", "entropy", "gaussian_heat", "heatmaps", "parse_task_names",
           "pixel_class_task", "sample_tasks", "soft_dice_loss", "task_from_config", "tasks_from_card",
           "top_fraction_mean"]
