import json

import numpy as np
import pytest
from PIL import Image

from handsoff.cli import main
from handsoff.data.dataset import write_mirrored_dataset
from handsoff.data.importers import import_coco, import_handsoff_faces, import_palette_masks, load_class_mapping
from handsoff.data.layout import DatasetError, LabeledFolder


def _image(path, h=8, w=10, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_handsoff_faces_with_19_to_8_merge(tmp_path):
    src = tmp_path / "faces"
    src.mkdir()
    for i in range(3):
        _image(src / f"image_{i}.jpg", seed=i)
        mask = np.zeros((8, 10), np.int64)
        mask[0, :] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        mask[1, :9] = [10, 11, 12, 13, 14, 15, 16, 17, 18]
        np.save(src / f"image_mask{i}.npy", mask)
    import_handsoff_faces(src, tmp_path / "out")
    folder = LabeledFolder(tmp_path / "out")
    assert folder.card.classes == ["background", "skin", "nose", "eye", "brow", "ear", "mouth", "hair"]
    m = folder.load("image_0")["mask"]
    names = folder.card.classes
    assert [names[v] for v in m[0]] == ["background", "skin", "nose", "eye", "eye", "eye", "brow", "brow", "ear",
                                        "ear"]
    assert [names[v] for v in m[1, :9]] == ["mouth", "mouth", "mouth", "hair"] + ["background"] * 5

    import_handsoff_faces(src, tmp_path / "raw", mapping=None)
    raw = LabeledFolder(tmp_path / "raw")
    assert len(raw.card.classes) == 19 and ("l_eye", "r_eye") in raw.card.class_flip_pairs
    # Mirrored (label_generator.mirror), a left eye becomes a right eye; non-square images keep their shape.
    mirror = LabeledFolder(write_mirrored_dataset(tmp_path / "raw", tmp_path / "mirrored")).load("image_0-mirror")
    before = raw.load("image_0")["mask"]
    assert mirror["mask"].shape == (8, 10) and mirror["image"].shape == (8, 10, 3)
    assert [raw.card.classes[v] for v in before[0, 4:7]] == ["l_eye", "r_eye", "l_brow"]
    assert [raw.card.classes[v] for v in mirror["mask"][0, ::-1][4:7]] == ["r_eye", "l_eye", "r_brow"]


def test_handsoff_faces_broken_inputs(tmp_path):
    src = tmp_path / "faces"
    src.mkdir()
    _image(src / "image_0.jpg")
    with pytest.raises(DatasetError, match=r"image_0\.jpg: no mask"):
        import_handsoff_faces(src, tmp_path / "o1")
    np.save(src / "image_mask0.npy", np.zeros((9, 10), np.int64))
    with pytest.raises(DatasetError, match=r"image_mask0\.npy: mask shape \(9, 10\) does not match"):
        import_handsoff_faces(src, tmp_path / "o2", overwrite=True)
    np.save(src / "image_mask0.npy", np.full((8, 10), 19, np.int64))
    with pytest.raises(DatasetError, match=r"image_mask0\.npy: unknown class ids \[19\]"):
        import_handsoff_faces(src, tmp_path / "o3")
    np.save(src / "image_mask0.npy", np.zeros((8, 10), np.int64))
    (src / "image_0.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match=r"image_0\.jpg: cannot read image"):
        import_handsoff_faces(src, tmp_path / "o4")


def _coco(tmp_path, categories, annotations, size=(20, 20)):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    _image(images / "car.png", h=size[0], w=size[1])
    data = {"images": [{"id": 1, "file_name": "car.png", "height": 20, "width": 20}],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)],
            "annotations": annotations}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json", images


def test_coco_polygons_rle_and_draw_order(tmp_path):
    from pycocotools import mask as mask_utils

    small = np.zeros((20, 20), np.uint8, order="F")
    small[8:12, 8:12] = 1
    rle = mask_utils.encode(small)
    rle["counts"] = rle["counts"].decode()
    anns = [  # the small light (RLE) is listed first but must end on top of the large bumper (polygon)
        {"id": 1, "image_id": 1, "category_id": 3, "segmentation": rle, "area": 16, "iscrowd": 0, "bbox": [8, 8, 4, 4]},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 18, 2, 18, 18, 2, 18]], "area": 256,
         "iscrowd": 0, "bbox": [2, 2, 16, 16]},
    ]
    ann, images = _coco(tmp_path, ["back_bumper", "front_bumper", "front_left_light"], anns)
    import_coco(ann, images, tmp_path / "out", mapping="carparts18_to_10")
    folder = LabeledFolder(tmp_path / "out")
    m, names = folder.load("car")["mask"], folder.card.classes
    assert len(names) == 10 and names[m[10, 10]] == "light" and names[m[4, 4]] == "bumper"
    assert names[m[0, 0]] == "background"


