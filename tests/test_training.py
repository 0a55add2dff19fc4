import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import DEVICES
from PIL import Image

from handsoff import load_networks
from handsoff.cli import main
from handsoff.domains.heads import write_heads_dataset
from handsoff.generator.augment import AdaptiveAugmentation, augment, sample_geometry, warp
from handsoff.generator.networks import Discriminator, Generator
from handsoff.generator.training import TrainingConfig, build_state, data_indices, read_state, train_step
from handsoff.generator.widening import widen_state_dict

TINY_RUN = ["--size", "16", "--z-dim", "16", "--w-dim", "16", "--n-mlp", "2", "--channel-base", "128",
            "--channel-max", "16", "--batch", "8", "--r1-interval", "2", "--pl-weight", "1", "--augment", "ada",
            "--augment-p", "0.3", "--tick", "16", "--snapshot", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def heads16(tmp_path_factory):
    return write_heads_dataset(tmp_path_factory.mktemp("data") / "heads16", 200, seed=11, size=16, progress=False)


def _train(data, out, images):
    assert main(["train-gan", "--data", str(data), "--out", str(out), "--images", str(images), *TINY_RUN]) == 0


def test_train_resume_matches_uninterrupted_and_samples(tmp_path, heads16):
    _train(heads16, tmp_path / "whole", 48)
    _train(heads16, tmp_path / "split", 16)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [e["images_seen"] for e in log] == [16]
    _train(heads16, tmp_path / "split", 48)  # the same command with a longer target resumes

    whole = read_state(tmp_path / "whole")
    split = read_state(tmp_path / "split")
    assert split["images_seen"] == whole["images_seen"] == 48
    for net in ("G", "D", "G_ema"):
        for key, value in whole[net].items():
            torch.testing.assert_close(split[net][key], value, rtol=1e-5, atol=1e-6, msg=f"{net}.{key}")
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [e["images_seen"] for e in log] == [16, 32, 48]
    for entry in log:
        for key in ("loss_G", "loss_D_real", "loss_D_fake"):
            assert np.isfinite(entry[key])
    assert any("r1_penalty" in e for e in log) and any("pl_penalty" in e for e in log)

    snapshot = tmp_path / "split" / "network-00000048"
    # A state committed without its snapshot folder: the same command at the target exports it, identically.
    exported = tmp_path / "exported"
    shutil.copytree(snapshot, exported)
    shutil.rmtree(snapshot)
    _train(heads16, tmp_path / "split", 48)
    assert read_state(tmp_path / "split")["images_seen"] == 48
    for net in ("generator", "discriminator"):
        a, b = (getattr(load_networks(p), net).state_dict() for p in (snapshot, exported))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{net}.{key}")
    nets = load_networks(snapshot)
    assert nets.discriminator is not None and nets.generator.img_resolution == 16
    assert (tmp_path / "split" / "samples" / "fakes-00000048.png").is_file()
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(snapshot), "--n", "4", "--out", str(grid), "--device", "cpu"]) == 0
    assert Image.open(grid).size == (2 * 18 + 2, 2 * 18 + 2)


def test_resume_refuses_a_different_model(tmp_path, heads16, capsys):
    _train(heads16, tmp_path / "run", 8)
    args = ["train-gan", "--data", str(heads16), "--out", str(tmp_path / "run"), "--images", "16", *TINY_RUN]
    args[args.index("--channel-max") + 1] = "32"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "training.json" in err and "channel_max" in err


def test_resume_may_change_precision_and_records_it(tmp_path, heads16):
    """Weights and optimizer states are float32 in every mode, so a run may continue in another precision (bf16
    is emulated, and very slow, on CPUs without AVX512-BF16); training.json then says what the run uses now."""
    args = ["train-gan", "--data", str(heads16), "--out", str(tmp_path / "run"), *TINY_RUN]
    assert main([*args, "--images", "8", "--precision", "mixed"]) == 0
    assert json.loads((tmp_path / "run" / "training.json").read_text())["precision"] == "mixed"
    assert main([*args, "--images", "16", "--precision", "fp32"]) == 0
    assert json.loads((tmp_path / "run" / "training.json").read_text())["precision"] == "fp32"
    assert read_state(tmp_path / "run")["images_seen"] == 16


