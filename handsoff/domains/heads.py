"""Procedural 3D heads: the embedded default domain, with exact segmentation, depth and keypoints.

Every scene is a set of ellipsoids (optionally cut by one plane) in front of a tilted, textured background wall,
ray cast analytically in a batch: each ray-ellipsoid hit is a closed-form quadratic, so a 64 px image costs a few
hundred thousand intersections and no iteration. The image is 2x2 supersampled (anti-aliased); the labels come
from one extra ray through each pixel centre, so they are exact for that ray:

* mask: the class id of the first surface hit (``CLASSES``);
* depth: the camera-space z of that hit (metres, say; the camera looks along +z), defined for every pixel since
  the background wall closes the scene;
* keypoints: named 3D points on the primitives' surfaces, projected with the same pinhole camera, visible when
  a ray cast through the keypoint hits nothing in front of it.

Camera convention (OpenCV): x right, y down, z forward; pixel (u, v) has its centre at (u + 0.5, v + 0.5).
Everything about one image derives from ``numpy.random.default_rng([seed, index])``, so any image can be
rendered on its own and shards give the same images as one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from handsoff.data.layout import DatasetCard, DatasetWriter

CLASSES = ["background", "skin", "hair", "eye", "brow", "nose", "mouth", "ear", "neck", "cloth", "glasses", "hat"]
CLASS_COLORS = [(0, 0, 0), (224, 172, 138), (90, 50, 20), (255, 255, 255), (60, 30, 10), (255, 120, 80),
                (200, 30, 60), (170, 110, 200), (130, 180, 90), (40, 90, 200), (255, 230, 0), (0, 200, 200)]
KEYPOINTS = ["left_eye", "right_eye", "left_eye_outer", "left_eye_inner", "right_eye_inner", "right_eye_outer",
             "nose_tip", "left_mouth_corner", "right_mouth_corner", "chin", "left_ear_lobe", "right_ear_lobe"]
# Subject's left/right (the subject's left eye appears on the image's right when they face the camera).
FLIP_PAIRS = [("left_eye", "right_eye"), ("left_eye_outer", "right_eye_outer"),
              ("left_eye_inner", "right_eye_inner"), ("left_mouth_corner", "right_mouth_corner"),
              ("left_ear_lobe", "right_ear_lobe")]
SKELETON = [("left_eye_outer", "left_eye_inner"), ("right_eye_inner", "right_eye_outer"),
            ("left_eye_inner", "nose_tip"), ("right_eye_inner", "nose_tip"), ("nose_tip", "left_mouth_corner"),
            ("nose_tip", "right_mouth_corner"), ("left_mouth_corner", "chin"), ("right_mouth_corner", "chin")]
# Seeds of the splits the project uses, so that no two ever share an image: labeled train (16/50 images), validation
# (checkpoint selection), test (>= 500), oracle (thousands of labeled images; also trains the measuring probe), gan
# (the shipped generator's training set), reference (the real side of Frechet distances).
SPLIT_SEEDS = {"labeled": 0, "validation": 1, "test": 2, "oracle": 3, "gan": 4, "reference": 5}
HAIR_STYLES = ["none", "short", "long", "bun"]
GLASSES_RATE, HAT_RATE = 0.10, 0.05

CLS = {name: i for i, name in enumerate(CLASSES)}
# Surface textures, applied in a primitive's unit-sphere coordinates.
TEX_NONE, TEX_EYE, TEX_MOUTH, TEX_HAIR, TEX_CLOTH = range(5)
# Framings of the camera: focal length in units of half the image width. "bust" (the original framing, the
# default): a 45 degree field of view, heads placed anywhere in the middle of the frame at about 40% of its width,
# shoulders and a cluttered wall around them. "portrait": a 2x longer lens and every face centred on the optical
# axis (a point between the eyes and the mouth, within a few pixels), as aligned-face datasets (FFHQ, CelebA-HQ)
# crop them: eyes, nose and mouth cover 3.1x the pixels, so a 64 px generator and judge can resolve them.
FRAMINGS = {"bust": 2.4, "portrait": 4.8}
# The shipped generator and measuring probe of each framing share a name (handsoff/weights/NAME, .../probes/NAME).
SHIPPED_NAMES = {"bust": "heads-64", "portrait": "heads-portrait-64"}
# The framing of `handsoff demo` and `handsoff benchmark` unless told otherwise: portrait, whose generator draws
# eyes, noses and mouths (the bust one barely does). The renderer's own default stays bust, reproducible as before.
DEFAULT_FRAMING = "portrait"
FOCAL = FRAMINGS["bust"]
# The head-local point a portrait puts on the optical axis (between the eyes at y = -0.08 and the mouth at 0.5).
PORTRAIT_CENTRE = np.array([0.0, 0.15, -0.6])


@dataclass
class Primitive:
    """An ellipsoid in camera space, optionally cut to the half-space clip_normal . p <= clip_offset."""

    center: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3), columns are the local axes
    radii: np.ndarray  # (3,)
    class_id: int
    albedo: np.ndarray  # (3,) in [0, 1]
    specular: float = 0.1
    texture: int = TEX_NONE
    clip_normal: np.ndarray | None = None
    clip_offset: float = 0.0
    iris: np.ndarray | None = None  # TEX_EYE: iris colour
    mouth_open: float = 0.0  # TEX_MOUTH: height of the dark opening, 0..1


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rz(roll) @ Rx(pitch) @ Ry(yaw), angles in radians, camera axes (x right, y down, z forward)."""
    cy, sy, cp, sp, cr, sr = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch), math.cos(roll), \
        math.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


