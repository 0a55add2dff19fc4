"""Reading and writing generator checkpoints (StyleGAN2 and StyleGAN3).

Three formats load into the same modules (``Generator`` or ``StyleGAN3Generator``, and ``Discriminator``):

* handsoff's own: a directory with ``config.json`` and ``model.safetensors`` (keys ``G.*`` and ``D.*``);
* rosinality/stylegan2-pytorch ``.pt`` files (``g_ema``, ``latent_avg``, optional ``g``, ``d``, ``args``,
  optimizer states), read with ``torch.load(weights_only=True)`` and only ``argparse.Namespace`` allow-listed;
* NVIDIA stylegan2-ada-pytorch / stylegan3 (configs "stylegan2", "stylegan3-t", "stylegan3-r") ``.pkl`` network
  pickles, read by a restricted unpickler that rebuilds the tensor tree of each pickled network without importing
  or running the module source stored in the pickle.

A StyleGAN2 config (resolution, widths, mapping depth) is inferred from the tensors, so no side information is
needed; a StyleGAN3 config comes from the constructor arguments the pickle records (its signal schedule cannot be
read off tensor shapes) and is then checked against the tensors. Shipped generators (``handsoff/weights/NAME``)
load by name.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from handsoff.errors import DataError, OutputError
from handsoff.fileio import atomic_folder, check_model_folder
from handsoff.generator import ops
from handsoff.generator.networks import Discriminator, Generator
from handsoff.generator.stylegan3 import StyleGAN3Generator
from handsoff.generator.trunk import Trunk

# The trunk classes by ``config["architecture"]`` (absent means StyleGAN2: configs written before StyleGAN3).
# A new generator registers here; see trunk.py.
ARCHITECTURES = {"stylegan2": Generator, "stylegan3": StyleGAN3Generator}

FORMAT_NAME = "handsoff-stylegan2"
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "weights"
# Config keys that change how a network runs but not its parameters, so a caller may override them at load time.
RUNTIME_KEYS = ("num_fp16_res", "conv_clamp")


class CheckpointError(DataError):
    """A checkpoint that cannot be read; the message names the file and what is wrong."""


@dataclass
class Networks:
    """What a checkpoint holds: the (EMA) generator, the discriminator if present, and where they came from."""

    generator: Trunk
    discriminator: Discriminator | None
    source_format: str
    path: Path


def shipped_names() -> list[str]:
    """Names of the generators shipped inside the package (loadable as ``load_generator(name)``)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "config.json").is_file())


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A path that exists, or the directory of a shipped generator of that name; else a clear error."""
    path = Path(path_or_name)
    if path.exists():
        return path
    if str(path_or_name) in shipped_names():
        return SHIPPED_DIR / str(path_or_name)
    raise CheckpointError(f"{path_or_name}: no such file, and not a shipped generator name "
                          f"(shipped: {', '.join(shipped_names()) or 'none'})")


def load_networks(path_or_name: str | os.PathLike, device: str | torch.device = "cpu",
                  **overrides) -> Networks:
    """Load generator (and discriminator, where the file has one) from any supported format.

    ``overrides`` may set runtime-only config keys (``num_fp16_res``, ``conv_clamp``) on both networks. On CPU
    the networks run in float32 unless ``num_fp16_res`` is given, whatever the file declares (NVIDIA pickles say
    ``num_fp16_res=4``): float16 is a CUDA speed-up in the reference code, and bf16 on a CPU changes the images
    by up to 0.05 and is emulated (slow) without AVX512-BF16 / AMX, so reduced precision there is opt-in.
    """
    bad = set(overrides) - set(RUNTIME_KEYS)
    if bad:
        raise TypeError(f"only {RUNTIME_KEYS} can be overridden at load time, got {sorted(bad)}")
    if torch.device(device).type == "cpu":
        overrides = {"num_fp16_res": 0, **overrides}
    path = resolve_checkpoint(path_or_name)
    fmt = detect_format(path)
    reader = {"handsoff": _read_handsoff, "rosinality": _read_rosinality, "nvidia": _read_nvidia}[fmt]
    g_state, g_hints, d_state, d_hints = reader(path)
    cls = generator_class(g_hints, path)
    inferred = infer_generator_config(g_state, path) if cls is Generator else {}
    g_config = {**inferred, **g_hints, **overrides}
    estimate_w_avg = "mapping.w_avg" not in g_state
    if estimate_w_avg:
        warnings.warn(f"{path}: no average latent stored; w_avg is estimated from 10,000 seeded samples",
                      stacklevel=2)
        g_state = {**g_state, "mapping.w_avg": torch.zeros(g_config["w_dim"])}
    G = _build(cls, g_state, g_config, path)
    if estimate_w_avg:
        G.mapping.update_w_avg()
    D = None
    if d_state is not None:
        D = _build(Discriminator, d_state, {**infer_discriminator_config(d_state, path), **d_hints, **overrides},
                   path)
    G.eval().requires_grad_(False)
    return Networks(G.to(device), D.to(device) if D is not None else None, fmt, path)


def generator_class(config: dict, path: Path | str = "config") -> type:
    """The network class a generator config describes (``architecture``, StyleGAN2 when absent)."""
    name = config.get("architecture", "stylegan2")
    if name not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown generator architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def load_generator(path_or_name: str | os.PathLike, device: str | torch.device = "cpu", **overrides) -> Trunk:
    """The generator of a checkpoint (EMA weights where the file has them), in eval mode, on ``device``."""
    return load_networks(path_or_name, device, **overrides).generator


def load_discriminator(path_or_name: str | os.PathLike, device: str | torch.device = "cpu",
                       **overrides) -> Discriminator:
    nets = load_networks(path_or_name, device, **overrides)
    if nets.discriminator is None:
        raise CheckpointError(f"{nets.path}: holds no discriminator")
    return nets.discriminator


def save_networks(out_dir: str | os.PathLike, generator: Trunk, discriminator: Discriminator | None = None,
                  metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` atomically (temporary dir, then rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputError(f"{out_dir}: already exists (pass overwrite=True / --force to replace it)")
    if out_dir.exists() and any(out_dir.iterdir()):  # replaced as a whole: only ever a generator folder
        if not (out_dir / "config.json").is_file():
            raise OutputError(f"{out_dir}: is not a handsoff generator folder; --force replaces only those, "
                              "choose another output")
        check_model_folder(out_dir, FORMAT_NAME)
    tensors = {f"G.{k}": v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    if discriminator is not None:
        tensors.update({f"D.{k}": v.detach().cpu().contiguous() for k, v in discriminator.state_dict().items()})
    config = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "generator": generator.config,
              "discriminator": discriminator.config if discriminator is not None else None,
              "metadata": metadata or {}}
    def write(tmp: Path) -> None:
        save_file(tensors, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    return atomic_folder(out_dir, write)


def detect_format(path: Path) -> str:
    """'handsoff' (directory or its model.safetensors), 'rosinality' (torch.save file) or 'nvidia' (.pkl)."""
    if path.is_dir() or path.suffix == ".safetensors" or path.name == "config.json":
        return "handsoff"
    if zipfile.is_zipfile(path):
        return "rosinality"  # torch.save's zip container
    if path.suffix == ".pkl":
        return "nvidia"
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path}: empty file")
    # torch.save's legacy format starts with a pickled magic number (protocol 2, LONG1 opcode).
    return "rosinality" if head[:3] == b"\x80\x02\x8a" else "nvidia"


# ---------------------------------------------------------------------------------------------------------------
# Config inference and module construction


def _fit_channel_base(channels: dict[int, int], path: Path) -> tuple[int, int]:
    channel_max = max(channels.values())
    top = max(channels)
    candidates = sorted({c * r for r, c in channels.items()} | {channel_max * top})
    for base in candidates:
        if all(min(base // r, channel_max) == c for r, c in channels.items()):
            return base, channel_max
    raise CheckpointError(f"{path}: channels per resolution {dict(sorted(channels.items()))} do not follow "
                          "min(channel_base // res, channel_max) for any channel_base; unsupported layout")


def _resolutions(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}b(\d+)\.", k))})


def _first_dim(state: dict[str, torch.Tensor], prefix: str, names: tuple[str, ...]) -> int:
    """Size of dim 0 of the first of several tensors that all carry it (so one missing key stays reportable)."""
    for name in names:
        if prefix + name in state:
            return state[prefix + name].shape[0]
    raise KeyError(prefix + names[0])


def infer_generator_config(state: dict[str, torch.Tensor], path: Path) -> dict:
    """Generator config from its tensors (our key layout)."""
    try:
        n_mlp = len([k for k in state if re.fullmatch(r"mapping\.fc\d+\.weight", k)])
        resolutions = _resolutions(state, "synthesis.")
        top = max(resolutions)
        channels = {r: _first_dim(state, f"synthesis.b{r}.", ("conv1.bias", "conv1.weight", "torgb.affine.bias"))
                    for r in resolutions}
        base, cmax = _fit_channel_base(channels, path)
        return dict(resolution=top, z_dim=state["mapping.fc0.weight"].shape[1],
                    w_dim=state[f"mapping.fc{n_mlp - 1}.weight"].shape[0], n_mlp=n_mlp, channel_base=base,
                    channel_max=cmax, img_channels=state[f"synthesis.b{top}.torgb.weight"].shape[0])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot infer the generator config from its tensors "
                              f"(missing or malformed {e}); keys found: {_summarize(state)}") from None


def infer_discriminator_config(state: dict[str, torch.Tensor], path: Path) -> dict:
    """Discriminator config from its tensors (our key layout)."""
    try:
        resolutions = [r for r in _resolutions(state, "") if r > 4]
        top = max(resolutions)
        channels = {r: _first_dim(state, f"b{r}.", ("conv0.bias", "conv0.weight")) for r in resolutions}
        channels[4] = state["b4.fc.weight"].shape[0]
        base, cmax = _fit_channel_base(channels, path)
        mbstd = state["b4.conv.weight"].shape[1] - channels[4]
        return dict(resolution=top, channel_base=base, channel_max=cmax, mbstd_num_channels=mbstd,
                    img_channels=state[f"b{top}.fromrgb.weight"].shape[1])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot infer the discriminator config from its tensors "
                              f"(missing or malformed {e}); keys found: {_summarize(state)}") from None


def _summarize(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _build(cls, state: dict[str, torch.Tensor], config: dict, path: Path):
    try:
        net = cls(**{k: v for k, v in config.items() if k != "architecture"})  # the class is the architecture
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: inferred {cls.__name__} config {config} is invalid: {e}") from None
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = [f"{name}: {_summarize(keys)}" for name, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)) if keys]
        raise CheckpointError(f"{path}: {cls.__name__} tensors do not match the inferred config {config}; "
                              + "; ".join(parts))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net


# ---------------------------------------------------------------------------------------------------------------
# handsoff format


def _read_handsoff(path: Path):
    directory = path if path.is_dir() else path.parent
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{directory}: not a handsoff checkpoint, {p.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: invalid JSON ({e})") from None
    if config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path}: format is {config.get('format')!r}, expected {FORMAT_NAME!r}")
    if config.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: written by a newer handsoff (format version {config['version']})")
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{weights_path}: cannot read safetensors file ({e})") from None
    g = {k[2:]: v for k, v in tensors.items() if k.startswith("G.")}
    d = {k[2:]: v for k, v in tensors.items() if k.startswith("D.")}
    return g, config["generator"], (d or None), (config.get("discriminator") or {})


# ---------------------------------------------------------------------------------------------------------------
# rosinality/stylegan2-pytorch


def _expect_kernel(t: torch.Tensor, gain: float, key: str, path: Path) -> None:
    if t.shape != (4, 4) or not torch.allclose(t.float(), ops.resample_filter() * gain, atol=1e-6):
        raise CheckpointError(f"{path}: {key} is not the [1, 3, 3, 1] blur kernel; custom kernels are not supported")


def _modulated_key(sub: str, t: torch.Tensor, key: str, path: Path, notes: dict, own: dict, kernel: str):
    """A rosinality modulated conv's tensor ``sub`` -> (our name, tensor): its weight and modulation, the entries
    of ``own`` (rosinality name -> (our name, reshape)), and its blur kernel ``kernel`` (checked, not kept)."""
    if sub == "conv.weight":
        return "weight", t[0]
    if sub.startswith("conv.modulation."):
        return "affine." + sub.rsplit(".", 1)[1], t
    if sub in own:
        name, shape = own[sub]
        return name, t.reshape(shape)
    if sub == kernel:
        _expect_kernel(t, 4.0, key, path)
        notes["kernels"] += 1
        return None, None
    return "?", None


def _styled_conv_key(sub: str, t: torch.Tensor, key: str, path: Path, notes: dict):
    return _modulated_key(sub, t, key, path, notes, {"noise.weight": ("noise_strength", ()),
                                                     "activate.bias": ("bias", (-1,))}, "conv.blur.kernel")


def _torgb_key(sub: str, t: torch.Tensor, key: str, path: Path, notes: dict):
    return _modulated_key(sub, t, key, path, notes, {"bias": ("bias", (-1,))}, "upsample.kernel")


def _conv_index_to_layer(k: int) -> str:
    """rosinality ``convs.k`` -> our ``b{R}.conv{j}``: two convs per resolution from 8x8 up."""
    return f"synthesis.b{2 ** (3 + k // 2)}.conv{k % 2}"


def rosinality_generator_to_ours(sd: dict[str, torch.Tensor], latent_avg: torch.Tensor | None,
                                 path: Path) -> dict[str, torch.Tensor]:
    """Rename a rosinality ``Generator`` state dict into our layout; fill absent noise buffers with a warning."""
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    notes = {"kernels": 0}
    for key, t in sd.items():
        new = None
        if m := re.fullmatch(r"style\.(\d+)\.(weight|bias)", key):
            new, t = f"mapping.fc{int(m.group(1)) - 1}.{m.group(2)}", t
        elif key == "input.input":
            new, t = "synthesis.b4.const", t[0]
        elif m := re.fullmatch(r"noises\.noise_(\d+)", key):
            n = int(m.group(1))
            new, t = ("synthesis.b4.conv1" if n == 0 else _conv_index_to_layer(n - 1)) + ".noise_const", t[0, 0]
        else:
            if m := re.fullmatch(r"conv1\.(.+)", key):
                prefix, sub, fn = "synthesis.b4.conv1", m.group(1), _styled_conv_key
            elif m := re.fullmatch(r"convs\.(\d+)\.(.+)", key):
                prefix, sub, fn = _conv_index_to_layer(int(m.group(1))), m.group(2), _styled_conv_key
            elif m := re.fullmatch(r"to_rgb1\.(.+)", key):
                prefix, sub, fn = "synthesis.b4.torgb", m.group(1), _torgb_key
            elif m := re.fullmatch(r"to_rgbs\.(\d+)\.(.+)", key):
                prefix, sub, fn = f"synthesis.b{2 ** (3 + int(m.group(1)))}.torgb", m.group(2), _torgb_key
            else:
                unexpected.append(key)
                continue
            name, t = fn(sub, t, key, path, notes)
            if name == "?":
                unexpected.append(key)
                continue
            if name is None:
                continue
            new = f"{prefix}.{name}"
        out[new] = t
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys in the rosinality generator: {_summarize(unexpected)}")
    if latent_avg is not None:
        out["mapping.w_avg"] = latent_avg.reshape(-1)

    convs = sorted(k.removesuffix(".affine.weight") for k in out if k.endswith(".affine.weight") and "torgb" not in k)
    upsampling = [c for c in convs if c.endswith(".conv0")]
    if notes["kernels"] < 2 * len(upsampling):
        warnings.warn(f"{path}: blur/upsample kernel buffers are absent; using the standard [1, 3, 3, 1] kernel",
                      stacklevel=3)
    absent = [c for c in convs if f"{c}.noise_const" not in out]
    if absent:
        warnings.warn(f"{path}: {len(absent)} noise buffers are absent; filled from a seeded normal draw "
                      "(seed 0), so 'const' noise differs from the original run", stacklevel=3)
        gen = torch.Generator().manual_seed(0)
        for c in absent:
            res = int(re.search(r"\.b(\d+)\.", c).group(1))
            out[f"{c}.noise_const"] = torch.randn(res, res, generator=gen)
    return out


def rosinality_discriminator_to_ours(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Rename a rosinality ``Discriminator`` state dict into our (NVIDIA) layout."""
    top_index = max((int(m.group(1)) for k in sd if (m := re.match(r"convs\.(\d+)\.", k))), default=0)
    resolution = 2 ** (top_index + 2)  # convs.1 is the top resolution's block, ..., convs.N is the 8x8 block

    def block(i: int) -> str:
        return f"b{resolution // 2 ** (i - 1)}"

    table = [
        (r"convs\.0\.0\.weight", lambda m: f"{block(1)}.fromrgb.weight"),
        (r"convs\.0\.1\.bias", lambda m: f"{block(1)}.fromrgb.bias"),
        (r"convs\.(\d+)\.conv1\.0\.weight", lambda m: f"{block(int(m.group(1)))}.conv0.weight"),
        (r"convs\.(\d+)\.conv1\.1\.bias", lambda m: f"{block(int(m.group(1)))}.conv0.bias"),
        (r"convs\.(\d+)\.conv2\.1\.weight", lambda m: f"{block(int(m.group(1)))}.conv1.weight"),
        (r"convs\.(\d+)\.conv2\.2\.bias", lambda m: f"{block(int(m.group(1)))}.conv1.bias"),
        (r"convs\.(\d+)\.skip\.1\.weight", lambda m: f"{block(int(m.group(1)))}.skip.weight"),
        (r"final_conv\.0\.weight", lambda m: "b4.conv.weight"),
        (r"final_conv\.1\.bias", lambda m: "b4.conv.bias"),
        (r"final_linear\.0\.(weight|bias)", lambda m: f"b4.fc.{m.group(1)}"),
        (r"final_linear\.1\.(weight|bias)", lambda m: f"b4.out.{m.group(1)}"),
    ]
    out, unexpected = {}, []
    for key, t in sd.items():
        if re.fullmatch(r"convs\.\d+\.(conv2|skip)\.0\.kernel", key):
            _expect_kernel(t, 1.0, key, path)
            continue
        for pattern, rename in table:
            if m := re.fullmatch(pattern, key):
                out[rename(m)] = t
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys in the rosinality discriminator: {_summarize(unexpected)}")
    return out


