import json
import math

import numpy as np
import pytest
import torch
from conftest import DEVICES, stylegan3_16px

from handsoff.errors import OutputError
from handsoff.label_generator import (
    Depth,
    Keypoints,
    LabelGenerator,
    Segmentation,
    fit_label_generator,
    load_label_generator,
    parse_task_names,
    save_label_generator,
)
from handsoff.label_generator.features import (
    first_layer_at,
    first_layer_dense,
    materialized_hypercolumns,
    pixel_grid,
)


def _latents(G, n, seed=0):
    with torch.no_grad():
        return G.mapping(torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed)), truncation_psi=0.7)


@pytest.mark.parametrize("label_size", [16, 64, 96])
@pytest.mark.parametrize("trunk", ["stylegan2", "stylegan3"])
def test_factorized_first_layer_equals_materialized_hypercolumns(request, trunk, label_size):
    # StyleGAN3 at 32 px: feature maps at sampling rates 16 and 32, cropped from grids with margins.
    tiny_generator = request.getfixturevalue("tiny_generator") if trunk == "stylegan2" else stylegan3_16px(
        "t", resolution=32)
    torch.manual_seed(0)
    model = LabelGenerator(tiny_generator, [Segmentation(["a", "b", "c"])], label_size, members=3, hidden=16,
                           hidden2=8).eval()
    _, feats = model.features(_latents(tiny_generator, 2))
    factorized = model.dense_outputs(feats)                                  # (B, M, O, L, L)
    chunked = model.dense_outputs(feats, memory_gb=1e-9, band=5)            # one member, 5-row bands
    hyper = materialized_hypercolumns(feats, label_size)                     # (B, C, L, L)
    rows = hyper.permute(0, 2, 3, 1).reshape(-1, hyper.shape[1])
    with torch.no_grad():
        reference = model.ensemble(rows).reshape(2, label_size, label_size, 3, 3).permute(0, 3, 4, 1, 2)
    torch.testing.assert_close(factorized, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-5)
    # The first layer alone, in odd-sized bands, against the materialized one.
    e = model.ensemble
    # Blocks of label pixels per matrix product: uneven (the last one shorter), even, one per row.
    for block in (5, 8, label_size):
        dense = first_layer_dense(feats, model.groups, e.weight1, e.bias1, label_size, band=7, block=block)
        torch.testing.assert_close(dense.reshape(-1, dense.shape[-1]), rows @ e.weight1.t() + e.bias1,
                                   rtol=1e-4, atol=1e-5)
    no_bias = first_layer_dense(feats, model.groups, e.weight1, None, label_size, band=label_size)
    torch.testing.assert_close(no_bias.reshape(-1, dense.shape[-1]), rows @ e.weight1.t(), rtol=1e-4, atol=1e-5)
    # At sampled points: the inference order (W at native resolution where cheaper) and the training order
    # (features sampled first, so W gets gradients without scattering into W-wide maps) agree.
    points = torch.rand(2, 50, 2, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        inference = first_layer_at(feats, model.groups, e.weight1, e.bias1, points)
    training = first_layer_at(feats, model.groups, e.weight1, e.bias1, points)
    assert training.requires_grad
    torch.testing.assert_close(training.detach(), inference, rtol=1e-4, atol=1e-5)


def _synthetic_samples(G, ws, size):
    """Labels that are known functions of the hypercolumns: seg = argmax of 3 fixed projections, depth =
    exp(projection), one keypoint at the argmax of another projection."""
    with torch.no_grad():
        _, feats = G.synthesis(ws, return_features=True)
        hyper = materialized_hypercolumns(feats, size)
    proj = torch.randn(5, hyper.shape[1], generator=torch.Generator().manual_seed(7))
    z = torch.einsum("kc,bchw->bkhw", proj, hyper)
    z = (z - z.mean(dim=(0, 2, 3), keepdim=True)) / z.std(dim=(0, 2, 3), keepdim=True)
    samples = []
    for i in range(len(ws)):
        kp_idx = int(z[i, 4].argmax())
        samples.append({"name": f"s{i}", "image": np.zeros((size, size, 3), np.uint8),
                        "mask": z[i, :3].argmax(0).numpy(), "depth": torch.exp(0.3 * z[i, 3]).numpy(),
                        "keypoints": np.array([[kp_idx % size + 0.5, kp_idx // size + 0.5, 2.0]], np.float32)})
    return samples


def test_each_task_learns_a_known_function_of_the_features(tiny_generator, tmp_path):
    G = tiny_generator
    ws = _latents(G, 6)
    samples = _synthetic_samples(G, ws, 32)
    tasks = [Segmentation(["a", "b", "c"], min_class_pixels=1), Keypoints(["k"], sigma=2.0), Depth()]
    torch.manual_seed(0)
    model = LabelGenerator(G, tasks, 32, members=2, hidden=64, hidden2=16)
    summary = fit_label_generator(model, ws, samples, tmp_path / "fit", max_steps=250, min_steps=250,
                                  images_per_step=3, pixels_per_image=512, lr=3e-3, progress=False)
    for task in ("seg", "depth"):
        assert summary["final_loss"][task] < 0.5 * summary["constant_loss"][task], summary
    assert summary["final_loss"]["kp"] < summary["constant_loss"]["kp"], summary
    # Saved, resumed (nothing left to do), reloaded: same predictions.
    path = save_label_generator(model, tmp_path / "lg")
    again = load_label_generator(path, generator=G)
    a, b = model.predict(ws[:2]), again.predict(ws[:2])
    torch.testing.assert_close(a["seg"][0]["label"], b["seg"][0]["label"])
    torch.testing.assert_close(a["depth"][1]["label"], b["depth"][1]["label"])
    assert a["kp"][0]["label"].shape == (1, 3) and a["seg"][0]["uncertainty"].shape == (32, 32)
    # Run through the generator one image at a time (what bounds predict's memory at 256 px and up): the same.
    import handsoff.label_generator.model as model_module

    one_at_a_time = pytest.MonkeyPatch.context()
    with one_at_a_time as mp:
        mp.setattr(model_module, "PREDICT_FEATURE_BYTES", 1)
        c = model.predict(ws[:3], precision="fp32")  # (bf16 rounding would hide small differences)
    whole = model.predict(ws[:3], precision="fp32")
    torch.testing.assert_close(c["images"], whole["images"], rtol=1e-5, atol=1e-5)
    for task in ("seg", "kp", "depth"):
        for i in range(3):
            torch.testing.assert_close(c[task][i]["label"], whole[task][i]["label"], rtol=1e-4, atol=1e-4)
    settings = dict(images_per_step=3, pixels_per_image=512, lr=3e-3, progress=False)
    summary = fit_label_generator(model, ws, samples, tmp_path / "fit", max_steps=250, **settings)
    assert summary["steps"] == 250
    # Resuming on other labels or settings is refused before any work, naming what differs.
    samples[0]["mask"] = np.roll(samples[0]["mask"], 1, axis=0)
    with pytest.raises(OutputError, match=r"fit/state.pt: this fit was started with other labels;"):
        fit_label_generator(model, ws, samples, tmp_path / "fit", max_steps=300, **settings)
    with pytest.raises(OutputError, match="other labels, latents, lr, seed;"):
        fit_label_generator(model, ws + 0.1, samples, tmp_path / "fit", max_steps=300, seed=1,
                            **{**settings, "lr": 1e-3})


def test_a_nan_label_stops_fitting_before_anything_is_saved(tiny_generator, tmp_path):
    from handsoff.runtime import NonFiniteLossError

    G = tiny_generator
    ws = _latents(G, 2)
    samples = _synthetic_samples(G, ws, 16)
    samples[1]["keypoints"][0, 0] = np.nan  # one NaN keypoint in the labeled set
    model = LabelGenerator(G, [Keypoints(["k"], sigma=2.0)], 16, members=1, hidden=8, hidden2=4)
    with pytest.raises(NonFiniteLossError, match="fit: step 1: the training loss is nan"):
        fit_label_generator(model, ws, samples, tmp_path / "fit", max_steps=5, images_per_step=2,
                            pixels_per_image=64, progress=False)
    assert not (tmp_path / "fit" / "state.pt").exists()


def test_jensen_shannon_uncertainty():
    seg = Segmentation(["a", "b", "c"])
    logits = torch.randn(1, 3, 4, 4).repeat(4, 1, 1, 1)  # 4 members that agree
    out = seg.decode(logits)
    assert torch.allclose(out["uncertainty"], torch.zeros(4, 4), atol=1e-6) and out["score"] < 1e-6
    disagree = logits.clone()
    disagree[0, 0] += 10
    disagree[1, 1] += 10
    out = seg.decode(disagree)
    assert (out["uncertainty"] > 1e-3).all() and out["score"] > 0
    # Mode vote: 2 of 4 members vote for class 2 everywhere, 1 for class 0, 1 for class 1.
    votes = torch.zeros(4, 3, 2, 2)
    votes[0, 0] = votes[1, 1] = 5
    votes[2, 2] = votes[3, 2] = 5
    assert (seg.decode(votes)["label"] == 2).all()


def test_keypoint_decoding_recovers_a_planted_peak():
    kp = Keypoints(["a", "b"], sigma=1.5)
    size = 32
    truth = torch.tensor([[10.3, 20.7, 2.0], [25.55, 4.45, 2.0]])
    heat = kp.heatmap_at(truth, torch.arange(size * size), size).t().reshape(2, size, size)
    out = kp.decode(heat[None].repeat(3, 1, 1, 1))
    err = (out["label"][:, :2] - truth[:, :2]).norm(dim=1)
    assert (err < 0.5).all(), err
    assert (out["label"][:, 2] == 2).all() and torch.allclose(out["spread"], torch.zeros(2))
    out = kp.decode(torch.zeros(3, 2, size, size))
    assert (out["label"][:, 2] == 0).all()  # no peak: not visible


def test_visibility_threshold_is_fitted_to_the_predicted_peaks():
    kp = Keypoints(["a", "b"])
    # Regressed heatmaps peak low: labeled keypoints around 0.12-0.2, unlabeled ones around 0.02-0.05.
    peaks = torch.tensor([[0.12, 0.02], [0.2, 0.05], [0.15, 0.03]])
    labeled = torch.tensor([[True, False], [True, False], [True, False]])
    t = kp.fit_visibility(peaks, labeled)
    assert 0.05 < t < 0.12 and kp.visibility_threshold == t
    # All labeled: half the 10th percentile, so every training keypoint would count as visible.
    t = kp.fit_visibility(peaks[:, :1], labeled[:, :1])
    assert t < 0.12 and (peaks[:, 0] > t).all()
    heat = torch.zeros(1, 2, 8, 8)
    heat[0, 0, 3, 3] = 0.1                        # under the default 0.3, over the fitted threshold
    assert kp.decode(heat)["label"][:, 2].tolist() == [2.0, 0.0]


def test_depth_transform_round_trips():
    depth = Depth()
    depth.fit_normalization([np.array([[1.0, 2.0], [4.0, np.inf]]), np.array([[8.0, 0.0], [3.0, 5.0]])])
    d = torch.tensor([0.5, 1.0, 3.0, 100.0])
    torch.testing.assert_close(depth.inverse(depth.forward_transform(d)), d)
    t = depth.prepare({"name": "x", "depth": np.array([[1.0, np.nan], [0.0, 2.0]], np.float32)}, 2)
    assert torch.isnan(t[1]) and torch.isnan(t[2]) and torch.isfinite(t[[0, 3]]).all()


def test_small_classes_become_background_and_task_names_parse():
    seg = Segmentation(["bg", "a", "b"], min_class_pixels=3)
    mask = np.zeros((4, 4), np.int64)
    mask[0, :3] = 1
    mask[3, 3] = 2
    cleaned = seg.clean_mask(mask)
    assert (cleaned[0, :3] == 1).all() and cleaned[3, 3] == 0
    assert parse_task_names("seg, keypoints,depth,seg") == ["seg", "kp", "depth"]
    with pytest.raises(ValueError, match="unknown task 'normals'"):
        parse_task_names("seg,normals")


def test_pixel_grid_matches_interpolate_centres():
    grid = pixel_grid(4)
    assert grid.shape == (16, 2)
    torch.testing.assert_close(grid[0], torch.tensor([-0.75, -0.75]))
    torch.testing.assert_close(grid[-1], torch.tensor([0.75, 0.75]))


def test_fit_command_end_to_end(tmp_path, tiny_generator, tiny_discriminator, capsys):
    """render labeled heads -> invert (few steps) -> fit all three tasks -> reload and predict."""
    from handsoff import save_networks
    from handsoff.cli import main
    from handsoff.domains.heads import write_heads_dataset

    ckpt = save_networks(tmp_path / "g", tiny_generator, tiny_discriminator)
    labels = write_heads_dataset(tmp_path / "labeled", 3, seed=0, size=64, progress=False)
    latents = tmp_path / "latents.safetensors"
    assert main(["invert", "--generator", str(ckpt), "--images", str(labels), "--out", str(latents),
                 "--steps", "2", "--device", "cpu"]) == 0
    out = tmp_path / "lg"
    assert main(["fit", "--generator", str(ckpt), "--latents", str(latents), "--labels", str(labels),
                 "--tasks", "seg,kp,depth", "--out", str(out), "--members", "2", "--hidden", "16", "--hidden2", "8",
                 "--max-steps", "5", "--min-steps", "5", "--pixels", "64", "--device", "cpu"]) == 0
    assert (out / "preview.png").is_file() and (out / "state.pt").is_file()
    model = load_label_generator(out)
    assert [t.name for t in model.tasks] == ["seg", "kp", "depth"] and model.label_size == 64
    result = model.predict(torch.zeros(1, tiny_generator.n_latent, tiny_generator.w_dim))
    assert result["kp"][0]["label"].shape == (12, 3)
    assert "constant prediction" in capsys.readouterr().out
    # Latents of a different generator are refused with the file named.
    bad = tmp_path / "bad.safetensors"
    from handsoff.inversion import save_latents

    save_latents(bad, ["0000_0000000"], torch.zeros(1, 3, 5), {})
    assert main(["fit", "--generator", str(ckpt), "--latents", str(bad), "--labels", str(labels),
                 "--out", str(tmp_path / "lg2")]) == 1
    assert "bad.safetensors: latents are (3, 5)" in capsys.readouterr().err


def test_a_label_generator_loads_on_its_generator_with_other_runtime_settings(tiny_generator, tmp_path):
    """Precision and clamping may be overridden at load time (load_generator(..., num_fp16_res=N)); only another
    architecture is refused."""
    from conftest import TINY

    from handsoff.errors import DataError
    from handsoff.generator import Generator

    model = LabelGenerator(tiny_generator, [Segmentation(["a", "b"])], 16, members=1, hidden=8, hidden2=4)
    path = save_label_generator(model, tmp_path / "lg")
    reduced = Generator(**TINY, num_fp16_res=2)
    reduced.load_state_dict(tiny_generator.state_dict())
    assert load_label_generator(path, generator=reduced).G is reduced
    with pytest.raises(DataError, match="fitted on a generator with config"):
        load_label_generator(path, generator=Generator(**{**TINY, "channel_max": 16}))


@pytest.mark.parametrize("device", DEVICES)
def test_label_maps_on_every_device_match_cpu(tiny_generator, device):
    """The factorized label path on the device gives CPU's labels (TF32 on CUDA: small differences allowed)."""
    torch.manual_seed(0)
    model = LabelGenerator(tiny_generator, [Segmentation(["a", "b", "c"]), Depth(log_mean=1.0, log_std=0.5)], 32,
                           members=2, hidden=16, hidden2=8).eval()
    ws = _latents(tiny_generator, 2)
    expected = model.predict(ws, precision="fp32")
    moved = model.to(device).predict(ws.to(device), precision="fp32")
    for i in range(2):
        same = (moved["seg"][i]["label"].cpu() == expected["seg"][i]["label"]).float().mean()
        assert same > 0.99
        torch.testing.assert_close(moved["depth"][i]["label"].cpu(), expected["depth"][i]["label"], rtol=1e-2,
                                   atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_label_maps_stay_within_the_stated_tolerance_of_float32(tiny_generator, device):
    """bf16 label maps really run in bf16 (not bit-identical to float32) and stay close to float32: outputs within
    2% RMS, segmentation labels on >= 98% of pixels, depth within 2%."""
    torch.manual_seed(0)
    model = LabelGenerator(tiny_generator, [Segmentation(["a", "b", "c"]), Depth(log_mean=1.0, log_std=0.5)], 32,
                           members=2, hidden=16, hidden2=8).eval().to(device)
    with torch.no_grad():  # decisive logits, as a fitted model's are
        model.ensemble.weight3.mul_(50)
    ws = _latents(tiny_generator, 3).to(device)
    _, feats = model.features(ws)
    full, half = model.dense_outputs(feats), model.dense_outputs(feats, dtype=torch.bfloat16)
    assert half.dtype == torch.float32 and not torch.equal(full, half)
    assert ((half - full).pow(2).mean() / full.pow(2).mean()).sqrt() < 0.02
    a, b = model.predict(ws, precision="fp32"), model.predict(ws, precision="bf16")
    for i in range(3):
        assert (a["seg"][i]["label"] == b["seg"][i]["label"]).float().mean() >= 0.98
        torch.testing.assert_close(b["depth"][i]["label"], a["depth"][i]["label"], rtol=0.02, atol=0.02)


def test_auto_label_precision_follows_the_matmul_measurement(tmp_path, monkeypatch):
    """'auto' label maps take bf16 on a CPU only where bf16 matrix products measured faster; measured once per
    machine and cached beside (not instead of) the convolution measurement; explicit choices are not measured."""
    from handsoff import runtime
    from handsoff.label_generator.model import label_map_dtype

    measured = runtime.measure_bf16_matmul_speedup(rows=16, inner=8, width=32, repeats=1)
    assert math.isfinite(measured) and measured > 0
    monkeypatch.setenv("HANDSOFF_CACHE", str(tmp_path))
    calls = []
    for speedup, dtype in ((0.5, torch.float32), (3.0, torch.bfloat16)):
        monkeypatch.setattr(runtime, "measure_bf16_matmul_speedup", lambda s=speedup: calls.append(s) or s)
        (tmp_path / "precision.json").unlink(missing_ok=True)
        assert label_map_dtype("auto", "cpu") == label_map_dtype("auto", torch.device("cpu")) == dtype
    assert calls == [0.5, 3.0]
    monkeypatch.setattr(runtime, "measure_bf16_speedup", lambda: 0.25)
    assert not runtime.reduced_precision_pays("cpu")  # the convolution measurement is a key of its own
    keys = json.loads((tmp_path / "precision.json").read_text())
    assert sorted(keys.values()) == [0.25, 3.0] and any("| matmul |" in k for k in keys)
    assert runtime.cpu_key() in next(iter(keys))
    assert label_map_dtype("fp32", "cpu") == torch.float32 and label_map_dtype("bf16", "cpu") == torch.bfloat16
    assert calls == [0.5, 3.0]
    with pytest.raises(ValueError, match="label precision must be one of auto, fp32, bf16, got 'fp16'"):
        label_map_dtype("fp16", "cpu")