def sample_factors(rng: np.random.Generator, framing: str = "bust") -> dict:
    """All random choices of one scene, as plain JSON-able values (they are saved for analysis).

    A "portrait" draws the same values as a "bust" from the same stream, then re-places the head so that its face
    is centred (``PORTRAIT_CENTRE`` on the optical axis, jittered by a few hundredths) at a depth of 4.6-5.0; the
    factors record the framing, which ``render_factors`` reads.
    """
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, got {framing!r}")
    factors = _sample_bust(rng)
    if framing == "portrait":
        pose = _rotation(math.radians(factors["yaw"]), math.radians(factors["pitch"]), math.radians(factors["roll"]))
        face = pose @ PORTRAIT_CENTRE * factors["head_scale"]
        jitter_x, jitter_y, depth = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(4.6, 5.0)
        factors.update(head_x=float(jitter_x - face[0]), head_y=float(jitter_y - face[1]),
                       head_z=float(depth - face[2]), framing="portrait")
    return factors


def _sample_bust(rng: np.random.Generator) -> dict:
    u = rng.uniform

    def colour(lo, hi):
        return [float(v) for v in rng.uniform(lo, hi)]

    skin_tone = u(0.25, 1.0)
    skin = np.array([0.95, 0.75, 0.62]) * skin_tone + np.array([0.35, 0.2, 0.12]) * (1 - skin_tone)
    hair_base = [(0.08, 0.06, 0.05), (0.35, 0.2, 0.1), (0.75, 0.6, 0.35), (0.55, 0.25, 0.1), (0.6, 0.6, 0.6)]
    hair = np.array(hair_base[rng.integers(len(hair_base))]) * u(0.8, 1.2)
    return dict(
        yaw=float(u(-45, 45)), pitch=float(u(-20, 20)), roll=float(u(-15, 15)),
        head_x=float(u(-0.3, 0.3)), head_y=float(u(-0.35, 0.05)), head_z=float(u(4.3, 5.3)),
        head_scale=float(u(0.85, 1.1)), head_width=float(u(0.7, 0.84)), head_height=float(u(0.95, 1.08)),
        jaw_width=float(u(0.5, 0.66)), eye_spacing=float(u(0.26, 0.33)), eye_size=float(u(0.1, 0.13)),
        nose_length=float(u(0.16, 0.26)), ear_size=float(u(0.16, 0.22)),
        skin=[float(v) for v in np.clip(skin * u(0.9, 1.1, 3), 0, 1)],
        hair_style=HAIR_STYLES[int(rng.choice(4, p=[0.12, 0.48, 0.25, 0.15]))],
        hair=[float(v) for v in np.clip(hair, 0, 1)],
        iris=colour((0.05, 0.1, 0.05), (0.4, 0.6, 0.8)),
        lips=colour((0.55, 0.15, 0.15), (0.85, 0.45, 0.45)),
        cloth=colour((0.05, 0.05, 0.05), (0.95, 0.95, 0.95)),
        mouth_open=float(u(0, 1) ** 2), mouth_width=float(u(0.75, 1.25)), brow_raise=float(u(-0.04, 0.08)),
        gaze_x=float(u(-0.25, 0.25)), gaze_y=float(u(-0.15, 0.15)),
        glasses=bool(u() < GLASSES_RATE), glasses_tint=colour((0.0, 0.0, 0.0), (0.4, 0.4, 0.5)),
        hat=bool(u() < HAT_RATE), hat_colour=colour((0.05, 0.05, 0.05), (0.9, 0.9, 0.9)),
        light_dir=[float(v) for v in (u(-1, 1), u(-0.3, 1), u(0.4, 1.0))],
        light_colour=colour((0.85, 0.8, 0.75), (1.0, 1.0, 1.0)), light_strength=float(u(0.6, 1.0)),
        ambient=float(u(0.35, 0.6)),
        bg_depth=float(u(10.0, 14.0)), bg_tilt_x=float(u(-0.4, 0.4)), bg_tilt_y=float(u(-0.4, 0.4)),
        bg_colours=[colour((0, 0, 0), (1, 1, 1)) for _ in range(2)], bg_angle=float(u(0, 2 * math.pi)),
        bg_shapes=[dict(x=float(u(-1.5, 1.5)), y=float(u(-1.5, 1.5)), size=float(u(0.1, 0.6)),
                        kind=int(rng.integers(2)), colour=colour((0, 0, 0), (1, 1, 1)))
                   for _ in range(int(rng.integers(2, 7)))],
        bg_texture=[[float(u(2, 12)), float(u(0, 2 * math.pi)), float(u(0, 2 * math.pi)), float(u(0.02, 0.12))]
                    for _ in range(3)],
        clutter=[dict(x=float(u(-3, 3)), y=float(u(-3, 3)), z=float(u(8.5, 10)), r=float(u(0.3, 0.9)),
                      colour=colour((0, 0, 0), (1, 1, 1))) for _ in range(int(rng.integers(0, 3)))],
    )


