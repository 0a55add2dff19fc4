import json

import numpy as np
import pytest
import torch
from PIL import Image

from handsoff import save_networks
from handsoff.cli import main
from handsoff.generator import CheckpointError
from handsoff.inversion import (
    LPIPS,
    DiscriminatorFeatureDistance,
    encode,
    load_latents,
    refine_latents,
    save_latents,
    train_encoder,
)
from handsoff.inversion.optimize import learning_rate, reconstruction_losses
from handsoff.inversion.perceptual import LPIPS_CHANNELS, vgg16_features


def _targets(G, n, seed=0, psi=0.7):
    with torch.no_grad():
        ws = G.mapping(torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed)), truncation_psi=psi)
        return ws, G.synthesis(ws, force_fp32=True)


def test_optimization_recovers_a_generated_latent(tiny_generator, tiny_discriminator):
    G = tiny_generator
    ws_true, images = _targets(G, 4)
    start = G.w_avg[None, None].expand(4, G.n_latent, -1).clone()
    perceptual = DiscriminatorFeatureDistance(tiny_discriminator)
    with torch.no_grad():
        mse_start = reconstruction_losses(G, start, images, None)[0]
    out = refine_latents(G, images, start, perceptual, steps=150, lr=0.1, lambda_reg=0.0, batch=4, progress=False)
    assert (out["mse"] * 10 <= mse_start).all(), (out["mse"], mse_start)
    # The kept latent is the best one seen: its recomputed loss matches the reported one.
    with torch.no_grad():
        mse, perc, _ = reconstruction_losses(G, out["ws"], images, perceptual)
    torch.testing.assert_close(mse, out["mse"], rtol=1e-4, atol=1e-7)


def test_no_graph_outlives_its_step(tiny_generator, tiny_discriminator, monkeypatch):
    """Memory is flat over steps and batches: when a step's forward pass starts, nothing saved for the backward
    pass of an earlier one is alive (a graph kept across batches doubled the peak: 6 to 9.4 GB at 256 px)."""
    import weakref

    import handsoff.inversion.optimize as optimize

    class Saved:  # what autograd keeps for backward, tracked while alive
        def __init__(self, t):
            self.t = t

    alive: weakref.WeakSet = weakref.WeakSet()

    def pack(t):
        s = Saved(t)
        alive.add(s)
        return s

    seen = []
    real = optimize.reconstruction_losses

    def counting(*args):
        seen.append(len(alive))
        return real(*args)

    monkeypatch.setattr(optimize, "reconstruction_losses", counting)
    _, images = _targets(tiny_generator, 4)
    start = tiny_generator.w_avg[None, None].expand(4, tiny_generator.n_latent, -1).clone()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s.t):
        refine_latents(tiny_generator, images, start, DiscriminatorFeatureDistance(tiny_discriminator), steps=3,
                       batch=2, progress=False)
    assert len(seen) == 8 and seen == [0] * 8, seen  # two batches of 3 steps and a final scoring pass


def test_the_batch_follows_the_memory_budget(tiny_generator, tiny_discriminator, monkeypatch):
    """Without --batch, inversion optimizes as many images together as fit the stated peak memory: the budget over
    what the process holds, divided by what one image's step needs (autograd's saved tensors, counted)."""
    import handsoff.runtime
    from handsoff.inversion.optimize import STEP_MEMORY_FACTOR, batch_for_memory, saved_bytes_per_image

    perceptual = DiscriminatorFeatureDistance(tiny_discriminator)
    per_image = saved_bytes_per_image(tiny_generator, perceptual) * STEP_MEMORY_FACTOR / 2**30
    # Saved activations of the 64-px generator and discriminator: the feature maps, several per layer.
    feature_bytes = sum(c * r * r for c, r in zip(tiny_generator.synthesis.feature_channels,
                                                  tiny_generator.synthesis.feature_resolutions)) * 4
    assert 2 * feature_bytes < per_image * 2**30 < 100 * feature_bytes
    held = 1.5  # what the process holds already (fixed here: the real value moves by a few MB between calls)
    monkeypatch.setattr(handsoff.runtime, "resident_gib", lambda: held)
    assert batch_for_memory(tiny_generator, perceptual, 100, held + 7.5 * per_image) == 7
    assert batch_for_memory(tiny_generator, perceptual, 5, held + 7.5 * per_image) == 5  # never more than the images
    assert batch_for_memory(tiny_generator, perceptual, 100, 0.001) == 1                 # always at least one
    _, images = _targets(tiny_generator, 3)
    start = tiny_generator.w_avg[None, None].expand(3, tiny_generator.n_latent, -1).clone()
    out = refine_latents(tiny_generator, images, start, perceptual, steps=1, memory_gb=held + 2.5 * per_image,
                         progress=False)
    assert out["batch"] == 2