def test_resume_may_lower_the_learning_rate(tmp_path, heads16, capsys):
    """A plateaued run continues at a lower rate: the optimizers keep their moments but step with the new rate
    (lazily corrected as at the start), and training.json records it."""
    args = ["train-gan", "--data", str(heads16), "--out", str(tmp_path / "run"), *TINY_RUN]
    assert main([*args, "--images", "8", "--lr", "0.002"]) == 0
    before = read_state(tmp_path / "run")
    capsys.readouterr()
    assert main([*args, "--images", "16", "--lr", "0.0005"]) == 0
    assert "resuming with lr 0.0005 (the run so far used 0.002)" in capsys.readouterr().out
    after = read_state(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "training.json").read_text())["lr"] == 0.0005
    assert after["images_seen"] == 16
    for group in after["opt_D"]["param_groups"]:  # r1 interval 2: rate x 2/3
        assert group["lr"] == pytest.approx(0.0005 * 2 / 3)
    for group in after["opt_G"]["param_groups"]:  # path-length interval 4: rate x 4/5
        assert group["lr"] == pytest.approx(0.0005 * 4 / 5)
    assert before["opt_G"]["param_groups"][0]["lr"] == pytest.approx(0.002 * 4 / 5)


def _randomized(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (biases, noise strengths and all), so that nothing is zero by initialization."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 0.1)
    return net.eval()


def test_widened_networks_compute_what_the_trained_ones_did():
    """More feature maps per resolution (channel_base 128 -> 256: 8 -> 16 channels at 16 px): the old channels
    keep their values, the new ones do not reach any old output, so images, features and logits are unchanged."""
    small = dict(resolution=16, channel_base=128, channel_max=16)
    G = _randomized(Generator(z_dim=16, w_dim=16, n_mlp=2, **small), 0)
    D = _randomized(Discriminator(**small), 1)
    torch.manual_seed(5)
    wide = dict(small, channel_base=256)
    G_wide, D_wide = Generator(z_dim=16, w_dim=16, n_mlp=2, **wide).eval(), Discriminator(**wide).eval()
    G_wide.load_state_dict(widen_state_dict(G.state_dict(), G_wide.state_dict(), "generator"))
    D_wide.load_state_dict(widen_state_dict(D.state_dict(), D_wide.state_dict(), "discriminator"))
    assert G_wide.synthesis.b16.conv1.weight.shape[:2] == (16, 16) and G.synthesis.b16.conv1.weight.shape[:2] == (8, 8)

    z = torch.randn(4, 16)
    with torch.no_grad():
        img, features = G(z, truncation_psi=0.7, return_features=True)
        img_wide, features_wide = G_wide(z, truncation_psi=0.7, return_features=True)
        torch.testing.assert_close(img_wide, img, rtol=1e-5, atol=1e-5)
        for a, b in zip(features, features_wide):
            torch.testing.assert_close(b[:, :a.shape[1]], a, rtol=1e-5, atol=1e-5)
        assert features_wide[-1].shape[1] == 16 and features_wide[-1][:, 8:].abs().sum() > 0  # new maps are live
        torch.testing.assert_close(D_wide(img), D(img), rtol=1e-5, atol=1e-5)

    # The discriminator's 4x4 epilogue (minibatch std over its channels) cannot widen, nor can anything shrink.
    D_max = Discriminator(**dict(wide, channel_max=32))
    with pytest.raises(ValueError, match="b4.*4x4 epilogue"):
        widen_state_dict(D.state_dict(), D_max.state_dict(), "discriminator")
    with pytest.raises(ValueError, match="cannot shrink"):
        widen_state_dict(G_wide.state_dict(), G.state_dict(), "generator")


def test_train_gan_init_from_widens_a_run_and_continues_it(tmp_path, heads16, capsys):
    _train(heads16, tmp_path / "run", 16)
    wide = ["train-gan", "--data", str(heads16), "--out", str(tmp_path / "wide"), *TINY_RUN]
    wide[wide.index("--channel-base") + 1] = "256"

    assert main([*wide, "--images", "16", "--init-from", str(tmp_path / "nothing")]) == 1
    assert "nothing" in capsys.readouterr().err and not (tmp_path / "wide").exists()

    # At the source's images seen nothing is trained: the export is the source's G_ema, widened.
    assert main([*wide, "--images", "16", "--init-from", str(tmp_path / "run")]) == 0
    assert "starting from" in capsys.readouterr().out
    source, widened = (load_networks(tmp_path / r / "network-00000016") for r in ("run", "wide"))
    channels = [nets.generator.synthesis.b16.conv1.weight.shape[0] for nets in (source, widened)]
    assert channels == [8, 16]
    z = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(widened.generator(z), source.generator(z), rtol=1e-5, atol=1e-5)
    state = read_state(tmp_path / "wide")
    assert state["images_seen"] == 16 and state["augment_p"] == read_state(tmp_path / "run")["augment_p"]
    # New entries of Adam's second moment start at the parameter's old mean, not zero (a first step of lr / 0.1).
    assert all(bool((s["exp_avg_sq"] > 0).all()) for s in state["opt_G"]["state"].values())

    assert main([*wide, "--images", "32", "--init-from", str(tmp_path / "run")]) == 0  # the same command resumes
    log = [json.loads(line) for line in (tmp_path / "wide" / "log.jsonl").read_text().splitlines()]
    assert [e["images_seen"] for e in log] == [32] and np.isfinite(log[0]["loss_G"])


def test_training_data_errors_name_the_file(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    Image.new("RGB", (20, 16)).save(folder / "b.png")
    assert main(["train-gan", "--data", str(folder), "--out", str(tmp_path / "run"), "--images", "8",
                 *TINY_RUN]) == 1
    err = capsys.readouterr().err
    assert "b.png" in err and "20x16" in err
    (folder / "b.png").unlink()
    Image.new("F", (16, 16)).save(folder / "b.tiff")  # float pixels have no exact 8-bit form
    assert main(["train-gan", "--data", str(folder), "--out", str(tmp_path / "run2"), "--images", "8",
                 *TINY_RUN]) == 1
    assert "b.tiff: image mode F" in capsys.readouterr().err
    assert main(["train-gan", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run3"),
                 *TINY_RUN]) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_training_moves_the_networks_and_keeps_losses_finite(device):
    config = TrainingConfig(data="", out="", resolution=16, z_dim=16, w_dim=16, n_mlp=2, channel_base=128,
                            channel_max=16, batch=8, batch_per_round=4, r1_interval=1, augment="fixed",
                            augment_p=0.5, device=device)
    state = build_state(config, torch.device(device))
    before = {k: v.clone() for k, v in state.G.state_dict().items()}
    ema_before = {k: v.clone() for k, v in state.G_ema.state_dict().items()}
    reals = (torch.rand(8, 3, 16, 16) * 2 - 1).to(device)
    stats = train_step(state, reals, config)
    assert all(np.isfinite(v) for v in stats.values()) and "r1_penalty" in stats
    assert not torch.equal(before["synthesis.b16.conv1.weight"], state.G.state_dict()["synthesis.b16.conv1.weight"])
    assert not torch.equal(ema_before["synthesis.b16.conv1.weight"],
                           state.G_ema.state_dict()["synthesis.b16.conv1.weight"])
    assert state.images_seen == 8 and state.step == 1


def test_data_order_is_a_seeded_permutation_per_epoch():
    a = data_indices(10, seed=3, start=0, count=25)
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
    np.testing.assert_array_equal(data_indices(10, 3, 7, 9), a[7:16])


def test_geometric_augmentation_moves_pixels_where_its_matrix_says():
    """A spike at pixel centre (11.5, 19.5) lands where the matrix maps that point (output -> input matrices)."""
    b, size = 6, 32
    spikes = torch.zeros(b, 1, size, size)
    spikes[:, 0, 19, 11] = 1.0
    m = sample_geometry(b, 1.0, (size, size), torch.Generator().manual_seed(5), ops=("xflip", "rotate90",
                                                                                      "translate"))
    moved = warp(spikes, m, mode="nearest")
    point = torch.tensor([11.5 * 2 / size - 1, 19.5 * 2 / size - 1, 1.0])
    target = point @ torch.linalg.inv(m).transpose(1, 2)  # where the output samples the spike
    checked = 0
    for i in range(b):
        x, y = ((target[i, :2] + 1) * size / 2).tolist()
        if 0 <= x < size and 0 <= y < size:
            assert int(moved[i, 0].argmax()) == int(y) * size + int(x)
            checked += 1
    assert checked >= 3


def test_augmentation_is_identity_at_zero_and_differentiable():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    assert augment(x, 0.0)["images"] is x
    y = augment(x, 1.0, torch.Generator().manual_seed(0))["images"]
    assert y.shape == x.shape and not torch.allclose(y, x)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_adaptive_p_follows_the_overfitting_heuristic():
    ada = AdaptiveAugmentation(p=0.0, target=0.6, speed_images=1000)
    ada.accumulate(torch.ones(100))  # D sure every real is real: r_t = 1 > 0.6
    assert ada.update(images_seen=100) == 1.0 and ada.p == pytest.approx(0.1)
    ada.accumulate(-torch.ones(100))
    ada.update(images_seen=500)
    assert ada.p == 0.0
    fixed = AdaptiveAugmentation(p=0.3, target=None)
    fixed.accumulate(torch.ones(10))
    assert fixed.update(1000) is None and fixed.p == 0.3


def test_state_is_split_safetensors_and_a_legacy_state_pt_resumes(tmp_path, heads16):
    """The resumable state is safetensors in state/ (no file over 16 MiB for the shipped run) and round-trips
    exactly, optimizer int keys and tuples included; a run of an earlier version (state.pt) resumes and ends with
    one copy of its state, in the new format."""
    from handsoff.generator.training import load_training_state, save_training_state

    _train(heads16, tmp_path / "run", 16)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "state").iterdir()) == ["networks.safetensors", "opt_D.safetensors",
                                                                 "opt_G.safetensors", "state.json"]
    state = read_state(run)
    save_training_state(state, tmp_path / "copy")
    again = load_training_state(tmp_path / "copy")
    assert again["opt_G"]["param_groups"][0]["betas"] == state["opt_G"]["param_groups"][0]["betas"]
    assert isinstance(again["opt_G"]["param_groups"][0]["betas"], tuple)
    assert sorted(again["opt_D"]["state"]) == sorted(state["opt_D"]["state"]) and 0 in again["opt_D"]["state"]
    torch.testing.assert_close(again["torch_rng"], state["torch_rng"], rtol=0, atol=0)
    assert (again["images_seen"], again["step"]) == (state["images_seen"], state["step"])
    # An earlier version's run folder: state.pt only.
    legacy = tmp_path / "legacy"
    shutil.copytree(run, legacy)
    shutil.rmtree(legacy / "state")
    torch.save(state, legacy / "state.pt")
    _train(heads16, legacy, 32)
    _train(heads16, run, 32)
    assert not (legacy / "state.pt").exists() and read_state(legacy)["images_seen"] == 32
    for key, value in read_state(run)["G_ema"].items():
        torch.testing.assert_close(read_state(legacy)["G_ema"][key], value, rtol=1e-5, atol=1e-6)