def _surface_z(rx: float, ry: float, rz: float, x: float, y: float) -> float:
    """z of the front (camera-facing, -z) surface of an origin-centred ellipsoid at (x, y)."""
    return -rz * math.sqrt(max(1 - (x / rx) ** 2 - (y / ry) ** 2, 0.0))


def build_scene(f: dict) -> tuple[list[Primitive], dict[str, np.ndarray]]:
    """The primitives of one scene and its 3D keypoints (camera space), from its factors."""
    s = f["head_scale"]
    pose = _rotation(math.radians(f["yaw"]), math.radians(f["pitch"]), math.radians(f["roll"]))
    centre = np.array([f["head_x"], f["head_y"], f["head_z"]])

    def to_cam(p):  # head-local point -> camera space
        return centre + pose @ (np.asarray(p, float) * s)

    prims: list[Primitive] = []

    def add(local_centre, radii, cls, albedo, rot=np.eye(3), head=True, **kw):
        c = to_cam(local_centre) if head else np.asarray(local_centre, float)
        r = np.asarray(radii, float) * (s if head else 1.0)
        prims.append(Primitive(c, (pose @ rot) if head else rot, r, cls, np.asarray(albedo, float), **kw))

    skin, hair = np.array(f["skin"]), np.array(f["hair"])
    rx, ry, rz = f["head_width"], f["head_height"], 0.86
    add((0, 0, 0), (rx, ry, rz), CLS["skin"], skin, specular=0.15)
    jaw = (f["jaw_width"], 0.62, 0.68)
    jaw_c = (0, 0.38, -0.12)
    add(jaw_c, jaw, CLS["skin"], skin, specular=0.15)

    keypoints: dict[str, np.ndarray] = {}
    gaze = np.array([f["gaze_x"], f["gaze_y"], -1.0])
    gaze /= np.linalg.norm(gaze)
    er = f["eye_size"]
    for side, sx in (("left", 1.0), ("right", -1.0)):  # subject's left is +x (image right) when facing us
        ex, ey = sx * f["eye_spacing"], -0.08
        ez = _surface_z(rx, ry, rz, ex, ey) + er * 0.55
        add((ex, ey, ez), (er, er, er), CLS["eye"], (0.95, 0.95, 0.92), rot=_look_rotation(gaze), specular=0.6,
            texture=TEX_EYE, iris=np.array(f["iris"]))
        keypoints[f"{side}_eye"] = to_cam(np.array([ex, ey, ez]) + er * gaze)
        outer, inner = np.array([sx * 0.55, 0, -0.835]), np.array([-sx * 0.55, 0, -0.835])
        keypoints[f"{side}_eye_outer"] = to_cam(np.array([ex, ey, ez]) + er * outer)
        keypoints[f"{side}_eye_inner"] = to_cam(np.array([ex, ey, ez]) + er * inner)
        by = ey - 0.2 - f["brow_raise"]
        add((ex, by, _surface_z(rx, ry, rz, ex, by) + 0.02), (0.15, 0.03, 0.05), CLS["brow"], hair * 0.8,
            rot=_rotation(0, 0, -sx * 0.12))
        ear_y = 0.05
        ear_c = (sx * (rx + 0.01), ear_y, 0.05)
        er_ = f["ear_size"]
        add(ear_c, (0.07, er_, 0.13), CLS["ear"], skin * 0.95, specular=0.1)
        keypoints[f"{side}_ear_lobe"] = to_cam(np.array(ear_c) + np.array([0, er_, 0]))

    nl = f["nose_length"]
    ny = 0.1
    nz = min(_surface_z(*jaw, 0, ny - jaw_c[1]) + jaw_c[2], _surface_z(rx, ry, rz, 0, ny))
    nose_c = np.array([0, ny, nz + 0.02])
    nose_r = np.array([0.09, nl, 0.13])
    nose_rot = _rotation(0, -0.35, 0)
    add(nose_c, nose_r, CLS["nose"], skin * 1.02, rot=nose_rot, specular=0.25)
    tip_dir = np.array([0, 0.3, -1.0])
    tip_dir /= np.linalg.norm(tip_dir)
    keypoints["nose_tip"] = to_cam(nose_c + nose_rot @ (nose_r * tip_dir))

    my = 0.5
    mz = min(_surface_z(*jaw, 0, my - jaw_c[1]) + jaw_c[2], _surface_z(rx, ry, rz, 0, my))
    mouth_c = np.array([0, my, mz + 0.035])
    mouth_r = np.array([0.17 * f["mouth_width"], 0.05 + 0.05 * f["mouth_open"], 0.07])
    add(mouth_c, mouth_r, CLS["mouth"], f["lips"], texture=TEX_MOUTH, specular=0.3, mouth_open=f["mouth_open"])
    corner = np.array([0.9, 0, -math.sqrt(1 - 0.9**2)])
    keypoints["left_mouth_corner"] = to_cam(mouth_c + mouth_r * corner)
    keypoints["right_mouth_corner"] = to_cam(mouth_c + mouth_r * corner * np.array([-1, 1, 1]))
    chin_dir = np.array([0, 0.75, -0.66])
    chin_dir /= np.linalg.norm(chin_dir)
    keypoints["chin"] = to_cam(np.array(jaw_c) + np.array(jaw) * chin_dir)

    # Hair: a shell around the skull cut by a plane that rises towards the face; long hair and buns add volume.
    if f["hair_style"] != "none":
        n = pose @ np.array([0, 1.0, -0.9]) / math.hypot(1.0, 0.9)
        hairline = centre + pose @ (np.array([0, -0.35, -0.6]) * s)
        add((0, -0.03, 0.03), (rx + 0.07, ry + 0.06, rz + 0.08), CLS["hair"], hair, texture=TEX_HAIR,
            specular=0.3, clip_normal=n, clip_offset=float(n @ hairline))
        if f["hair_style"] == "long":
            add((0, 0.55, 0.4), (rx + 0.12, 1.05, 0.5), CLS["hair"], hair, texture=TEX_HAIR, specular=0.3)
        if f["hair_style"] == "bun":
            add((0, -0.75, 0.55), (0.33, 0.33, 0.33), CLS["hair"], hair, texture=TEX_HAIR, specular=0.3)

    if f["glasses"]:
        tint = np.array(f["glasses_tint"])
        for sx in (1.0, -1.0):
            ex = sx * f["eye_spacing"]
            gz = _surface_z(rx, ry, rz, ex, -0.08) - 0.1
            add((ex, -0.08, gz), (0.16, 0.12, 0.02), CLS["glasses"], tint, specular=0.9)
        add((0, -0.1, _surface_z(rx, ry, rz, 0, -0.1) - 0.14), (0.1, 0.02, 0.02), CLS["glasses"], tint * 0.5)

    if f["hat"]:
        hc = np.array(f["hat_colour"])
        n = pose @ np.array([0, 1.0, 0])
        brim_y = -0.42
        add((0, -0.05, 0.02), (rx + 0.1, ry + 0.1, rz + 0.1), CLS["hat"], hc, clip_normal=n,
            clip_offset=float(n @ to_cam((0, brim_y, 0))))
        add((0, brim_y, -0.15), (rx + 0.45, 0.035, rz + 0.45), CLS["hat"], hc * 0.85)

    # Neck follows a third of the head's pose; the shoulders stay put.
    neck_rot = _rotation(math.radians(f["yaw"]) / 3, math.radians(f["pitch"]) / 3, math.radians(f["roll"]) / 3)
    neck_c = centre + neck_rot @ (np.array([0, 1.05, 0.12]) * s)
    prims.append(Primitive(neck_c, neck_rot, np.array([0.36, 0.65, 0.36]) * s, CLS["neck"], skin * 0.9,
                           specular=0.1))
    prims.append(Primitive(centre + np.array([0, 2.05, 0.35]) * s, np.eye(3), np.array([1.55, 0.72, 0.75]) * s,
                           CLS["cloth"], np.array(f["cloth"]), specular=0.05, texture=TEX_CLOTH))
    for c in f["clutter"]:
        prims.append(Primitive(np.array([c["x"], c["y"], c["z"]]), np.eye(3), np.full(3, c["r"]),
                               CLS["background"], np.array(c["colour"]), specular=0.2))
    return prims, {name: keypoints[name] for name in KEYPOINTS}