def _read_rosinality(path: Path):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated zips / refused globals
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    if "g_ema" in ckpt:
        g_sd = ckpt["g_ema"]
    elif "g" in ckpt:
        g_sd = ckpt["g"]
    elif "style.1.weight" in ckpt:
        g_sd = ckpt  # a bare generator state dict
    else:
        raise CheckpointError(f"{path}: no 'g_ema' or 'g' entry (found {_summarize(ckpt)}); "
                              "not a rosinality stylegan2-pytorch checkpoint")
    g = rosinality_generator_to_ours(g_sd, ckpt.get("latent_avg"), path)
    d = rosinality_discriminator_to_ours(ckpt["d"], path) if isinstance(ckpt.get("d"), dict) else None
    return g, {}, d, {}


# ---------------------------------------------------------------------------------------------------------------
# NVIDIA network pickles


@dataclass
class PersistentObject:
    """What ``torch_utils.persistence`` pickled: the class name and the instance ``__dict__``, never executed."""

    class_name: str
    state: dict


class _EasyDict(dict):
    """Stand-in for ``dnnlib.EasyDict`` (a dict subclass) in pickles."""


class _ModuleState:
    """Stand-in for a plain torch module pickled inside a network: keeps its ``__dict__``."""

    def __setstate__(self, state):
        self.state = state


