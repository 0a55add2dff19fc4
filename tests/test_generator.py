import pytest
import stylegan2_reference as ref
import torch
from conftest import DEVICES, TINY

from handsoff.generator import Generator, latents_for_seeds
from handsoff.generator.ops import modulated_conv2d


def test_modulated_conv_forms_agree():
    torch.manual_seed(0)
    x, w, s = torch.randn(3, 8, 6, 6), torch.randn(5, 8, 3, 3), torch.randn(3, 8)
    for up in (False, True):
        fast = modulated_conv2d(x, w, s, up=up)
        fused = modulated_conv2d(x, w, s, up=up, fused=True)
        assert fast.shape == (3, 5, 12 if up else 6, 12 if up else 6)
        assert torch.allclose(fast, fused, atol=1e-5)


@pytest.mark.parametrize("path", ["z", "w", "w+"])
def test_fp32_matches_weight_modulation_reference(tiny_generator, path):
    G = tiny_generator
    torch.manual_seed(1)
    z = torch.randn(4, G.z_dim)
    with torch.no_grad():
        if path == "z":
            ours, expected = G(z, truncation_psi=0.7), ref.synthesis(G, ref.mapping(G, z, 0.7))
        elif path == "w":
            w = G.mapping(z, broadcast=False)
            ours, expected = G.synthesis(w), ref.synthesis(G, w[:, None].repeat(1, G.n_latent, 1))
        else:
            ws = torch.randn(4, G.n_latent, G.w_dim)
            ours, expected = G.synthesis(ws), ref.synthesis(G, ws)
    assert ours.shape == (4, 3, 64, 64) and ours.dtype == torch.float32
    assert expected.abs().mean() > 0.1  # a meaningful image, not all zeros
    assert (ours - expected).abs().max() <= 1e-4
    G.synthesis.fused_modconv = True
    with torch.no_grad():
        fused = G.synthesis(ref.mapping(G, z, 0.7) if path == "z" else
                            (G.mapping(z) if path == "w" else ws))
    assert (fused - expected).abs().max() <= 1e-4


def test_truncation_and_mapping_shapes(tiny_generator):
    G = tiny_generator
    z = torch.randn(3, G.z_dim)
    ws = G.mapping(z, truncation_psi=0.0)
    assert ws.shape == (3, G.n_latent, G.w_dim) == (3, 10, 32)
    assert torch.allclose(ws, G.w_avg.expand_as(ws))
    cut = G.mapping(z, truncation_psi=0.5, truncation_cutoff=4)
    full = G.mapping(z)
    assert torch.allclose(cut[:, 4:], full[:, 4:]) and not torch.allclose(cut[:, :4], full[:, :4])


def test_noise_modes(tiny_generator):
    G = tiny_generator
    ws = G.mapping(torch.randn(2, G.z_dim))
    with torch.no_grad():
        a, b = G.synthesis(ws), G.synthesis(ws)
        assert torch.equal(a, b)  # const noise: deterministic
        torch.manual_seed(0)
        r1 = G.synthesis(ws, noise_mode="random")
        r2 = G.synthesis(ws, noise_mode="random")
        assert not torch.allclose(r1, r2)
        assert not torch.allclose(G.synthesis(ws, noise_mode="none"), a)
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, noise_mode="fixed")


def test_bad_latent_shapes_are_refused(tiny_generator):
    with pytest.raises(ValueError, match=r"ws must have shape \(batch, 10, 32\)"):
        tiny_generator.synthesis(torch.randn(2, 9, 32))
    with pytest.raises(ValueError, match=r"z must have shape \(batch, 32\)"):
        tiny_generator.mapping(torch.randn(2, 31))


def test_features_count_and_shapes(tiny_generator):
    G = tiny_generator
    with torch.no_grad():
        img, feats = G.synthesis(G.mapping(torch.randn(2, G.z_dim)), return_features=True)
    assert len(feats) == 2 * 6 - 2 == len(G.synthesis.feature_channels)
    expected = [(2, c, r, r) for c, r in zip(G.synthesis.feature_channels, G.synthesis.feature_resolutions)]
    assert [tuple(f.shape) for f in feats] == expected
    assert [f.shape[-1] for f in feats] == [4, 4, 8, 8, 16, 16, 32, 32, 64, 64]
    assert torch.equal(feats[0][0], G.synthesis.b4.const)  # the constant input comes first


