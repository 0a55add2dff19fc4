"""Write checkpoint files in the two public layouts, from published key names, for the loader tests.

Nothing here imports the loaders: the rosinality key names and shapes and the NVIDIA persistence pickle format
are restated from their public descriptions (see DESIGN.md), so the tests check the loaders against an
independent statement of the formats.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import types
from collections import OrderedDict

import torch

KERNEL = torch.tensor([1.0, 3.0, 3.0, 1.0])
KERNEL = KERNEL[:, None] * KERNEL[None, :] / 64


def rosinality_generator_state(G, kernels: bool = True, noises: bool = True) -> dict:
    """A rosinality/stylegan2-pytorch ``Generator.state_dict()`` holding G's weights."""
    sd = OrderedDict()
    m, s = G.mapping, G.synthesis
    for i in range(m.n_mlp):
        fc = getattr(m, f"fc{i}")
        sd[f"style.{i + 1}.weight"], sd[f"style.{i + 1}.bias"] = fc.weight, fc.bias
    sd["input.input"] = s.b4.const[None]

    def styled(prefix, layer, upsample):
        sd[f"{prefix}.conv.weight"] = layer.weight[None]
        if upsample and kernels:
            sd[f"{prefix}.conv.blur.kernel"] = KERNEL * 4
        sd[f"{prefix}.conv.modulation.weight"] = layer.affine.weight
        sd[f"{prefix}.conv.modulation.bias"] = layer.affine.bias
        sd[f"{prefix}.noise.weight"] = layer.noise_strength.reshape(1)
        sd[f"{prefix}.activate.bias"] = layer.bias

    def torgb(prefix, layer, upsample):
        sd[f"{prefix}.bias"] = layer.bias.reshape(1, -1, 1, 1)
        if upsample and kernels:
            sd[f"{prefix}.upsample.kernel"] = KERNEL * 4
        sd[f"{prefix}.conv.weight"] = layer.weight[None]
        sd[f"{prefix}.conv.modulation.weight"] = layer.affine.weight
        sd[f"{prefix}.conv.modulation.bias"] = layer.affine.bias

    styled("conv1", s.b4.conv1, False)
    torgb("to_rgb1", s.b4.torgb, False)
    layers = [s.b4.conv1]
    for i, res in enumerate(s.resolutions[1:]):
        block = getattr(s, f"b{res}")
        styled(f"convs.{2 * i}", block.conv0, True)
        styled(f"convs.{2 * i + 1}", block.conv1, False)
        torgb(f"to_rgbs.{i}", block.torgb, True)
        layers += [block.conv0, block.conv1]
    if noises:
        for i, layer in enumerate(layers):
            sd[f"noises.noise_{i}"] = layer.noise_const[None, None]
    return OrderedDict((k, v.detach().clone()) for k, v in sd.items())


def rosinality_discriminator_state(D) -> dict:
    sd = OrderedDict()
    top = D.resolutions[0]
    sd["convs.0.0.weight"] = getattr(D, f"b{top}").fromrgb.weight
    sd["convs.0.1.bias"] = getattr(D, f"b{top}").fromrgb.bias
    for i, res in enumerate(D.resolutions, start=1):
        block = getattr(D, f"b{res}")
        sd[f"convs.{i}.conv1.0.weight"] = block.conv0.weight
        sd[f"convs.{i}.conv1.1.bias"] = block.conv0.bias
        sd[f"convs.{i}.conv2.0.kernel"] = KERNEL
        sd[f"convs.{i}.conv2.1.weight"] = block.conv1.weight
        sd[f"convs.{i}.conv2.2.bias"] = block.conv1.bias
        sd[f"convs.{i}.skip.0.kernel"] = KERNEL
        sd[f"convs.{i}.skip.1.weight"] = block.skip.weight
    sd["final_conv.0.weight"], sd["final_conv.1.bias"] = D.b4.conv.weight, D.b4.conv.bias
    sd["final_linear.0.weight"], sd["final_linear.0.bias"] = D.b4.fc.weight, D.b4.fc.bias
    sd["final_linear.1.weight"], sd["final_linear.1.bias"] = D.b4.out.weight, D.b4.out.bias
    return OrderedDict((k, v.detach().clone()) for k, v in sd.items())


def write_rosinality(path, G, D=None, kernels=True, noises=True, latent_avg=True):
    """A training-style rosinality checkpoint: g, g_ema, d, optimizer states, argparse args, latent_avg."""
    g = rosinality_generator_state(G, kernels, noises)
    ckpt = {"g_ema": g, "g": g, "args": argparse.Namespace(size=G.img_resolution, r1=10.0, channel_multiplier=2)}
    if latent_avg:
        ckpt["latent_avg"] = G.w_avg.detach().clone()
    if D is not None:
        d = rosinality_discriminator_state(D)
        ckpt["d"] = d
        ckpt["d_optim"] = torch.optim.Adam([torch.nn.Parameter(t.clone()) for t in d.values()]).state_dict()
    torch.save(ckpt, path)


# --- NVIDIA network pickles -------------------------------------------------------------------------------------

# Pickles carry the network's source code; a reader that ran it would set this flag.
EXECUTED_SOURCE = "import builtins\nbuiltins.HANDSOFF_TEST_SOURCE_EXECUTED = True\n"


