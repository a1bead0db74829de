"""The layer vocabulary: layer name → argument schema + a builder of the torch module.

In:  a layer name, its bound arguments (see `d2graph.schema`) and the per-example shape
     of its input (no batch dimension).
Out: an `nn.Module` taking a batch `[B, *in_shape]`. Builders check what torch would only
     report cryptically (rank, a kernel larger than the image) and raise `LayerError`
     with a sentence in the user's words.
Guarantees: the registry is the single source of truth for validation, "did you mean"
hints and the layer table in docs/language.md (`layer_table()`).

Example:
    >>> build_layer("fc", {"features": 10, "bias": True}, (4, 2, 2))
    FC(in_features=16, out_features=10, bias=True)
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .schema import Param, Registry, Schema

Shape = tuple[int, ...]


class LayerError(Exception):
    """A layer cannot take the input it is given; the message is for the user."""


@dataclass(frozen=True)
class LayerSpec:
    schema: Schema
    build: Callable[[Shape, dict], nn.Module]
    takes: str = "any shape"  # for the docs table
    only_in: str = ""  # "dummy" for const: allowed only as a dummy node's first layer
    imports: bool = False  # runs code named by the file: needs --allow-imports
    # What building and measuring the layer costs the checker, in plain layers (E815 bounds
    # the sum): 1, or more for a layer that repeats a structure its arguments size.
    size: Callable[[dict], int] | None = None


LAYERS = Registry("layer")


def layer(name: str, *params: Param, doc: str = "", takes: str = "any shape", **kw):
    def deco(build):
        LAYERS.register(name, LayerSpec(Schema(name, tuple(params), doc), build, takes, **kw))
        return build

    return deco


def initialise(module: nn.Module, scheme: str) -> None:
    """Re-initialise every conv and fc weight under `module` by `scheme`, in place.

    `kaiming`: He-normal weights (fan-in, ReLU gain) and zero biases. PyTorch's default
    (uniform with a = √5) shrinks the signal by about √6 per ReLU layer, so a deep narrow
    graph such as the D²NN chain starts with near-constant scores and its loss sits at
    ln(classes) for many epochs; He initialisation keeps the scale through the layers.
    `torch`: leave PyTorch's defaults. Draws from torch's global generator (seed it first).
    """
    if scheme == "torch":
        return
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_layer(name: str, args: dict, in_shape: Shape) -> nn.Module:
    return LAYERS.get(name).build(tuple(in_shape), args)


# --- modules that torch does not have in the form we need ------------------------------------


class FC(nn.Linear):
    """A linear layer that flattens its input first (as Caffe's InnerProduct does), so
    `maxpool(3), fc(32)` needs no explicit `flatten` — the D²NN layer lists rely on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1) if x.dim() > 2 else x)


class Softmax(nn.Softmax):
    def __init__(self, log: bool = False):
        super().__init__(dim=1)
        self.log = log

    def forward(self, x):
        return torch.log_softmax(x, 1) if self.log else torch.softmax(x, 1)


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3×3 convolutions with batch norm and a shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Confidence(nn.Module):
    """Class scores of k exits (concatenated, latest last) → [max probability, normalised
    entropy, agreement]: EENet's three confidence features. Agreement is the fraction of
    earlier exits whose argmax equals the latest one's (1 when there is only one exit)."""

    def __init__(self, exits: int, classes: int):
        super().__init__()
        self.exits, self.classes = exits, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x.reshape(x.shape[0], self.exits, self.classes)
        p = torch.softmax(scores[:, -1], dim=1)
        top = p.max(dim=1).values
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1) / math.log(self.classes)
        if self.exits > 1:
            votes = scores.argmax(dim=2)
            agree = (votes[:, :-1] == votes[:, -1:]).to(x.dtype).mean(dim=1)
        else:
            agree = torch.ones_like(top)
        return torch.stack([top, entropy, agree], dim=1)


class Const(nn.Module):
    """A dummy node's constant: a tensor of the given shape filled with one value.
    Its forward takes the input it is given only for the batch size, device and dtype."""

    def __init__(self, value: float, shape: Shape):
        super().__init__()
        self.value, self.shape = value, tuple(shape)

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full((like.shape[0], *self.shape), float(self.value), dtype=like.dtype, device=like.device)


# --- shape helpers --------------------------------------------------------------------------


def _need_image(name: str, shape: Shape) -> None:
    if len(shape) != 3:
        raise LayerError(
            f"`{name}` needs an image-shaped input [channels, height, width], but gets {list(shape)}"
        )