def test_auto_precision_follows_the_measurement_and_caches_it(tmp_path, monkeypatch):
    """'auto' runs bf16 on a CPU only where bf16 measured faster than float32; the measurement runs once per CPU,
    torch version and thread count and is cached; CUDA always takes reduced precision."""
    from handsoff import runtime
    from handsoff.generator.training import TrainingConfig

    measured = runtime.measure_bf16_speedup(channels=8, size=8, batch=1, repeats=1)
    assert math.isfinite(measured) and measured > 0
    calls = []
    monkeypatch.setenv("HANDSOFF_CACHE", str(tmp_path / "cache"))
    for speedup, mixed in ((0.5, False), (2.0, True)):
        monkeypatch.setattr(runtime, "measure_bf16_speedup", lambda s=speedup: calls.append(s) or s)
        (tmp_path / "cache" / "precision.json").unlink(missing_ok=True)
        config = TrainingConfig(data="unused", out="unused", resolution=16, precision="auto")
        for _ in range(2):  # measured once, then read from the cache
            g, d = config.network_kwargs(torch.device("cpu"))
            assert (g["num_fp16_res"] > 0, d["num_fp16_res"] > 0) == (mixed, mixed)
        assert runtime.reduced_precision_pays(torch.device("cuda"))
        assert TrainingConfig(data="u", out="u", precision="fp32").network_kwargs(torch.device("cpu"))[0][
            "num_fp16_res"] == 0
    assert calls == [0.5, 2.0]
    assert json.loads((tmp_path / "cache" / "precision.json").read_text())


