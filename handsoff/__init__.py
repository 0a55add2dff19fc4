"""handsoff: a labeled dataset from a pretrained GAN and a handful of labeled real images (HandsOff, CVPR 2023).

Pipeline stages, one subpackage each: ``generator`` (StyleGAN2 and its checkpoints), then inversion, features,
label generator, generation, downstream evaluation and metrics as they land.
"""

from handsoff.generator import (
    CheckpointError,
    Discriminator,
    Generator,
    latents_for_seeds,
    load_discriminator,
    load_generator,
    load_networks,
    save_networks,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Discriminator", "Generator", "latents_for_seeds", "load_discriminator", "load_generator",
    "load_networks", "save_networks", "__version__",
]