def _look_rotation(forward: np.ndarray) -> np.ndarray:
    """A rotation whose local -z axis points along ``forward`` (used to aim the eyes' iris)."""
    z = -forward / np.linalg.norm(forward)
    x = np.cross(np.array([0.0, 1.0, 0.0]), z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


MAX_PRIMITIVES = 24


def _pack(scenes: list[list[Primitive]]) -> dict[str, torch.Tensor]:
    """Stack per-scene primitives into padded (B, K, ...) tensors; padding slots never hit."""
    b = len(scenes)
    k = MAX_PRIMITIVES
    out = dict(origin=np.zeros((b, k, 3)), inv=np.zeros((b, k, 3, 3)), clip_n=np.zeros((b, k, 3)),
               clip_h=np.full((b, k), np.inf), cls=np.zeros((b, k), np.int64), albedo=np.zeros((b, k, 3)),
               spec=np.zeros((b, k)), tex=np.zeros((b, k), np.int64), active=np.zeros((b, k), bool),
               iris=np.zeros((b, k, 3)), mouth_open=np.zeros((b, k)), rot=np.zeros((b, k, 3, 3)))
    for i, prims in enumerate(scenes):
        assert len(prims) <= k, f"scene has {len(prims)} primitives, more than {k}"
        for j, p in enumerate(prims):
            inv = np.diag(1.0 / p.radii) @ p.rotation.T  # camera -> unit-sphere coordinates
            out["inv"][i, j] = inv
            out["origin"][i, j] = -inv @ p.center  # the camera (at 0) in unit-sphere coordinates
            out["rot"][i, j] = p.rotation
            if p.clip_normal is not None:
                out["clip_n"][i, j], out["clip_h"][i, j] = p.clip_normal, p.clip_offset
            out["cls"][i, j], out["albedo"][i, j], out["spec"][i, j] = p.class_id, p.albedo, p.specular
            out["tex"][i, j], out["active"][i, j] = p.texture, True
            if p.iris is not None:
                out["iris"][i, j] = p.iris
            out["mouth_open"][i, j] = p.mouth_open
    return {key: torch.from_numpy(v).float() if v.dtype == np.float64 else torch.from_numpy(v)
            for key, v in out.items()}


def cast_rays(scene: dict[str, torch.Tensor], dirs: torch.Tensor):
    """Nearest ellipsoid hit along rays from the camera centre.

    dirs: (B, R, 3) or (R, 3) ray directions with z = 1, so the ray parameter t *is* the camera-space depth.
    Returns t (B, R) (inf where nothing is hit), the index of the primitive hit (B, R) and whether the far side
    of that primitive was hit (B, R), which happens when the near side is clipped away.
    """
    if dirs.ndim == 2:
        dirs = dirs[None].expand(scene["inv"].shape[0], -1, -1)
    d = torch.einsum("bkij,brj->bkri", scene["inv"], dirs)  # ray directions in unit-sphere coordinates
    o = scene["origin"][:, :, None, :]
    a = (d * d).sum(-1)
    half_b = (o * d).sum(-1)
    c = (o * o).sum(-1) - 1
    disc = half_b * half_b - a * c
    root = disc.clamp_min(0).sqrt()
    t0, t1 = (-half_b - root) / a, (-half_b + root) / a
    hit = (disc > 0) & scene["active"][:, :, None]
    nd = torch.einsum("bki,bri->bkr", scene["clip_n"], dirs)
    h = scene["clip_h"][:, :, None]
    ok0 = hit & (t0 > 0) & (t0 * nd <= h)
    ok1 = hit & (t1 > 0) & (t1 * nd <= h)
    inf = torch.full_like(t0, math.inf)
    t = torch.where(ok0, t0, torch.where(ok1, t1, inf))
    t_min, index = t.min(dim=1)
    far = torch.gather(~ok0 & ok1, 1, index[:, None]).squeeze(1)
    return t_min, index, far


def _background(factors: list[dict], dirs: torch.Tensor):
    """Depth (B, R) and colour (B, R, 3) of the tilted, textured background wall."""
    b = len(factors)
    depth0 = torch.tensor([f["bg_depth"] for f in factors])[:, None]
    tx = torch.tensor([f["bg_tilt_x"] for f in factors])[:, None]
    ty = torch.tensor([f["bg_tilt_y"] for f in factors])[:, None]
    # Plane z = depth0 + tx * x + ty * y; along the ray p = t * d: t = depth0 / (1 - tx dx - ty dy).
    t = depth0 / (1 - tx * dirs[None, :, 0] - ty * dirs[None, :, 1])
    x, y = t * dirs[None, :, 0] / depth0 * 4, t * dirs[None, :, 1] / depth0 * 4  # wall coordinates, ~[-2, 2]
    angle = torch.tensor([f["bg_angle"] for f in factors])[:, None]
    g = ((x * torch.cos(angle) + y * torch.sin(angle)) / 4 + 0.5).clamp(0, 1)[..., None]
    c0 = torch.tensor([f["bg_colours"][0] for f in factors])[:, None, :]
    c1 = torch.tensor([f["bg_colours"][1] for f in factors])[:, None, :]
    colour = c0 * (1 - g) + c1 * g
    for i, f in enumerate(factors):
        for shape in f["bg_shapes"]:
            dx, dy = x[i] - shape["x"], y[i] - shape["y"]
            inside = (dx * dx + dy * dy < shape["size"] ** 2) if shape["kind"] == 0 else \
                (dx.abs() < shape["size"]) & (dy.abs() < shape["size"] * 0.7)
            colour[i][inside] = torch.tensor(shape["colour"])
        for freq, phase, orient, amp in f["bg_texture"]:
            wave = torch.sin(freq * (x[i] * math.cos(orient) + y[i] * math.sin(orient)) + phase)
            colour[i] = colour[i] + amp * wave[:, None]
    normal = torch.stack([tx, ty, -torch.ones_like(tx)], -1).expand(b, dirs.shape[0], 3)
    return t, colour.clamp(0, 1), normal


def _shade(scene, factors, dirs, t, index, far):
    """Colour (B, R, 3) in [0, 1] and class ids (B, R) of the rays' first hits, background included."""
    b, r = t.shape
    bg_t, bg_colour, bg_normal = _background(factors, dirs)
    is_bg = bg_t < t
    depth = torch.where(is_bg, bg_t, t)

    def pick(key):
        v = scene[key]
        idx = index.reshape(b, r, *([1] * (v.ndim - 2))).expand(b, r, *v.shape[2:])
        return torch.gather(v, 1, idx)

    p = depth[..., None] * dirs[None]
    inv, origin = pick("inv"), pick("origin")
    q = torch.einsum("brij,brj->bri", inv, p) + origin  # hit point in unit-sphere coordinates
    normal = torch.einsum("brji,brj->bri", inv, q)  # gradient of |inv (p - c)|^2, up to a factor 2
    normal = torch.where(far[..., None], -normal, normal)
    normal = torch.where(is_bg[..., None], bg_normal, normal)
    normal = normal / normal.norm(dim=-1, keepdim=True)

    albedo = pick("albedo")
    tex = pick("tex")
    local = torch.einsum("brji,brj->bri", pick("rot"), q)  # unit-sphere point in the primitive's own axes
    # Eyes: iris and pupil around the local -z axis (the gaze).
    eye = tex == TEX_EYE
    radial = local[..., :2].norm(dim=-1)
    front = local[..., 2] < 0
    iris = eye & front & (radial < 0.55)
    albedo = torch.where(iris[..., None], pick("iris"), albedo)
    albedo = torch.where((eye & front & (radial < 0.25))[..., None], torch.full_like(albedo, 0.03), albedo)
    # Mouth: a dark opening between the lips, as tall as the mouth is open.
    opening = (tex == TEX_MOUTH) & (local[..., 1].abs() < 0.6 * pick("mouth_open")) & (local[..., 0].abs() < 0.85)
    albedo = torch.where(opening[..., None], torch.tensor([0.25, 0.05, 0.05]), albedo)
    # Hair strands and cloth weave: a little high-frequency variation.
    strands = 1 + 0.18 * torch.sin(40 * torch.atan2(local[..., 0], local[..., 1] + 1.5))
    weave = 1 + 0.08 * torch.sin(60 * local[..., 0]) * torch.sin(60 * local[..., 1])
    shade_tex = torch.where(tex == TEX_HAIR, strands, torch.where(tex == TEX_CLOTH, weave, torch.ones_like(weave)))
    albedo = torch.where(is_bg[..., None], bg_colour, albedo * shade_tex[..., None])

    light = torch.tensor([f["light_dir"] for f in factors])
    light = -(light / light.norm(dim=-1, keepdim=True))[:, None, :]  # towards the light
    view = -dirs / dirs.norm(dim=-1, keepdim=True)
    half = light + view[None]
    half = half / half.norm(dim=-1, keepdim=True)
    diffuse = (normal * light).sum(-1).clamp_min(0)
    spec = (normal * half).sum(-1).clamp_min(0) ** 24 * torch.where(is_bg, torch.zeros_like(t), pick("spec"))
    lc = torch.tensor([f["light_colour"] for f in factors])[:, None, :]
    strength = torch.tensor([f["light_strength"] for f in factors])[:, None, None]
    ambient = torch.tensor([f["ambient"] for f in factors])[:, None, None]
    colour = albedo * (ambient + strength * lc * diffuse[..., None]) + strength * lc * spec[..., None]
    classes = torch.where(is_bg, torch.zeros_like(index), pick("cls"))
    return colour.clamp(0, 1), classes, depth


def _pixel_rays(size: int, offsets: list[tuple[float, float]], focal: float = FOCAL) -> torch.Tensor:
    """(len(offsets) * size * size, 3) ray directions (z = 1) through sub-pixel positions of every pixel."""
    f = focal * size / 2
    v, u = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    rays = []
    for du, dv in offsets:
        x = (u + du - size / 2) / f
        y = (v + dv - size / 2) / f
        rays.append(torch.stack([x, y, torch.ones_like(x)], -1).reshape(-1, 3))
    return torch.cat(rays)


def project(points: np.ndarray, size: int, focal: float = FOCAL) -> np.ndarray:
    """Camera-space points (..., 3) -> pixel coordinates (..., 2) (continuous; pixel centres at +0.5)."""
    f = focal * size / 2
    return points[..., :2] / points[..., 2:3] * f + size / 2


@dataclass
class RenderedHeads:
    """A batch of rendered scenes. images (B, H, W, 3) uint8; masks (B, H, W) uint8 class ids; depth (B, H, W)
    float32 camera z; keypoints (B, K, 3) float32 pixel (x, y) and COCO visibility v (2 visible, 1 occluded,
    0 outside the image); points3d (B, K, 3) the keypoints in camera space; factors: one dict per image."""

    images: np.ndarray
    masks: np.ndarray
    depth: np.ndarray
    keypoints: np.ndarray
    points3d: np.ndarray
    factors: list[dict]


SUPERSAMPLES = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]