def test_precision_measurement_does_not_read_kernel_creation_as_emulation():
    """oneDNN compiles its kernels on first use per dtype: a slow first bf16 call must not end the measurement as
    if bf16 were emulated (it cached 0.02x on a native AVX512-BF16 CPU); a bf16 that stays slow still does."""
    from handsoff import runtime

    def timings(bf16_times):
        calls = {torch.float32: iter([5.0] + [1.0] * 10), torch.bfloat16: iter(bf16_times)}
        return lambda dtype: next(calls[dtype])

    assert runtime._timed_speedup(timings([30.0, 0.5, 0.6, 0.5, 0.7]), repeats=3) == 2.0  # JIT once, then native
    assert runtime._timed_speedup(timings([30.0, 20.0]), repeats=3) == 1 / 20  # emulated: stops after one timing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim is Linux-only")
def test_release_memory_returns_freed_heap_pages_to_the_kernel():
    """With tune_allocator's thresholds freed tensors stay in the heap; release_memory hands them back (what
    `handsoff run` does between stages, so that the stages' peaks do not add up)."""
    import os

    from handsoff import runtime

    def rss_mb() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    if not runtime.tune_allocator():
        pytest.skip("not glibc: no allocator to tune")  # e.g. musl; the pipeline then has nothing to release
    tensors = [torch.ones(8 * 2**20) for _ in range(8)]  # 8 x 32 MB, in the heap under the raised thresholds
    anchor = torch.ones(16)                              # allocated after them, so the heap top stays in use
    before = rss_mb()
    del tensors
    assert rss_mb() > before - 64                       # freed, but still held by the process
    assert runtime.release_memory()
    assert rss_mb() < before - 200
    del anchor