def _load_from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds tensors, plain containers and persistence stubs.

    Anything else (in particular the module source code a network pickle carries) is refused or kept as data.
    """

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return lambda meta: PersistentObject(meta.get("class_name", "?"), meta.get("state") or {})
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_from_bytes
        if module == "dnnlib.util" and name == "EasyDict":
            return _EasyDict
        if module.startswith("torch.nn.modules."):
            return _ModuleState
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


def flatten_persistent(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensor tree of a pickled network (``_parameters``, ``_buffers``, ``_modules``) as a flat state dict."""
    state = obj.state if isinstance(obj, (PersistentObject, _ModuleState)) else {}
    out = {}
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is not None:
                out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(flatten_persistent(child, f"{prefix}{name}."))
    return out


def _init_kwargs(obj: PersistentObject) -> dict:
    return dict(obj.state.get("_init_kwargs") or {})


def _check_and_drop_filters(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in state.items():
        if key.endswith(".resample_filter"):
            _expect_kernel(t, 1.0, key, path)
        else:
            out[key] = t
    return out


def _read_nvidia(path: Path):
    try:
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not a network pickle handsoff can read safely ({e})") from None
    except Exception as e:  # EOFError for truncated files, and whatever a corrupt stream raises
        raise CheckpointError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); truncated or corrupt?") from None
    if not isinstance(data, dict) or not any(k in data for k in ("G_ema", "G")):
        found = _summarize(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: no 'G_ema' or 'G' network (found {found}); not an NVIDIA network pickle")
    net = data.get("G_ema") or data["G"]
    if not isinstance(net, PersistentObject):
        raise CheckpointError(f"{path}: G_ema is not a persistent network object")
    if not net.class_name.endswith("Generator"):
        raise CheckpointError(f"{path}: G_ema is a {net.class_name}, expected a StyleGAN2 or StyleGAN3 Generator")
    kwargs = _init_kwargs(net)
    if kwargs.get("c_dim", 0):
        raise CheckpointError(f"{path}: conditional generators (c_dim={kwargs['c_dim']}) are not supported")
    # The pickled class name is the bare "Generator" for both; StyleGAN3 is told apart by its Fourier input.
    g_state = flatten_persistent(net)
    if "synthesis.input.freqs" in g_state:
        g_hints = _stylegan3_config(kwargs, path)
    else:
        g_state, g_hints = _stylegan2_generator(g_state, kwargs, path)
    d_state, d_hints = _nvidia_discriminator(data.get("D"), path)
    return g_state, g_hints, d_state, d_hints


# Constructor arguments of NVIDIA's StyleGAN3 SynthesisNetwork / SynthesisLayer that our class takes by the same name.
_STYLEGAN3_SYNTHESIS_KEYS = ("channel_base", "channel_max", "num_layers", "num_critical", "first_cutoff",
                             "first_stopband", "last_stopband_rel", "margin_size", "output_scale", "conv_kernel",
                             "filter_size", "lrelu_upsampling", "use_radial_filters", "num_fp16_res", "conv_clamp")


def _stylegan3_config(kwargs: dict, path: Path) -> dict:
    """Our StyleGAN3Generator config from the constructor arguments an NVIDIA stylegan3 pickle records.

    Their training script passes the synthesis arguments at the top level (``Generator(**synthesis_kwargs)``);
    a nested ``synthesis_kwargs`` is accepted too. Arguments not recorded take NVIDIA's defaults.
    """
    try:
        synthesis = {**kwargs, **dict(kwargs.get("synthesis_kwargs") or {})}
        mapping = dict(kwargs.get("mapping_kwargs") or {})
        config = dict(architecture="stylegan3", resolution=int(kwargs["img_resolution"]), z_dim=int(kwargs["z_dim"]),
                      w_dim=int(kwargs["w_dim"]), img_channels=int(kwargs["img_channels"]),
                      n_mlp=int(mapping.get("num_layers", 2)), mapping_lr_mul=float(mapping.get("lr_multiplier", 0.01)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the StyleGAN3 generator's recorded arguments lack {e}; found "
                              f"{_summarize(kwargs)}") from None
    for key in _STYLEGAN3_SYNTHESIS_KEYS:
        if key in synthesis:
            value = synthesis[key]
            config[key] = value.item() if hasattr(value, "item") else value  # numpy scalars -> JSON-able
    return config


def _stylegan2_generator(state: dict, kwargs: dict, path: Path) -> tuple[dict, dict]:
    synthesis_kwargs = dict(kwargs.get("synthesis_kwargs") or {})
    if synthesis_kwargs.get("architecture", "skip") != "skip":
        raise CheckpointError(f"{path}: generator architecture {synthesis_kwargs['architecture']!r} is not "
                              "supported (only 'skip', the StyleGAN2 default)")
    g_state = _check_and_drop_filters(state, path)
    g_hints = {k: synthesis_kwargs[k] for k in RUNTIME_KEYS if k in synthesis_kwargs}
    mapping_kwargs = dict(kwargs.get("mapping_kwargs") or {})
    if "lr_multiplier" in mapping_kwargs:
        g_hints["mapping_lr_mul"] = mapping_kwargs["lr_multiplier"]
    return g_state, g_hints


def _nvidia_discriminator(d, path: Path) -> tuple[dict | None, dict]:
    """The StyleGAN2 discriminator of a pickle (stylegan3 trains both configs with it), or (None, {})."""
    d_state, d_hints = None, {}
    if isinstance(d, PersistentObject):
        d_kwargs = _init_kwargs(d)
        if d_kwargs.get("c_dim", 0) or d_kwargs.get("architecture", "resnet") != "resnet":
            warnings.warn(f"{path}: discriminator is conditional or not 'resnet'; it is not loaded", stacklevel=3)
        else:
            d_state = _check_and_drop_filters(flatten_persistent(d), path)
            d_hints = {k: d_kwargs[k] for k in RUNTIME_KEYS if k in d_kwargs}
            epilogue = dict(d_kwargs.get("epilogue_kwargs") or {})
            if "mbstd_group_size" in epilogue:
                d_hints["mbstd_group_size"] = epilogue["mbstd_group_size"]
    return d_state, d_hints
