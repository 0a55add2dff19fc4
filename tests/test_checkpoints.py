import builtins
import os
import pickle

import pytest
import stylegan3_reference
import torch
from checkpoint_writers import (
    rosinality_generator_state,
    write_nvidia_pickle,
    write_nvidia_stylegan3_pickle,
    write_rosinality,
)
from conftest import stylegan3_16px

from handsoff import CheckpointError, load_discriminator, load_generator, load_networks, save_networks
from handsoff.generator import Generator


@pytest.fixture
def images_of(tiny_generator):
    z = torch.randn(3, tiny_generator.z_dim, generator=torch.Generator().manual_seed(5))

    def run(G):
        with torch.no_grad():
            return G(z, truncation_psi=0.7)
    return run


def test_rosinality_and_nvidia_files_load_and_agree(tmp_path, tiny_generator, tiny_discriminator, images_of):
    write_rosinality(tmp_path / "ros.pt", tiny_generator, tiny_discriminator)
    write_nvidia_pickle(tmp_path / "nv.pkl", tiny_generator, tiny_discriminator)
    ros = load_networks(tmp_path / "ros.pt")
    nv = load_networks(tmp_path / "nv.pkl")
    assert (ros.source_format, nv.source_format) == ("rosinality", "nvidia")
    expected = images_of(tiny_generator)
    assert (images_of(ros.generator) - expected).abs().max() <= 1e-4
    assert (images_of(nv.generator) - images_of(ros.generator)).abs().max() <= 1e-4
    for key in ("resolution", "z_dim", "w_dim", "n_mlp", "channel_base", "channel_max"):
        assert ros.generator.config[key] == nv.generator.config[key] == tiny_generator.config[key]
    img = expected.clone()
    with torch.no_grad():
        d_expected = tiny_discriminator(img)
        assert torch.allclose(ros.discriminator(img), d_expected, atol=1e-5)
        assert torch.allclose(nv.discriminator(img), d_expected, atol=1e-5)


def test_reduced_precision_is_opt_in_on_cpu(tmp_path, tiny_generator, images_of):
    """An NVIDIA pickle declaring num_fp16_res=4 loads in float32 on CPU and reproduces the float32 images;
    bf16 is the caller's choice."""
    half = Generator(**{**tiny_generator.config, "num_fp16_res": 4})
    half.load_state_dict(tiny_generator.state_dict())
    write_nvidia_pickle(tmp_path / "nv16.pkl", half)
    G = load_networks(tmp_path / "nv16.pkl").generator
    assert G.config["num_fp16_res"] == 0
    assert (images_of(G) - images_of(tiny_generator)).abs().max() <= 1e-4
    opted = load_networks(tmp_path / "nv16.pkl", num_fp16_res=4).generator
    assert opted.config["num_fp16_res"] == 4


def test_nvidia_pickle_source_is_never_executed(tmp_path, tiny_generator):
    write_nvidia_pickle(tmp_path / "nv.pkl", tiny_generator)
    load_generator(tmp_path / "nv.pkl")
    assert not hasattr(builtins, "HANDSOFF_TEST_SOURCE_EXECUTED")


def test_pickle_with_foreign_globals_is_refused(tmp_path, tiny_generator):
    write_nvidia_pickle(tmp_path / "evil.pkl", tiny_generator, extra_globals=os.getcwd)
    with pytest.raises(CheckpointError, match=r"evil\.pkl.*refusing to load the global posix\.getcwd"):
        load_generator(tmp_path / "evil.pkl")


@pytest.mark.parametrize("config", ["t", "r"])
def test_stylegan3_pickles_load_and_match_the_reference(tmp_path, config):
    """NVIDIA stylegan3 pickles of config t and r load through the restricted unpickler and reproduce the independent
    reference's float32 images; features cover the image at each layer's sampling rate; the handsoff format
    round-trips them bit-exactly."""
    G = stylegan3_16px(config)
    write_nvidia_stylegan3_pickle(tmp_path / f"{config}.pkl", G)
    nets = load_networks(tmp_path / f"{config}.pkl")
    loaded = nets.generator
    assert nets.source_format == "nvidia" and nets.discriminator is None
    assert loaded.config == G.config and loaded.config["architecture"] == "stylegan3"
    z = torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(5))
    expected = stylegan3_reference.synthesize(G, stylegan3_reference.mapping(G, z, psi=0.7))
    with torch.no_grad():
        img, features = loaded(z, truncation_psi=0.7, return_features=True)
    assert img.shape == (3, 3, 16, 16) and expected.abs().max() > 0.05
    assert (img - expected).abs().max() <= 2e-4
    s = loaded.synthesis
    assert [f.shape[1:] for f in features] == [(c, r, r) for c, r in zip(s.feature_channels, s.feature_resolutions)]
    assert len(features) == G.config["num_layers"] + 1
    out = save_networks(tmp_path / "saved", loaded)
    with torch.no_grad():
        assert torch.equal(load_generator(out)(z, truncation_psi=0.7), img)


def test_stylegan3_pickle_with_a_wrong_schedule_is_refused(tmp_path):
    """The recorded constructor arguments must describe the tensors: a pickle claiming other widths is refused,
    naming the file and the keys that do not match."""
    G = stylegan3_16px("t")
    G.config["channel_max"] = 8
    write_nvidia_stylegan3_pickle(tmp_path / "bad.pkl", G)
    with pytest.raises(CheckpointError, match=r"bad\.pkl: StyleGAN3Generator tensors do not match.*L0_36_16"):
        load_generator(tmp_path / "bad.pkl")