def _spatial(name: str, shape: Shape, kernel: int, stride: int, padding: int, dilation: int = 1) -> Shape:
    out = []
    for size in shape[1:]:
        n = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        if n < 1:
            raise LayerError(
                f"`{name}` with kernel {kernel} (padding {padding}) is larger than its "
                f"{shape[1]}×{shape[2]} input"
            )
        out.append(n)
    return tuple(out)


# --- the vocabulary -------------------------------------------------------------------------

_CONV = (
    Param("channels", "posint", doc="output channels"),
    Param("kernel", "posint", doc="square kernel size"),
    Param("stride", "posint", 1),
    Param("padding", "nonneg", 0, also=("same",), doc="zero padding, or `same`"),
    Param("groups", "posint", 1),
    Param("dilation", "posint", 1),
    Param("bias", "bool", True),
)


@layer("conv", *_CONV, doc="2-d convolution", takes="[C, H, W]")
def _conv(shape, a):
    _need_image("conv", shape)
    padding = a["padding"]
    if padding == "same":
        if a["stride"] != 1:
            raise LayerError("`conv` with `padding=same` needs `stride=1`")
        padding = "same"
    else:
        _spatial("conv", shape, a["kernel"], a["stride"], padding, a["dilation"])
    if shape[0] % a["groups"] or a["channels"] % a["groups"]:
        raise LayerError(
            f"`conv` with groups={a['groups']} needs input ({shape[0]}) and output "
            f"({a['channels']}) channels divisible by {a['groups']}"
        )
    return nn.Conv2d(shape[0], a["channels"], a["kernel"], a["stride"], padding,
                     a["dilation"], a["groups"], a["bias"])


_POOL = (
    Param("kernel", "posint"),
    Param("stride", "posint", None, doc="step; defaults to the kernel size", shown="kernel"),
    Param("padding", "nonneg", 0),
)


def _pool(cls, name):
    def build(shape, a):
        _need_image(name, shape)
        stride = a["stride"] or a["kernel"]
        if a["padding"] * 2 > a["kernel"]:
            raise LayerError(f"`{name}` padding must be at most half the kernel size")
        _spatial(name, shape, a["kernel"], stride, a["padding"])
        return cls(a["kernel"], stride, a["padding"])

    return build


layer("maxpool", *_POOL, doc="max pooling", takes="[C, H, W]")(_pool(nn.MaxPool2d, "maxpool"))
layer("avgpool", *_POOL, doc="average pooling", takes="[C, H, W]")(_pool(nn.AvgPool2d, "avgpool"))


@layer("global_avgpool", doc="average over height and width → [C]", takes="[C, H, W]")
def _gap(shape, a):
    _need_image("global_avgpool", shape)
    return GlobalAvgPool()


@layer("fc", Param("features", "posint", doc="output width"), Param("bias", "bool", True),
       doc="fully connected layer; flattens its input, input width inferred")
def _fc(shape, a):
    return FC(math.prod(shape), a["features"], a["bias"])


@layer("flatten", doc="[C, H, W] → [C·H·W]")
def _flatten(shape, a):
    return nn.Flatten()


@layer("identity", doc="passes its input through")
def _identity(shape, a):
    return nn.Identity()


def _activation(name, factory, *params, doc=""):
    layer(name, *params, doc=doc)(lambda shape, a: factory(**a))


_activation("relu", nn.ReLU, doc="max(x, 0)")
_activation("leaky_relu", lambda slope: nn.LeakyReLU(slope), Param("slope", "number", 0.01), doc="leaky ReLU")
_activation("elu", lambda alpha: nn.ELU(alpha), Param("alpha", "number", 1.0), doc="ELU")
_activation("gelu", nn.GELU, doc="GELU")
_activation("silu", nn.SiLU, doc="SiLU (swish)")
_activation("sigmoid", nn.Sigmoid, doc="logistic sigmoid")
_activation("tanh", nn.Tanh, doc="hyperbolic tangent")
_activation("softmax", Softmax, doc="softmax over the feature/channel dimension")
_activation("log_softmax", lambda: Softmax(log=True), doc="log-softmax over the feature/channel dimension")


@layer("batchnorm", Param("eps", "number", 1e-5), Param("momentum", "number", 0.1),
       doc="batch normalisation (1-d for vectors, 2-d for images)", takes="[F] or [C, H, W]")
