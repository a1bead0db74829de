"""Per-layer shapes and costs, found by running each layer once on the meta device.

In:  a layer name, its bound arguments and its per-example input shape.
Out: the output shape and the cost of one example, in multiply-accumulates (MACs):
     torch's FlopCounterMode counts FLOPs of matrix products and convolutions
     (2 per multiply-accumulate); we report FLOPs / 2. Element-wise work (activations,
     pooling, batch norm, sums) counts zero, exactly as FlopCounterMode counts it, so the
     executor's accounting can be compared with FlopCounterMode one for one.
Guarantees: no memory is allocated for weights or activations (meta tensors), so
checking a large network is instant; a layer that cannot take its input raises
`LayerError` with a sentence for the user.

Example:
    >>> measure("conv", {"channels": 8, "kernel": 3, "stride": 1, "padding": 0,
    ...                  "groups": 1, "dilation": 1, "bias": True}, (1, 8, 8))
    ((8, 6, 6), 2592)
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .layers import LayerError, build_layer

FLOPS_PER_MAC = 2
COST_UNIT = "multiply-accumulates (MACs) per example; torch FlopCounterMode FLOPs / 2"


def measure(name: str, args: dict, in_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(output shape, MACs for one example) of one layer."""
    try:
        with torch.device("meta"):
            module = build_layer(name, args, in_shape)
        module.eval()  # batch statistics of a single example are undefined in training mode
        x = torch.empty((1, *in_shape), device="meta")
        with FlopCounterMode(display=False) as counter:
            y = module(x)
    except LayerError:
        raise
    except Exception as e:  # a user's module, or a combination torch rejects
        raise LayerError(f"`{name}` cannot run on an input of shape {list(in_shape)}: {_first_line(e)}") from None
    if not isinstance(y, torch.Tensor):
        raise LayerError(f"`{name}` returns {type(y).__name__}, not a tensor")
    return tuple(y.shape[1:]), counter.get_total_flops() // FLOPS_PER_MAC


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
