"""handsoff: a labeled dataset from a pretrained GAN and a handful of labeled real images (HandsOff, CVPR 2023).

Pipeline stages, one subpackage each: ``generator`` (StyleGAN2, its checkpoints and training), ``inversion``
(encoder + latent optimization), ``label_generator`` (hypercolumn features and the MLP ensemble), ``generation``
(datasets at scale), ``downstream`` (the judging network), ``metrics``, and ``data`` / ``domains`` (layouts,
importers, the embedded heads domain). ``pipeline`` runs every stage from one config (and the heads benchmark
and demo); ``report`` writes a run's HTML report.
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
    "CheckpointError",
    "Discriminator",
    "Generator",
    "__version__",
    "latents_for_seeds",
    "load_discriminator",
    "load_generator",
    "load_networks",
    "save_networks",
]