def test_ffhq_config_f_feature_layout():
    with torch.device("meta"):
        G = Generator(resolution=1024, z_dim=512, w_dim=512, n_mlp=8, channel_base=32768, channel_max=512)
    assert G.n_latent == 18
    assert sum(G.synthesis.feature_channels) == 6080
    assert len(G.synthesis.feature_channels) == 18


@pytest.mark.parametrize("resolution", [16, 128])
def test_other_resolutions(resolution):
    G = Generator(**{**TINY, "resolution": resolution}).eval()
    with torch.no_grad():
        assert G(torch.randn(2, G.z_dim)).shape == (2, 3, resolution, resolution)
    with pytest.raises(ValueError, match="power of two in 16..1024"):
        Generator(**{**TINY, "resolution": 48})


def test_reduced_precision_blocks(tiny_generator):
    G = Generator(**{**TINY, "num_fp16_res": 4})
    G.load_state_dict(tiny_generator.state_dict())
    ws = G.mapping(torch.randn(2, G.z_dim))
    with torch.no_grad():
        low, feats = G.synthesis(ws, return_features=True)
        exact = G.synthesis(ws, force_fp32=True)
    assert [f.dtype for f in feats][:2] == [torch.float32] * 2  # 4x4 stays fp32, as NVIDIA's
    assert feats[-1].dtype == torch.bfloat16 and low.dtype == torch.float32
    assert torch.allclose(exact, tiny_generator.synthesis(ws), atol=1e-5)
    err = (low - exact).abs()
    assert 0 < err.mean() < 0.02 and err.max() < 0.25


def test_conv_clamp_limits_activations(tiny_generator):
    G = Generator(**{**TINY, "conv_clamp": 0.05})
    G.load_state_dict(tiny_generator.state_dict())
    with torch.no_grad():
        _, feats = G.synthesis(G.mapping(torch.randn(2, G.z_dim)), return_features=True)
    assert max(f.abs().max().item() for f in feats[1:]) <= 0.05 + 1e-6


def test_w_avg_estimate_is_deterministic(tiny_generator):
    a = tiny_generator.mapping.update_w_avg(n=500, seed=3).clone()
    b = tiny_generator.mapping.update_w_avg(n=500, seed=3).clone()
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_latents_depend_only_on_seed_and_index():
    all_z = latents_for_seeds(7, range(6), 16)
    assert all_z.shape == (6, 16) and all_z.dtype == torch.float32
    assert torch.equal(latents_for_seeds(7, [3, 4], 16), all_z[3:5])
    assert not torch.equal(latents_for_seeds(8, [3], 16), all_z[3:4])


def test_discriminator_forward_and_features(tiny_discriminator, tiny_generator):
    with torch.no_grad():
        img = tiny_generator(torch.randn(4, tiny_generator.z_dim))
        logits, feats = tiny_discriminator(img, return_features=True)
    assert logits.shape == (4, 1)
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 32, 32), (32, 16, 16), (32, 8, 8), (32, 4, 4)]
    with pytest.raises(ValueError, match="divisible"):
        tiny_discriminator(torch.randn(6, 3, 64, 64))


@pytest.mark.parametrize("device", DEVICES)
def test_the_generator_runs_on_every_device(tiny_generator, device):
    """The same images on the device as on CPU (CUDA convolutions may use TF32: a few 1e-3), and reduced precision
    there (fp16 with clamping on CUDA, bf16 on CPU) close to float32."""
    z = torch.randn(2, tiny_generator.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_generator(z)
        moved = Generator(**TINY).to(device).eval()
        moved.load_state_dict(tiny_generator.state_dict())
        assert (moved(z.to(device)).cpu() - expected).abs().max() < 5e-3
        low = Generator(**{**TINY, "num_fp16_res": 2, "conv_clamp": 256.0}).to(device).eval()
        low.load_state_dict(tiny_generator.state_dict())
        assert (low(z.to(device)).float().cpu() - expected).abs().mean() < 0.02
