"""Stage 0: the generator (StyleGAN2 or StyleGAN3; the trunk) that every later stage runs, and its discriminator."""

from handsoff.generator.checkpoints import (
    CheckpointError,
    Networks,
    load_discriminator,
    load_generator,
    load_networks,
    save_networks,
    shipped_names,
)
from handsoff.generator.networks import Discriminator, Generator
from handsoff.generator.sampling import latents_for_seeds
from handsoff.generator.stylegan3 import StyleGAN3Generator
from handsoff.generator.trunk import Trunk

__all__ = [
    "CheckpointError", "Discriminator", "Generator", "Networks", "latents_for_seeds", "load_discriminator",
    "load_generator", "load_networks", "save_networks", "shipped_names", "StyleGAN3Generator", "Trunk",
]