@torch.no_grad()
def render_factors(factors: list[dict], size: int = 64) -> RenderedHeads:
    """Render scenes given their factors (see ``sample_factors``; all of one framing)."""
    framings = {f.get("framing", "bust") for f in factors}
    if len(framings) != 1:
        raise ValueError(f"one batch renders one framing, got {sorted(framings)}")
    focal = FRAMINGS[framings.pop()]
    scenes, kps = zip(*(build_scene(f) for f in factors))
    scene = _pack(list(scenes))
    b, n = len(factors), size * size
    dirs = _pixel_rays(size, SUPERSAMPLES + [(0.5, 0.5)], focal)
    t, index, far = cast_rays(scene, dirs)
    colour, classes, depth = _shade(scene, factors, dirs, t, index, far)
    image = colour[:, :4 * n].reshape(b, 4, size, size, 3).mean(1)
    images = (image * 255).round().to(torch.uint8).numpy()
    masks = classes[:, 4 * n:].reshape(b, size, size).to(torch.uint8).numpy()
    depth = depth[:, 4 * n:].reshape(b, size, size).numpy().astype(np.float32)

    points = np.stack([np.stack([kp[name] for name in KEYPOINTS]) for kp in kps])  # (B, K, 3)
    # Visibility: a ray through the keypoint hits nothing (head or background clutter) before it.
    kp_dirs = torch.from_numpy(points / points[..., 2:3]).float()
    t_kp, _, _ = cast_rays(scene, kp_dirs)
    visible = t_kp.numpy() >= points[..., 2] * (1 - 1e-4)
    xy = project(points, size, focal)
    inside = (xy >= 0).all(-1) & (xy < size).all(-1)
    v = np.where(inside, np.where(visible, 2, 1), 0)
    keypoints = np.concatenate([xy, v[..., None]], -1).astype(np.float32)
    return RenderedHeads(images, masks, depth, keypoints, points.astype(np.float32), list(factors))


