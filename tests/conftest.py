import pytest
import torch
from checkpoint_writers import randomize

from handsoff.generator import Discriminator, Generator, StyleGAN3Generator

# Device-agnostic tests run on each of these: CUDA where present, reported as skipped (never failed) without it.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA device"))]

# Tiny but complete: 64 px, every block present, narrow widths so each test runs in well under a second.
TINY = dict(resolution=64, z_dim=32, w_dim=32, n_mlp=2, channel_base=1024, channel_max=32)


def networks_16px() -> tuple[Generator, Discriminator]:
    """A 16 px generator (w_avg estimated) and discriminator, random but fixed: the whole pipeline in seconds."""
    torch.manual_seed(0)
    G = randomize(Generator(resolution=16, z_dim=16, w_dim=16, n_mlp=1, channel_base=256, channel_max=16),
                  seed=1).eval()
    G.mapping.update_w_avg(seed=0)
    return G, randomize(Discriminator(resolution=16, channel_base=256, channel_max=16), seed=2).eval()


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Per-machine caches (the bf16 measurement) go to a folder of this test session, not the user's home."""
    import os

    saved = os.environ.get("HANDSOFF_CACHE")
    os.environ["HANDSOFF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        os.environ.pop("HANDSOFF_CACHE", None)
    else:
        os.environ["HANDSOFF_CACHE"] = saved


# StyleGAN3 configs 't' and 'r' at 16 px: four layers (two critically sampled), narrow widths.
STYLEGAN3_16PX = {
    "t": dict(resolution=16, z_dim=16, w_dim=16, n_mlp=1, channel_base=256, channel_max=16, num_layers=4),
    "r": dict(resolution=16, z_dim=16, w_dim=16, n_mlp=1, channel_base=512, channel_max=32, num_layers=4,
              conv_kernel=1, use_radial_filters=True),
}


def stylegan3_16px(config: str = "t", **changes) -> StyleGAN3Generator:
    """A random but fixed StyleGAN3 generator (w_avg estimated, input rotated) that runs the pipeline in seconds.
    ``changes`` alter the config (``resolution=32`` gives feature maps at two sampling rates)."""
    torch.manual_seed(0)
    G = randomize(StyleGAN3Generator(**{**STYLEGAN3_16PX[config], **changes}), seed=1).eval()
    with torch.no_grad():  # a user transform, so that its path is exercised too
        angle = torch.tensor(0.3)
        G.synthesis.input.transform.copy_(torch.tensor([[angle.cos(), -angle.sin(), 0.05],
                                                         [angle.sin(), angle.cos(), -0.1], [0.0, 0.0, 1.0]]))
    G.mapping.update_w_avg(seed=0)
    return G


@pytest.fixture
def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return randomize(Generator(**TINY), seed=1).eval()


@pytest.fixture
def tiny_discriminator() -> Discriminator:
    torch.manual_seed(2)
    return randomize(Discriminator(resolution=64, channel_base=1024, channel_max=32), seed=3).eval()


@pytest.fixture
def lock_in_other_process():
    """``hold(folder)`` takes handsoff's output lock on ``folder`` in a separate Python process (as a second writer
    would) and returns once it is held; ``release()`` ends that process. Ended at teardown in any case."""
    import subprocess
    import sys

    procs = []
    script = ("import sys\nfrom handsoff.fileio import output_lock\nwith output_lock(sys.argv[1]):\n"
              "    print('held', flush=True)\n    sys.stdin.read()\n")

    class Holder:
        def hold(self, folder):
            proc = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout.readline().strip() == "held"

        def release(self):
            for proc in procs:
                proc.stdin.close()
                proc.wait(timeout=30)
            procs.clear()

    holder = Holder()
    yield holder
    holder.release()