def test_counting_a_steps_memory_keeps_nothing_alive(tiny_generator, tiny_discriminator):
    """The planning pass that counts one image's saved activations frees them: it once kept its whole graph alive
    (saved outputs and their grad_fn holding each other through C++), 0.95 GiB for the rest of a 256-px run."""
    import gc

    from handsoff.inversion.optimize import saved_bytes_per_image

    def live_tensor_bytes():
        gc.collect()
        storages = {}
        for obj in gc.get_objects():
            # type() rather than isinstance: isinstance on every object touches deprecated module proxies (warnings)
            if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
                storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        return sum(storages.values())

    perceptual = DiscriminatorFeatureDistance(tiny_discriminator)
    saved_bytes_per_image(tiny_generator, perceptual)  # the first call fills the target-feature cache
    before = live_tensor_bytes()
    counted = saved_bytes_per_image(tiny_generator, perceptual)
    assert counted > 0 and live_tensor_bytes() - before < 0.05 * counted


def test_learning_rate_schedule():
    assert learning_rate(0, 100, 0.1) == 0
    assert learning_rate(50, 100, 0.1) == pytest.approx(0.1)
    assert learning_rate(99, 100, 0.1) < 0.01
    assert learning_rate(80, 100, 0.1) < 0.1


def test_encoder_beats_the_average_latent_after_a_few_steps(tiny_generator):
    G = tiny_generator
    encoder = train_encoder(G, None, steps=40, batch=8, lr=2e-3, iterations=2, width=8, progress=False)
    ws_true, images = _targets(G, 8, seed=99, psi=0.8)
    with torch.no_grad():
        ws = encode(encoder, G, images)
        start = G.w_avg[None, None].expand(8, G.n_latent, -1)
        mse_avg = reconstruction_losses(G, start, images, None)[0].mean()
        mse_enc = reconstruction_losses(G, ws, images, None)[0].mean()
    assert mse_enc < 0.9 * mse_avg


def _write_lpips_weights(tmp_path):
    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # real torchvision files carry the classifier too
    torch.save(vgg, tmp_path / "vgg16.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS_CHANNELS)}
    torch.save(lin, tmp_path / "lpips_vgg.pth")
    return tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth"


@pytest.mark.parametrize("kind", ["discriminator", "lpips"])
def test_perceptual_distance_is_zero_for_identical_images_and_grows_with_noise(kind, tmp_path, tiny_discriminator):
    if kind == "lpips":
        loss = LPIPS(*_write_lpips_weights(tmp_path))
    else:
        loss = DiscriminatorFeatureDistance(tiny_discriminator)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    noise = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = [loss(x, (x + s * noise).clamp(-1, 1)) for s in (0.0, 0.05, 0.3)]
    assert torch.all(d[0].abs() < 1e-6)
    assert torch.all(d[1] > 0) and torch.all(d[2] > d[1])
    # Target features are cached per target tensor; an in-place change of the target is noticed.
    y = x.clone()
    with torch.no_grad():
        assert torch.all(loss(x, y).abs() < 1e-6)
        y.add_(0.3 * noise).clamp_(-1, 1)
        torch.testing.assert_close(loss(x, y), d[2])


def test_lpips_weight_files_are_checked(tmp_path):
    vgg, lin = _write_lpips_weights(tmp_path)
    state = torch.load(lin, weights_only=True)
    state["lin2.model.1.weight"] = torch.rand(1, 3, 1, 1)
    torch.save(state, tmp_path / "bad_lin.pth")
    with pytest.raises(CheckpointError, match=r"bad_lin.pth: lin2.model.1.weight has shape"):
        LPIPS(vgg, tmp_path / "bad_lin.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad_vgg.pth")
    with pytest.raises(CheckpointError, match="bad_vgg.pth: not a torchvision vgg16"):
        LPIPS(tmp_path / "bad_vgg.pth", lin)
    with pytest.raises(CheckpointError, match="missing.pth: VGG16 weights not found"):
        LPIPS(tmp_path / "missing.pth", lin)


def _save_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"img{i:02d}.png")