def render_heads(seed: int, indices, size: int = 64, framing: str = "bust") -> RenderedHeads:
    """Render the scenes of the given global indices for ``seed`` (each from its own (seed, index) stream)."""
    factors = [sample_factors(np.random.default_rng([int(seed), int(i)]), framing) for i in indices]
    return render_factors(factors, size)


def probe_targets(factors: list[dict], masks: np.ndarray) -> np.ndarray:
    """What the measuring probe learns to predict from an image: pose, placement, colours, hair style,
    accessories, expression, lighting, background colours and the area fraction of every class. (N, 47) float."""
    rows = []
    for f, mask in zip(factors, masks):
        style = [float(f["hair_style"] == s) for s in HAIR_STYLES]
        areas = np.bincount(mask.reshape(-1), minlength=len(CLASSES)) / mask.size
        rows.append([f["yaw"] / 45, f["pitch"] / 20, f["roll"] / 15, f["head_x"], f["head_y"], f["head_z"],
                     f["head_scale"], *f["skin"], *f["hair"], *style, *f["cloth"], *f["lips"], float(f["glasses"]),
                     float(f["hat"]), f["mouth_open"], *f["light_dir"], f["ambient"], f["light_strength"],
                     *f["bg_colours"][0], *f["bg_colours"][1], *areas])
    return np.asarray(rows, dtype=np.float64)


