import pytest
import torch
from checkpoint_writers import randomize

from handsoff.generator import Discriminator, Generator

# Tiny but complete: 64 px, every block present, narrow widths so each test runs in well under a second.
TINY = dict(resolution=64, z_dim=32, w_dim=32, n_mlp=2, channel_base=1024, channel_max=32)


@pytest.fixture
def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return randomize(Generator(**TINY), seed=1).eval()


@pytest.fixture
def tiny_discriminator() -> Discriminator:
    torch.manual_seed(2)
    return randomize(Discriminator(resolution=64, channel_base=1024, channel_max=32), seed=3).eval()
