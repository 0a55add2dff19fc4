import json

import numpy as np
import pytest
import torch

from handsoff.data.dataset import LabeledImageDataset, joint_transform, write_mirrored_dataset
from handsoff.data.layout import DatasetError, LabeledFolder
from handsoff.domains import heads
from handsoff.domains.heads import CLASSES, KEYPOINTS, render_heads, write_heads_dataset


@pytest.fixture(scope="module")
def batch():
    return render_heads(seed=3, indices=range(24), size=64)


def test_shapes_and_ranges(batch):
    assert batch.images.shape == (24, 64, 64, 3) and batch.images.dtype == np.uint8
    assert batch.masks.shape == (24, 64, 64) and batch.masks.max() < len(CLASSES)
    assert batch.depth.shape == (24, 64, 64) and np.isfinite(batch.depth).all() and (batch.depth > 0).all()
    assert batch.keypoints.shape == (24, len(KEYPOINTS), 3) and len(KEYPOINTS) >= 10
    assert set(np.unique(batch.keypoints[..., 2])) <= {0, 1, 2}


def test_deterministic_by_seed_and_index(batch):
    again = render_heads(seed=3, indices=[5, 6], size=64)
    assert np.array_equal(again.images, batch.images[5:7]) and np.array_equal(again.depth, batch.depth[5:7])
    other = render_heads(seed=4, indices=[5], size=64)
    assert not np.array_equal(other.images[0], batch.images[5])


def test_visible_keypoints_lie_on_the_rendered_surface(batch):
    checked = 0
    for i in range(len(batch.images)):
        for k, (x, y, v) in enumerate(batch.keypoints[i]):
            if v != 2 or "ear_lobe" in KEYPOINTS[k]:  # ear lobes sit on silhouettes: see the ray-level test
                continue
            z = batch.points3d[i, k, 2]
            # The pixel holding the keypoint (or a neighbour, for keypoints on steep silhouettes) has its depth.
            ys, xs = slice(max(int(y) - 1, 0), int(y) + 2), slice(max(int(x) - 1, 0), int(x) + 2)
            assert np.abs(batch.depth[i, ys, xs] - z).min() < 0.03 * z, (i, KEYPOINTS[k], batch.depth[i, ys, xs], z)
            checked += 1
    assert checked > 100


def test_keypoints_are_on_the_first_surface_along_their_ray_exactly_when_visible(batch):
    scenes = [heads.build_scene(f)[0] for f in batch.factors]
    scene = heads._pack(scenes)
    points = torch.from_numpy(batch.points3d).double()
    t, _, _ = heads.cast_rays(scene, (points / points[..., 2:3]).float())
    z = batch.points3d[..., 2]
    visible = batch.keypoints[..., 2] == 2
    assert np.allclose(t.numpy()[visible], z[visible], rtol=1e-4)  # on a surface, nothing in front
    occluded = batch.keypoints[..., 2] == 1
    assert (t.numpy()[occluded] < z[occluded]).all()


def test_occluded_keypoints_are_behind_something(batch):
    occluded = np.argwhere(batch.keypoints[..., 2] == 1)
    assert len(occluded) > 0
    for i, k in occluded:
        x, y = batch.keypoints[i, k, :2]
        if 0 <= x < 64 and 0 <= y < 64:  # something near the keypoint's pixel is nearer than the keypoint
            window = batch.depth[i, max(int(y) - 1, 0):int(y) + 2, max(int(x) - 1, 0):int(x) + 2]
            assert window.min() < batch.points3d[i, k, 2] - 1e-3


def test_mask_classes_where_their_primitive_is_hit(batch):
    eye, nose, glasses = CLASSES.index("eye"), CLASSES.index("nose"), CLASSES.index("glasses")
    for i in range(len(batch.images)):
        kp = dict(zip(KEYPOINTS, batch.keypoints[i]))
        for name, allowed in (("left_eye", {eye, glasses}), ("right_eye", {eye, glasses}), ("nose_tip", {nose})):
            x, y, v = kp[name]
            if v == 2 and 1 <= x < 63 and 1 <= y < 63:
                window = batch.masks[i, int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2]
                assert allowed & set(window.ravel().tolist()), (i, name)
    # Background pixels are the farthest thing along their rays.
    bg = batch.masks == 0
    assert batch.depth[bg].mean() > batch.depth[~bg].mean() + 2