def test_invert_command_writes_latents_figures_and_sheet(tmp_path, tiny_generator, tiny_discriminator, capsys):
    ckpt = save_networks(tmp_path / "g", tiny_generator, tiny_discriminator)
    _, images = _targets(tiny_generator, 3)
    _save_images(tmp_path / "imgs", images)
    enc_dir = tmp_path / "enc"
    assert main(["train-encoder", "--generator", str(ckpt), "--out", str(enc_dir), "--steps", "3", "--batch", "4",
                 "--width", "8", "--iterations", "2", "--device", "cpu"]) == 0
    out = tmp_path / "latents.safetensors"
    assert main(["invert", "--generator", str(ckpt), "--images", str(tmp_path / "imgs"), "--out", str(out),
                 "--encoder", str(enc_dir), "--steps", "30", "--device", "cpu"]) == 0
    names, ws, meta = load_latents(out)
    assert names == ["img00", "img01", "img02"] and ws.shape == (3, tiny_generator.n_latent, tiny_generator.w_dim)
    assert meta["perceptual"] == "discriminator-features" and meta["steps"] == 30
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["images"]) == set(names)
    assert report["mean"]["refined"]["mse"] < report["mean"]["average"]["mse"]
    sheet = Image.open(out.with_suffix(".png"))
    assert sheet.size == (3 * 66 + 2, 3 * 66 + 2)
    assert "refined" in capsys.readouterr().out


def test_invert_bad_inputs_are_clear_errors(tmp_path, tiny_generator, tiny_discriminator, capsys):
    ckpt = save_networks(tmp_path / "g", tiny_generator, tiny_discriminator)
    args = ["invert", "--generator", str(ckpt), "--out", str(tmp_path / "l.safetensors"), "--steps", "1",
            "--device", "cpu"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("F", (64, 64)).save(folder / "float.tiff")  # grey converts exactly (one reader for all stages)
    assert main([*args, "--images", str(folder)]) == 1
    assert "float.tiff: image mode F" in capsys.readouterr().err
    assert main([*args, "--images", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: image folder does not exist" in capsys.readouterr().err
    (folder / "float.tiff").unlink()
    Image.new("RGB", (64, 64)).save(folder / "ok.png")
    assert main([*args, "--images", str(folder), "--encoder", str(tmp_path / "no_encoder")]) == 1
    assert "no_encoder/config.json: missing" in capsys.readouterr().err
    assert main([*args, "--images", str(folder), "--perceptual", "lpips"]) == 1
    assert "LPIPS needs --lpips-vgg" in capsys.readouterr().err


def test_latents_round_trip_and_bad_file(tmp_path):
    ws = torch.randn(2, 4, 8)
    path = save_latents(tmp_path / "l.safetensors", ["b", "a"], ws, {"generator": "x"})
    names, loaded, meta = load_latents(path)
    assert names == ["a", "b"] and torch.equal(loaded[0], ws[1]) and meta == {"generator": "x"}
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors: not a latents file"):
        load_latents(tmp_path / "bad.safetensors")
    np.testing.assert_equal(len(names), 2)