def test_handsoff_format_roundtrip_and_no_silent_overwrite(tmp_path, tiny_generator, tiny_discriminator, images_of):
    out = save_networks(tmp_path / "ckpt", tiny_generator, tiny_discriminator, metadata={"note": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(images_of(load_generator(out)), images_of(tiny_generator))
    assert torch.equal(images_of(load_generator(out / "model.safetensors")), images_of(tiny_generator))
    assert load_discriminator(out).config == tiny_discriminator.config
    with pytest.raises(FileExistsError, match="already exists"):
        save_networks(out, tiny_generator)
    save_networks(out, tiny_generator, overwrite=True)
    assert load_networks(out).discriminator is None
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers


def test_runtime_overrides(tmp_path, tiny_generator):
    write_rosinality(tmp_path / "ros.pt", tiny_generator)
    G = load_generator(tmp_path / "ros.pt", num_fp16_res=2)
    assert G.config["num_fp16_res"] == 2 and G.synthesis.b64.use_fp16 and not G.synthesis.b16.use_fp16
    with pytest.raises(TypeError, match="can be overridden"):
        load_generator(tmp_path / "ros.pt", resolution=128)


def test_missing_kernels_and_noise_load_with_warnings(tmp_path, tiny_generator, images_of):
    write_rosinality(tmp_path / "nokernels.pt", tiny_generator, kernels=False)
    with pytest.warns(UserWarning, match="kernel buffers are absent"):
        G = load_generator(tmp_path / "nokernels.pt")
    assert (images_of(G) - images_of(tiny_generator)).abs().max() <= 1e-4

    write_rosinality(tmp_path / "nonoise.pt", tiny_generator, noises=False, latent_avg=False)
    with pytest.warns(UserWarning) as record:
        G = load_generator(tmp_path / "nonoise.pt")
    messages = " ".join(str(w.message) for w in record)
    assert "9 noise buffers are absent" in messages and "w_avg is estimated" in messages
    ws = torch.randn(2, G.n_latent, G.w_dim)
    with torch.no_grad():
        assert (G.synthesis(ws, noise_mode="none") - tiny_generator.synthesis(ws, noise_mode="none")).abs().max() < 1e-4
    assert G.w_avg.abs().sum() > 0


def test_truncated_files_give_clear_errors(tmp_path, tiny_generator):
    write_rosinality(tmp_path / "ros.pt", tiny_generator)
    write_nvidia_pickle(tmp_path / "nv.pkl", tiny_generator)
    save_networks(tmp_path / "ours", tiny_generator)
    for path in (tmp_path / "ros.pt", tmp_path / "nv.pkl", tmp_path / "ours" / "model.safetensors"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=str(path.name)):
            load_generator(path)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_generator(empty)


def test_mismatching_file_names_missing_keys_and_inferred_config(tmp_path, tiny_generator):
    sd = rosinality_generator_state(tiny_generator)
    del sd["convs.3.conv.weight"]
    torch.save({"g_ema": sd, "latent_avg": tiny_generator.w_avg}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as err:
        load_generator(tmp_path / "broken.pt")
    message = str(err.value)
    assert "broken.pt" in message and "missing keys: synthesis.b16.conv1.weight" in message
    assert "'resolution': 64" in message and "'channel_base': 1024" in message

    sd = rosinality_generator_state(tiny_generator)
    sd["convs.0.conv.extra"] = torch.zeros(1)
    torch.save({"g_ema": sd}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"extra\.pt: unexpected keys .*convs\.0\.conv\.extra"):
        load_generator(tmp_path / "extra.pt")

    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no 'g_ema' or 'g' entry"):
        load_generator(tmp_path / "other.pt")
    with open(tmp_path / "other.pkl", "wb") as f:
        pickle.dump({"net": 1}, f)
    with pytest.raises(CheckpointError, match="not an NVIDIA network pickle"):
        load_generator(tmp_path / "other.pkl")


def test_unknown_name_lists_shipped_generators(tmp_path):
    with pytest.raises(CheckpointError, match="no such file, and not a shipped generator name"):
        load_generator(tmp_path / "nope.pt")


@pytest.mark.parametrize("framing", ["bust", "portrait"])
def test_every_framing_ships_a_generator_and_its_probe(framing):
    """The demo's and benchmark's default generator for each framing loads by name and draws that framing; the probe
    that measures it has the same name."""
    import json

    from handsoff.domains import heads
    from handsoff.generator.checkpoints import SHIPPED_DIR
    from handsoff.metrics.probe import load_probe

    name = heads.SHIPPED_NAMES[framing]
    nets = load_networks(name)
    assert nets.generator.img_resolution == 64 and nets.discriminator is not None
    metadata = json.loads((SHIPPED_DIR / name / "config.json").read_text())["metadata"]
    assert metadata.get("framing", "bust") == framing and metadata["images_seen"] > 0
    probe = load_probe(SHIPPED_DIR / "probes" / name)
    assert probe.config["n_classes"] == len(heads.CLASSES)
    assert heads.DEFAULT_FRAMING in heads.SHIPPED_NAMES