def test_rays_hit_an_ellipsoid_where_the_quadric_says():
    factors = heads.sample_factors(np.random.default_rng([0, 0]))
    prims, _ = heads.build_scene(factors)
    scene = heads._pack([prims])
    skull = prims[0]
    direction = torch.tensor([[skull.center[0] / skull.center[2], skull.center[1] / skull.center[2], 1.0]])
    t, index, _ = heads.cast_rays(scene, direction.float())
    p = t.item() * direction[0].double().numpy()
    local = np.diag(1 / skull.radii) @ skull.rotation.T @ (p - skull.center)
    assert abs(np.linalg.norm(local) - 1) < 1e-4  # the hit lies on the surface of the primitive it reports
    assert prims[index.item()].class_id in (CLASSES.index("skin"), CLASSES.index("hair"), CLASSES.index("hat"))


def test_accessory_rates_over_many_scenes():
    rng_factors = [heads.sample_factors(np.random.default_rng([11, i])) for i in range(2000)]
    glasses = np.mean([f["glasses"] for f in rng_factors])
    hat = np.mean([f["hat"] for f in rng_factors])
    assert 0.08 < glasses < 0.12 and 0.035 < hat < 0.065
    assert {f["hair_style"] for f in rng_factors} == set(heads.HAIR_STYLES)


@pytest.mark.parametrize("size", [128, 256])
def test_larger_sizes_render(size):
    r = render_heads(seed=0, indices=[0], size=size)
    assert r.images.shape == (1, size, size, 3)
    small = render_heads(seed=0, indices=[0], size=64)
    assert np.allclose(r.keypoints[0, :, :2] * 64 / size, small.keypoints[0, :, :2], atol=1e-3)


def test_written_dataset_roundtrip_and_flip(tmp_path):
    out = write_heads_dataset(tmp_path / "heads", n=6, seed=2, size=64, batch=4, progress=False)
    folder = LabeledFolder(out)
    assert len(folder) == 6 and folder.card.tasks == ["segmentation", "keypoints", "depth"]
    direct = render_heads(2, range(6), 64)
    sample = folder.load(folder.names[4])
    assert np.array_equal(sample["image"], direct.images[4]) and np.array_equal(sample["mask"], direct.masks[4])
    assert np.allclose(sample["depth"], direct.depth[4]) and np.allclose(sample["keypoints"], direct.keypoints[4],
                                                                         atol=1e-3)
    assert len((out / "factors.jsonl").read_text().splitlines()) == 6
    assert json.loads((out / "keypoints.json").read_text())["categories"][0]["keypoints"] == KEYPOINTS

    ds = LabeledImageDataset(out)
    plain = ds[4]
    flipped = joint_transform(sample, (64, 64), (0, 0, 64, 64), True, ds.flip_permutations)
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
    assert torch.equal(flipped["depth"], plain["depth"].flip(-1))
    left, right = KEYPOINTS.index("left_eye"), KEYPOINTS.index("right_eye")
    # After a flip the subject's left eye is the mirror image of the right eye before it.
    assert torch.allclose(flipped["keypoints"][left, 0], 64 - plain["keypoints"][right, 0])
    assert torch.equal(flipped["keypoints"][left, 1], plain["keypoints"][right, 1])
    assert (plain["image"].min() >= -1) and (plain["image"].max() <= 1)


def test_mirrored_dataset_holds_each_sample_and_its_mirror(tmp_path):
    out = write_heads_dataset(tmp_path / "heads", n=3, seed=2, size=32, progress=False)
    folder, mirrored = LabeledFolder(out), LabeledFolder(write_mirrored_dataset(out, tmp_path / "mirrored"))
    assert sorted(mirrored.names) == sorted(folder.names + [n + "-mirror" for n in folder.names])
    left, right = KEYPOINTS.index("left_eye"), KEYPOINTS.index("right_eye")
    for name in folder.names:
        a, m = folder.load(name), mirrored.load(name + "-mirror")
        assert np.array_equal(mirrored.load(name)["image"], a["image"])  # the originals, unchanged
        assert np.array_equal(m["image"], a["image"][:, ::-1]) and np.array_equal(m["mask"], a["mask"][:, ::-1])
        assert np.allclose(m["depth"], a["depth"][:, ::-1])
        # The mirror's left eye is where the original's right eye was, reflected.
        assert np.isclose(m["keypoints"][left, 0], 32 - a["keypoints"][right, 0], atol=1e-3)
        assert np.isclose(m["keypoints"][left, 1], a["keypoints"][right, 1], atol=1e-3)
    with pytest.raises(DatasetError, match="-mirror"):  # names clash: an error, never an overwrite
        write_mirrored_dataset(tmp_path / "mirrored", tmp_path / "twice")
    stamp = (tmp_path / "mirrored" / "dataset.json").stat().st_mtime_ns
    write_mirrored_dataset(out, tmp_path / "mirrored")  # complete: reused, not rewritten
    assert (tmp_path / "mirrored" / "dataset.json").stat().st_mtime_ns == stamp


