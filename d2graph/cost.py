"""Per-layer shapes and costs, found by running each layer once on the meta device.

In:  a layer name, its bound arguments and its per-example input shape.
Out: the output shape, the number of parameters (weights and biases; buffers such as
     batch-norm statistics not counted) and the cost of one example, in multiply-accumulates (MACs):
     torch's FlopCounterMode counts FLOPs of matrix products and convolutions
     (2 per multiply-accumulate); we report FLOPs / 2. Element-wise work (activations,
     pooling, batch norm, sums) counts zero, exactly as FlopCounterMode counts it, so the
     executor's accounting can be compared with FlopCounterMode one for one.
Guarantees: no memory is allocated for weights or activations (meta tensors), so
checking a large network is instant; a layer that cannot take its input raises
`LayerError` with a sentence for the user. Built-in layers are measured once per
(arguments, input shape): a graph that repeats a layer, or a file checked again, reuses
the result (a `module(...)` layer runs the user's code, so it is measured every time).

Example:
    >>> measure("conv", {"channels": 8, "kernel": 3, "stride": 1, "padding": 0,
    ...                  "groups": 1, "dilation": 1, "bias": True}, (1, 8, 8))
    Measured(shape=(8, 6, 6), macs=2592, params=80)
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from .layers import LAYERS, LayerError, build_layer

FLOPS_PER_MAC = 2
COST_UNIT = "multiply-accumulates (MACs) per example; torch FlopCounterMode FLOPs / 2"


class Measured(NamedTuple):
    shape: tuple[int, ...]  # output shape of one example
    macs: int  # multiply-accumulates for one example
    params: int  # trainable and frozen parameters (elements, not bytes)


def measure(name: str, args: dict, in_shape: tuple[int, ...]) -> Measured:
    """Output shape, MACs for one example and parameter count of one layer."""
    spec = LAYERS.get(name)
    if spec is not None and spec.imports:
        return _measure(name, args, tuple(in_shape))
    return _measure_frozen(name, _freeze(args), tuple(in_shape))


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return ("list", tuple(_freeze(v) for v in value))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "list" and isinstance(value[1], tuple):
        return [_thaw(v) for v in value[1]]
    return value


@lru_cache(maxsize=4096)
def _measure_frozen(name: str, args: tuple, in_shape: tuple[int, ...]) -> Measured:
    return _measure(name, {k: _thaw(v) for k, v in args}, in_shape)


def _measure(name: str, args: dict, in_shape: tuple[int, ...]) -> Measured:
    spec = LAYERS.get(name)
    try:
        with torch.device("meta"):
            module = build_layer(name, args, in_shape)
        module.eval()  # batch statistics of a single example are undefined in training mode
        # Token ids are integers; every other layer reads real values.
        dtype = torch.long if spec is not None and spec.reads_tokens else torch.get_default_dtype()
        x = torch.zeros((1, *in_shape), dtype=dtype, device="meta")
        with FlopCounterMode(display=False) as counter:
            y = module(x)
    except LayerError:
        raise
    except Exception as e:  # a user's module, or a combination torch rejects
        raise LayerError(f"`{name}` cannot run on an input of shape {list(in_shape)}: {_first_line(e)}") from None
    if not isinstance(y, torch.Tensor):
        raise LayerError(f"`{name}` returns {type(y).__name__}, not a tensor")
    params = sum(p.numel() for p in module.parameters())
    return Measured(tuple(y.shape[1:]), counter.get_total_flops() // FLOPS_PER_MAC, params)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