class PersistentModule:
    """Pickles exactly like an object of a ``torch_utils.persistence.persistent_class``."""

    def __init__(self, class_name, params=(), buffers=(), modules=(), init_kwargs=None):
        self.class_name = class_name
        self.state = {"training": False, "_parameters": OrderedDict(params), "_buffers": OrderedDict(buffers),
                      "_modules": OrderedDict(modules), "_init_args": (), "_init_kwargs": init_kwargs or {}}

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=EXECUTED_SOURCE, class_name=self.class_name,
                    state=self.state)
        return _reconstruct_persistent_obj, (meta,)


def _reconstruct_persistent_obj(meta):  # placeholder with the public name; never called by the tests
    raise AssertionError("the reader must not call the pickled reconstruct function")


def _module_tree(module, stylegan2_filters=True):
    """Turn one of our modules into nested PersistentModule objects with NVIDIA's attribute names.

    Class names are bare, as ``torch_utils.persistence`` records them (``Generator``, not a dotted path).
    """
    params = [(n, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
              for n, p in module.named_parameters(recurse=False)]
    buffers = [(n, b.detach().clone()) for n, b in module.named_buffers(recurse=False)]
    children = [(n, _module_tree(c, stylegan2_filters)) for n, c in module.named_children()]
    name = type(module).__name__
    if stylegan2_filters and name in ("SynthesisLayer", "SynthesisBlock", "Conv2dLayer", "DiscriminatorBlock"):
        buffers.append(("resample_filter", KERNEL.clone()))  # NVIDIA's StyleGAN2 modules carry their filter
    return PersistentModule(name, params, buffers, children)


def _dump_with_persistence(path, data):
    """Pickle ``data`` with ``torch_utils.persistence._reconstruct_persistent_obj`` as the reduce function's name."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules["torch_utils"] = types.ModuleType("torch_utils")
    sys.modules["torch_utils.persistence"] = persistence
    try:
        with open(path, "wb") as f:
            pickle.dump(data, f)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_nvidia_pickle(path, G, D=None, class_name="Generator", extra_globals=None):
    """A stylegan2-ada-pytorch snapshot pickle {G, D, G_ema, augment_pipe, training_set_kwargs}."""
    g_tree = _module_tree(G)
    g_tree.class_name = class_name
    g_tree.state["_init_kwargs"] = dict(
        z_dim=G.z_dim, c_dim=0, w_dim=G.w_dim, img_resolution=G.img_resolution, img_channels=G.img_channels,
        mapping_kwargs=dict(num_layers=G.mapping.n_mlp),
        synthesis_kwargs=dict(channel_base=G.config["channel_base"], channel_max=G.config["channel_max"],
                              num_fp16_res=G.config["num_fp16_res"], conv_clamp=G.config["conv_clamp"]))
    data = {"G": g_tree, "G_ema": g_tree, "augment_pipe": None, "training_set_kwargs": {"resolution": 64}}
    if D is not None:
        d_tree = _module_tree(D)
        d_tree.class_name = "Discriminator"
        d_tree.state["_init_kwargs"] = dict(c_dim=0, img_resolution=D.resolution, architecture="resnet",
                                            epilogue_kwargs=dict(mbstd_group_size=D.config["mbstd_group_size"]))
        data["D"] = d_tree
    if extra_globals is not None:
        data["extra"] = extra_globals
    _dump_with_persistence(path, data)


def write_nvidia_stylegan3_pickle(path, G):
    """A stylegan3 snapshot pickle of config 't' or 'r' (G's config says which), constructor arguments recorded the
    way NVIDIA's train.py passes them: synthesis arguments at the top level, the mapping depth in mapping_kwargs."""
    c = G.config
    g_tree = _module_tree(G, stylegan2_filters=False)
    g_tree.class_name = "Generator"
    g_tree.state["_init_kwargs"] = dict(
        z_dim=G.z_dim, c_dim=0, w_dim=G.w_dim, img_resolution=G.img_resolution, img_channels=G.img_channels,
        mapping_kwargs=dict(num_layers=c["n_mlp"]), channel_base=c["channel_base"], channel_max=c["channel_max"],
        magnitude_ema_beta=0.999, conv_kernel=c["conv_kernel"], use_radial_filters=c["use_radial_filters"],
        num_layers=c["num_layers"], margin_size=c["margin_size"], conv_clamp=c["conv_clamp"])
    _dump_with_persistence(path, {"G": g_tree, "G_ema": g_tree, "D": None, "augment_pipe": None,
                                  "training_set_kwargs": {"resolution": G.img_resolution}})


def randomize(module, seed=0, scale=0.1):
    """Give zero-initialized biases and noise strengths, and StyleGAN3's input-magnitude averages (1 at init),
    random values so that every path is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or name.endswith("noise_strength"):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
        for name, b in module.named_buffers():
            if name.endswith("magnitude_ema"):
                b.fill_(0.5 + torch.rand([], generator=gen).item())
        if hasattr(module, "mapping"):
            module.mapping.w_avg.copy_(torch.randn(module.w_dim, generator=gen) * scale)
    return module