def test_crop_resize_keeps_labels_consistent(tmp_path):
    out = write_heads_dataset(tmp_path / "heads", n=2, seed=5, size=64, progress=False)
    ds = LabeledImageDataset(out, size=32, augment=True, crop_scale=(0.5, 0.5), flip_p=0.0, seed=1)
    s = ds[0]
    assert s["image"].shape == (3, 32, 32) and s["mask"].shape == (32, 32) and s["depth"].shape == (1, 32, 32)
    raw = ds.folder.load(ds.folder.names[0])
    assert set(s["mask"].unique().tolist()) <= set(np.unique(raw["mask"]).tolist())  # nearest: ids stay ids
    assert set(s["depth"].unique().tolist()) <= set(np.unique(raw["depth"]).tolist())
    for k, (x, y, v) in enumerate(s["keypoints"].tolist()):
        if v > 0:  # inside the crop: the pixel under it has the depth of the original pixel it came from
            assert 0 <= x < 32 and 0 <= y < 32
    assert torch.equal(ds[0]["mask"], s["mask"])  # same seed, epoch and index: same augmentation
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], s["image"])


def test_portrait_framing_centres_faces_and_enlarges_the_small_parts(tmp_path):
    indices = range(48)
    bust, portrait = render_heads(7, indices, 64), render_heads(7, indices, 64, framing="portrait")
    # The same scenes (one random stream): only the head's placement and the lens differ.
    for b, p in zip(bust.factors, portrait.factors):
        assert p["framing"] == "portrait" and "framing" not in b
        assert {k: v for k, v in p.items() if not k.startswith("head_") and k != "framing"} == \
            {k: v for k, v in b.items() if not k.startswith("head_")}
    # Centred: the face point projects within ~2 px of the image centre (jitter 0.04 at depth >= 4.6).
    centres = []
    for f in portrait.factors:
        pose = heads._rotation(*(np.radians(f[k]) for k in ("yaw", "pitch", "roll")))
        point = np.array([f["head_x"], f["head_y"], f["head_z"]]) + pose @ heads.PORTRAIT_CENTRE * f["head_scale"]
        centres.append(heads.project(point, 64, heads.FRAMINGS["portrait"]))
    assert np.abs(np.array(centres) - 32).max() < 2.2
    eye = CLASSES.index("eye")
    assert (np.abs(portrait.keypoints[:, KEYPOINTS.index("nose_tip"), :2] - 32) < 16).all()
    # Eyes, noses and mouths cover over 2.5x the pixels of the bust framing.
    for name in ("eye", "nose", "mouth"):
        c = CLASSES.index(name)
        assert (portrait.masks == c).sum() > 2.5 * (bust.masks == c).sum(), name
    assert (portrait.masks == eye).reshape(48, -1).any(1).mean() > 0.9
    # Keypoints still follow the rendering: the visible ones lie on the surface the label ray hit.
    visible = np.argwhere(portrait.keypoints[..., 2] == 2)
    xy = portrait.keypoints[visible[:, 0], visible[:, 1], :2].astype(int).clip(0, 63)
    depth = portrait.depth[visible[:, 0], xy[:, 1], xy[:, 0]]
    z = portrait.points3d[visible[:, 0], visible[:, 1], 2]
    assert np.median(np.abs(depth - z) / z) < 0.01
    # Written datasets record the framing; bust cards stay as they were.
    out = write_heads_dataset(tmp_path / "p", n=2, seed=7, size=64, progress=False, framing="portrait")
    assert LabeledFolder(out).card.source["framing"] == "portrait"
    assert np.array_equal(LabeledFolder(out).load(LabeledFolder(out).names[1])["image"], portrait.images[1])
    assert "framing" not in heads.dataset_card(64, 7).source
    with pytest.raises(ValueError, match="framing"):
        render_heads(7, [0], 64, framing="close-up")
    with pytest.raises(ValueError, match="one framing"):
        heads.render_factors([bust.factors[0], portrait.factors[0]], 64)
