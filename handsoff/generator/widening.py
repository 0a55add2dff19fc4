"""Widen a trained StyleGAN2 (more feature maps per resolution) so that it computes exactly what it did.

Used to measure whether a plateaued generator lacks capacity without retraining from scratch: the wider
networks start from the trained function and training continues from the same images seen (``handsoff
train-gan --init-from RUN --channel-base ...``). The construction (in the spirit of Net2Net, Chen et al. 2016):

- every trained value stays where it was (the leading block of each grown tensor);
- a new output channel (a new row of a weight, its bias, a new channel of the 4x4 constant, a new style of the
  affine layer that feeds it) gets the value a freshly initialized network of the wider config has there;
- a weight from a new input channel into an old output channel is zero, so no old output sees the new channels
  until training moves those weights off zero (their gradients are not zero: the new channels' activations are);
- weights are stored unscaled and multiplied by 1/sqrt(fan_in) at run time (equalized learning rate), so an old
  weight whose fan-in grew is scaled by sqrt(new_in / old_in) to keep its effective value.

Modulated convolutions demodulate over their inputs; zero weights add nothing to that norm. The discriminator's
4x4 epilogue (minibatch standard deviation averaged over its channels, appended as the last input channel) cannot
be widened that way, so its channel count must stay: with the default channel_max it does.
"""

from __future__ import annotations

import math

import torch

# Parameters that keep their shape: the mapping network (widening is about feature maps) and the discriminator's
# epilogue (see the module docstring).
_FIXED = {"generator": ("mapping.",), "discriminator": ("b4.",)}


def _input_grows(name: str, old: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether ``name`` is a weight (out, in, ...) whose input dimension grew."""
    return name.endswith("weight") and old.ndim >= 2 and new.shape[1] > old.shape[1]


def widen_state_dict(old: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], kind: str) -> dict:
    """A state dict for ``fresh``'s (wider) architecture that computes what ``old`` computes.

    Args:
        old: the trained network's state dict.
        fresh: a freshly initialized state dict of the wider config (same keys); the values of new output
            channels come from it.
        kind: "generator" or "discriminator" (which parameters must keep their shape).

    Raises ValueError naming the parameter when a key is missing, a dimension shrinks, or a parameter that must
    keep its shape (mapping network, discriminator epilogue) changes.
    """
    if set(old) != set(fresh):
        raise ValueError(f"the {kind}s have different parameters: {sorted(set(old) ^ set(fresh))[:4]}")
    out = {}
    for name, new in fresh.items():
        was = old[name]
        if was.shape == new.shape:
            out[name] = was.clone()
            continue
        if name.startswith(_FIXED[kind]):
            raise ValueError(f"{kind} {name}: {tuple(was.shape)} -> {tuple(new.shape)}; widening keeps the "
                             f"{'mapping network' if kind == 'generator' else '4x4 epilogue (channel_max)'} as it is")
        if was.ndim != new.ndim or any(a > b for a, b in zip(was.shape, new.shape)):
            raise ValueError(f"{kind} {name}: {tuple(was.shape)} -> {tuple(new.shape)}; widening cannot shrink")
        value = new.clone()
        scale = 1.0
        if _input_grows(name, was, new):
            value[:was.shape[0], was.shape[1]:] = 0  # new inputs into old outputs: off
            scale = math.sqrt(new.shape[1] / was.shape[1])
        value[tuple(slice(0, n) for n in was.shape)] = was * scale
        out[name] = value
    return out


def widen_adam_state(state: dict, names: list[str], old: dict[str, torch.Tensor],
                     new: dict[str, torch.Tensor]) -> dict:
    """An Adam ``state_dict()`` for the widened parameters (``names`` in the optimizer's order).

    Old entries keep their moments, rescaled where a weight's fan-in grew (its gradient shrinks by
    sqrt(old_in / new_in), so exp_avg by that and exp_avg_sq by its square); new entries get exp_avg 0 and
    exp_avg_sq the mean of the parameter's old ones, so that their first steps have the usual size rather than
    the lr / sqrt(1 - beta2) that a zero second moment would give.
    """
    moments = {}
    for index, per_param in state["state"].items():
        name = names[int(index)]
        was, now = old[name], new[name]
        if was.shape == now.shape:
            moments[index] = per_param
            continue
        ratio = now.shape[1] / was.shape[1] if _input_grows(name, was, now) else 1.0
        block = tuple(slice(0, n) for n in was.shape)
        avg = torch.zeros(now.shape, dtype=per_param["exp_avg"].dtype)
        avg[block] = per_param["exp_avg"] / math.sqrt(ratio)
        sq_old = per_param["exp_avg_sq"] / ratio
        sq = torch.full(now.shape, float(sq_old.mean()), dtype=sq_old.dtype)
        sq[block] = sq_old
        moments[index] = {**per_param, "exp_avg": avg, "exp_avg_sq": sq}
    return {**state, "state": moments}
