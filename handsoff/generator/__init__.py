"""Stage 0: the StyleGAN2 generator (and discriminator) that every later stage runs."""

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

__all__ = [
    "CheckpointError", "Discriminator", "Generator", "Networks", "latents_for_seeds", "load_discriminator",
    "load_generator", "load_networks", "save_networks", "shipped_names",
]