def _batchnorm(shape, a):
    if len(shape) == 1:
        return nn.BatchNorm1d(shape[0], a["eps"], a["momentum"])
    if len(shape) == 3:
        return nn.BatchNorm2d(shape[0], a["eps"], a["momentum"])
    raise LayerError(f"`batchnorm` needs a [features] or [channels, height, width] input, but gets {list(shape)}")


@layer("dropout", Param("p", "fraction", 0.5, doc="probability of zeroing an element"), doc="dropout")
def _dropout(shape, a):
    return nn.Dropout(a["p"])


@layer("residual", Param("channels", "posint"), Param("stride", "posint", 1),
       doc="ResNet basic block (two 3×3 convs, batch norm, shortcut)", takes="[C, H, W]")
def _residual(shape, a):
    _need_image("residual", shape)
    _spatial("residual", shape, 3, a["stride"], 1)
    return BasicBlock(shape[0], a["channels"], a["stride"])


@layer("resnet_stage", Param("channels", "posint"), Param("blocks", "posint"), Param("stride", "posint", 1),
       doc="a ResNet stage: `blocks` basic blocks, the first with `stride`", takes="[C, H, W]",
       size=lambda a: 4 * a["blocks"])  # a basic block measures in about the time of four plain layers
def _resnet_stage(shape, a):
    _need_image("resnet_stage", shape)
    _spatial("resnet_stage", shape, 3, a["stride"], 1)
    blocks = [BasicBlock(shape[0], a["channels"], a["stride"])]
    blocks += [BasicBlock(a["channels"], a["channels"]) for _ in range(a["blocks"] - 1)]
    return nn.Sequential(*blocks)


@layer("confidence", Param("exits", "posint", 1, doc="how many class-score vectors are concatenated"),
       doc="class scores of k exits → [max prob, normalised entropy, agreement] (EENet)", takes="[k·classes]")
def _confidence(shape, a):
    if len(shape) != 1 or shape[0] % a["exits"] or shape[0] // a["exits"] < 2:
        raise LayerError(
            f"`confidence(exits={a['exits']})` needs the concatenated class scores of "
            f"{a['exits']} exit(s) (a vector whose width is {a['exits']}× the number of classes, "
            f"at least 2 classes), but gets {list(shape)}"
        )
    return Confidence(a["exits"], shape[0] // a["exits"])


@layer("const", Param("value", "number"), Param("shape", "shape"),
       doc="a constant tensor (dummy nodes only)", takes="nothing", only_in="dummy")
def _const(shape, a):
    return Const(a["value"], tuple(a["shape"]))


@layer("module", Param("target", "str", doc='"package.module:Class"'),
       doc="your own torch module, constructed with the remaining arguments (needs --allow-imports)",
       imports=True)
def _module(shape, a):
    cls = import_target(a["target"])
    try:
        return cls(*a.get("args", []), **a.get("kwargs", {}))
    except Exception as e:  # the user's constructor: report what it said
        raise LayerError(f"constructing `{a['target']}` failed: {type(e).__name__}: {e}") from None


# `module` passes every further argument to the constructor.
LAYERS.entries["module"] = LayerSpec(
    Schema("module", LAYERS.get("module").schema.params, LAYERS.get("module").schema.doc, open=True),
    _module, imports=True,
)


def import_target(target: str) -> type[nn.Module]:
    """Resolve "package.module:Class" (or "package.module.Class") to an `nn.Module` subclass.

    Imports the module and looks the name up, and calls nothing: anything but a class
    deriving from `nn.Module` (a function such as `os:system`, a builtin, an instance) is
    refused here, before the caller constructs it.
    """
    if ":" in target:
        mod_name, _, attr = target.partition(":")
    else:
        mod_name, _, attr = target.rpartition(".")
    if not mod_name or not attr:
        raise LayerError(f'`module` needs a target like "package.module:Class", not "{target}"')
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise LayerError(f"cannot import `{mod_name}`: {type(e).__name__}: {e}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LayerError(f"`{mod_name}` has no attribute `{attr}`")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        what = "a class" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise LayerError(f"`{target}` is {what}, not a torch module class (a subclass of torch.nn.Module)")
    return obj


def layer_table() -> str:
    """The layer vocabulary as a Markdown table (docs/language.md embeds it)."""
    rows = ["| layer | input | what it does |", "|---|---|---|"]
    for name in LAYERS.names():
        spec = LAYERS.get(name)
        rows.append(f"| `{spec.schema.signature()}` | {spec.takes} | {spec.schema.doc} |")
    return "\n".join(rows)
