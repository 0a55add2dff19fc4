import numpy as np
import pytest
import torch

from handsoff.domains import heads
from handsoff.metrics.frechet import frechet_distance
from handsoff.metrics.gan_quality import class_statistics, evaluate_generator, format_report, render_real
from handsoff.metrics.probe import load_probe, save_probe, train_probe


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    # Shifted mean only: d^2 = |delta|^2.
    assert frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, rel=1e-6)
    # Scaled covariance, same mean: d^2 = sum (sigma_a - sigma_b)^2 per independent dimension.
    b = rng.standard_normal((20000, 3)) * 3
    assert frechet_distance(a, b) == pytest.approx(3 * (3 - 1) ** 2, rel=0.05)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(a, b[:, :2])


def test_class_statistics_by_hand():
    masks = torch.zeros(2, 10, 10, dtype=torch.long)
    masks[0, :5] = 1       # image 0: half class 1
    masks[1, 0, 0] = 2     # image 1: one pixel of class 2 (1% -> present)
    stats = class_statistics(masks, 3)
    np.testing.assert_allclose(stats["area"], [(0.5 + 0.99) / 2, 0.25, 0.005])
    np.testing.assert_allclose(stats["presence"], [1.0, 0.5, 0.5])


@pytest.fixture(scope="module")
def small_probe():
    images, masks, factors = render_real(heads.SPLIT_SEEDS["oracle"], 0, 96, size=16, progress=False)
    targets = heads.probe_targets(factors, masks.numpy())
    probe = train_probe(images, masks, targets, len(heads.CLASSES), epochs=12, batch=16, lr=5e-3, width=8,
                        progress=False)
    return probe, images, masks


def test_probe_learns_and_round_trips(tmp_path, small_probe):
    probe, images, masks = small_probe
    pixel_acc = (probe.segment(images) == masks).float().mean()
    background_share = (masks == 0).float().mean()
    assert pixel_acc > background_share  # better than predicting the majority class everywhere
    loaded = load_probe(save_probe(probe, tmp_path / "probe"))
    np.testing.assert_allclose(loaded.features(images[:8]), probe.features(images[:8]), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_probe(tmp_path)


def test_evaluate_generator_separates_real_from_noise(small_probe):
    probe, images, _ = small_probe

    class NoiseGenerator(torch.nn.Module):  # a 'generator' whose images are not heads at all
        z_dim, img_resolution = 4, 16
        w_avg = torch.zeros(4)

        def forward(self, z, truncation_psi=1.0):
            g = torch.Generator().manual_seed(int(z[0, 0].abs() * 1e6))
            return torch.rand(len(z), 3, 16, 16, generator=g) * 2 - 1

    a, b = images[:48], images[48:]
    result = evaluate_generator(NoiseGenerator(), probe, n=48, reals=(a, b), progress=False)
    assert result["fpd"] > result["fpd_real_floor"] > 0 and result["fpd_ratio"] > 1
    assert set(result["classes"]) == set(heads.CLASSES)
    assert "FPD generated vs real" in format_report(result)