def test_coco_broken_inputs(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 8, 2, 8, 8]], "area": 18,
             "iscrowd": 0, "bbox": [2, 2, 6, 6]}]
    ann, images = _coco(tmp_path, ["spoiler"], anns)
    with pytest.raises(DatasetError, match="class 'spoiler' is not in mapping 'carparts18_to_10'"):
        import_coco(ann, images, tmp_path / "o1", mapping="carparts18_to_10")
    ann, images = _coco(tmp_path, ["hood"], anns, size=(20, 24))
    with pytest.raises(DatasetError, match=r"car\.png: image is 24x20, ann\.json says 20x20"):
        import_coco(ann, images, tmp_path / "o2")
    (images / "car.png").unlink()
    with pytest.raises(DatasetError, match=r"car\.png: image listed in ann\.json is missing"):
        import_coco(ann, images, tmp_path / "o3")


def test_palette_masks_snap_and_report(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    palette = {"classes": [{"name": "background", "color": [0, 0, 0]}, {"name": "road", "color": [128, 64, 128]},
                           {"name": "car", "color": [0, 0, 142]}]}
    (tmp_path / "palette.json").write_text(json.dumps(palette))
    _image(tmp_path / "img" / "a.png", h=4, w=4)
    coloured = np.zeros((4, 4, 3), np.uint8)
    coloured[0] = [128, 64, 128]
    coloured[1] = [120, 60, 130]  # anti-aliased road
    coloured[2] = [0, 0, 142]
    Image.fromarray(coloured).save(tmp_path / "msk" / "a.png")
    report = import_palette_masks(tmp_path / "img", tmp_path / "msk", tmp_path / "palette.json", tmp_path / "out")
    assert report["snapped_pixels"] == 4 and report["pixels"] == 16
    m = LabeledFolder(tmp_path / "out").load("a")["mask"]
    assert m[:, 0].tolist() == [1, 1, 2, 0]

    coloured[3, 0] = [255, 255, 0]  # a colour that names no class
    Image.fromarray(coloured).save(tmp_path / "msk" / "a.png")
    with pytest.raises(DatasetError, match=r"a\.png: colour \[255, 255, 0\] at \(x=0, y=3\) is not near any"):
        import_palette_masks(tmp_path / "img", tmp_path / "msk", tmp_path / "palette.json", tmp_path / "o2")
    (tmp_path / "msk" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"a\.png: mask missing for image a\.png"):
        import_palette_masks(tmp_path / "img", tmp_path / "msk", tmp_path / "palette.json", tmp_path / "o3")


def test_reader_errors_name_the_file(tmp_path):
    assert main(["render-heads", "--out", str(tmp_path / "d"), "--n", "2", "--seed", "1"]) == 0
    Image.fromarray(np.full((64, 64), 40, np.uint8)).save(tmp_path / "d" / "masks" / "0001_0000000.png")
    with pytest.raises(DatasetError, match=r"0001_0000000\.png: unknown class ids \[40\]"):
        LabeledFolder(tmp_path / "d").load("0001_0000000")
    (tmp_path / "d" / "masks" / "0001_0000001.png").unlink()
    with pytest.raises(DatasetError, match=r"0001_0000001\.png: mask missing"):
        LabeledFolder(tmp_path / "d").load("0001_0000001")
    assert main(["render-heads", "--out", str(tmp_path / "d"), "--n", "2"]) == 1  # no silent overwrite


def test_show_and_mappings(tmp_path):
    assert main(["render-heads", "--out", str(tmp_path / "d"), "--n", "4"]) == 0
    assert main(["show", str(tmp_path / "d"), "--out", str(tmp_path / "sheet.png"), "--n", "4"]) == 0
    assert Image.open(tmp_path / "sheet.png").size == (2 * (3 * 128 + 4) + 4, 2 * (128 + 4) + 4)
    assert load_class_mapping("celebamask19_to_8").classes[3] == "eye"
    with pytest.raises(DatasetError, match="no such mapping"):
        load_class_mapping("nope")


def test_depth_as_16bit_png_with_stated_scale(tmp_path):
    from handsoff.data.layout import DatasetCard, DatasetWriter

    card = DatasetCard(depth_format="png16", depth_scale=1000.0, depth_unit="m")
    writer = DatasetWriter(tmp_path / "d", card)
    depth = np.linspace(0.5, 12.0, 48, dtype=np.float32).reshape(6, 8)
    writer.add("x", np.zeros((6, 8, 3), np.uint8), depth=depth)
    writer.close()
    folder = LabeledFolder(tmp_path / "d")
    assert folder.card.tasks == ["depth"] and (tmp_path / "d" / "depth" / "x.png").is_file()
    assert np.abs(folder.load("x")["depth"] - depth).max() <= 0.5 / 1000 + 1e-6
    Image.fromarray(np.zeros((5, 8), np.uint16)).save(tmp_path / "d" / "depth" / "x.png")
    with pytest.raises(DatasetError, match=r"x\.png: depth is 8x5, image is 8x6"):
        folder.load("x")


def test_the_writer_refuses_wide_class_ids_and_repeated_names(tmp_path):
    """Never a silent change of a label: class 300 does not wrap to 44, a second sample of the same name does not
    overwrite the first."""
    import numpy as np

    from handsoff.data.layout import DatasetCard, DatasetError, DatasetWriter

    classes = [f"c{i}" for i in range(301)]
    writer = DatasetWriter(tmp_path / "out", DatasetCard(classes=classes))
    image = np.zeros((4, 4, 3), np.uint8)
    wide = np.zeros((4, 4), np.int64)
    wide[0, 0] = 300
    with pytest.raises(DatasetError, match="ids 0..300; class ids must be integers in 0..255"):
        writer.add("a", image, mask=wide)
    writer.add("a", image, mask=np.zeros((4, 4), np.int64))
    with pytest.raises(DatasetError, match="two samples named 'a'"):
        writer.add("a", image, mask=np.ones((4, 4), np.int64))
    with pytest.raises(TypeError, match="unknown label masks"):  # a misspelt label is refused, not dropped
        writer.add("b", image, masks=np.ones((4, 4), np.int64))


def test_car_parts_annotation_files_with_their_background_category(tmp_path):
    """The real Car-Parts-Segmentation files list `_background_` among their categories; the shipped mapping
    takes it to background instead of refusing the file."""
    anns = [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": [[2, 2, 18, 2, 18, 18, 2, 18]], "area": 256,
             "iscrowd": 0, "bbox": [2, 2, 16, 16]}]
    ann, images = _coco(tmp_path, ["_background_", "hood"], anns)
    import_coco(ann, images, tmp_path / "out", mapping="carparts18_to_10")
    folder = LabeledFolder(tmp_path / "out")
    mask, names = folder.load("car")["mask"], folder.card.classes
    assert names[mask[10, 10]] == "hood" and names[mask[0, 0]] == "background"


def test_image_modes_convert_exactly_or_are_refused(tmp_path):
    """16-bit grey was read as all-white (PIL clips to 255); it is rescaled, 8-bit data stored as 16 bits comes
    back bit-exact. Grey and palette images expand exactly; float pixels and transparency are refused."""
    from handsoff.data.layout import read_image

    grey = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = read_image(tmp_path / "g16.png")
    assert rgb.dtype == np.uint8 and np.array_equal(rgb, np.repeat(grey[..., None], 3, -1))
    Image.fromarray(grey).save(tmp_path / "g8.png")
    assert np.array_equal(read_image(tmp_path / "g8.png")[..., 1], grey)
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")
    assert np.array_equal(read_image(tmp_path / "p.png")[..., 0], grey)
    Image.fromarray(grey.astype(np.float32), mode="F").save(tmp_path / "f.tiff")
    with pytest.raises(DatasetError, match=r"f\.tiff: image mode F"):
        read_image(tmp_path / "f.tiff")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert read_image(tmp_path / "opaque.png").shape == (4, 4, 3)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "hole.png")
    with pytest.raises(DatasetError, match=r"hole\.png: image has transparent pixels"):
        read_image(tmp_path / "hole.png")