def dataset_card(size: int, seed: int, framing: str = "bust") -> DatasetCard:
    """The dataset card of rendered heads: classes, keypoints and how depth is stored."""
    source = {"domain": "heads", "renderer": "handsoff.domains.heads", "size": size, "seed": seed}
    if framing != "bust":  # bust datasets' cards stay as they were written before framings existed
        source["framing"] = framing
    return DatasetCard(classes=list(CLASSES), colors=list(CLASS_COLORS), keypoint_names=list(KEYPOINTS),
                       skeleton=list(SKELETON), keypoint_flip_pairs=list(FLIP_PAIRS), depth_format="npy",
                       depth_unit="scene units (camera z)", source=source)


def write_heads_dataset(out, n: int, seed: int = 0, size: int = 64, start: int = 0, batch: int = 32,
                        overwrite: bool = False, progress: bool = True, framing: str = "bust"):
    """Render images ``start .. start + n - 1`` of ``seed`` into the standard layout at ``out``."""
    from tqdm import tqdm

    writer = DatasetWriter(out, dataset_card(size, seed, framing), overwrite=overwrite)
    with tqdm(total=n, desc="rendering heads", unit="img", disable=not progress) as bar:
        for first in range(start, start + n, batch):
            indices = range(first, min(first + batch, start + n))
            r = render_heads(seed, indices, size, framing)
            for j, i in enumerate(indices):
                writer.add(f"{seed:04d}_{i:07d}", r.images[j], mask=r.masks[j], depth=r.depth[j],
                           keypoints=r.keypoints[j], factors={"index": i, **r.factors[j]})
            bar.update(len(indices))
    return writer.close()
