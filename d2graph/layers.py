"""The layer vocabulary: layer name → argument schema + a builder of the torch module.

In:  a layer name, its bound arguments (see `d2graph.schema`) and the per-example shape
     of its input (no batch dimension).
Out: an `nn.Module` taking a batch `[B, *in_shape]`. Builders check what torch would only
     report cryptically (rank, a kernel larger than the image) and raise `LayerError`
     with a sentence in the user's words.
Guarantees: the registry is the single source of truth for validation, "did you mean"
hints and the layer table in docs/language.md (`layer_table()`). Token layers take
`[T, D]`; those that must ignore padded tokens (`uses_padding`) take the padding mask as
a second argument, which a node's `Pipeline` passes them (`embedding` reads int64 ids,
`reads_tokens`).

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
    reads_tokens: bool = False  # takes integer token ids (`embedding`), not real values


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
    The token layers (`patches`, `attention`, `transformer`, `embedding`) keep PyTorch's
    defaults under either scheme.
    """
    if scheme == "torch":
        return
    # Token layers keep PyTorch's initialisation: their linear layers feed layer norms
    # and residual sums, not ReLUs, and He's gain would double the residual stream's
    # variance per block.
    keep = {id(sub) for m in module.modules() if isinstance(m, TOKEN_MODULES) for sub in m.modules()}
    for m in module.modules():
        if id(m) in keep:
            continue
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


# --- token layers: a sequence of T tokens of width D, `[T, D]` per example ----------------------
#
# Padding: a token input's id 0 is padding (docs/language.md#token-inputs). The executor
# hands the layers that must ignore padded tokens (`uses_padding`) a boolean mask
# `[B, T]`, True where a token is padding, through `Pipeline`. A layer may add tokens
# at the front (`class_token`); they are never padding, so a mask shorter than a layer's
# input is extended at the front (`align_padding`). The mask changes only what attention
# attends to and what `pool_tokens(mean)` averages: padded tokens are still computed (and
# counted in the cost), as in BERT.

PAD_ID = 0  # the token id that means "no token here"


def align_padding(padding: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The padding mask `[B, T0]` for an input of `tokens` ≥ T0 tokens: the tokens added in
    front since the mask was made are real tokens. A row whose tokens are all padding is
    treated as having none: attention over nothing is undefined (NaN), so such an example
    attends over its padding instead, as it would without a mask."""
    if padding is None:
        return None
    extra = tokens - padding.shape[1]
    if extra < 0:
        raise ValueError(f"a padding mask for {padding.shape[1]} tokens cannot describe {tokens}")
    if extra:
        padding = torch.cat([padding.new_zeros(padding.shape[0], extra), padding], dim=1)
    return padding & ~padding.all(dim=1, keepdim=True)


class Pipeline(nn.Sequential):
    """A node's layers in order; `forward(x, padding=None)` hands the padding mask to the
    layers that use one (`uses_padding = True`) and calls the others as `layer(x)`. It is
    an `nn.Sequential`, so state_dict keys are `0.weight`, `1.bias`, … as before."""

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        for module in self:
            if padding is not None and getattr(module, "uses_padding", False):
                x = module(x, padding)
            else:
                x = module(x)
        return x

    @property
    def uses_padding(self) -> bool:
        return any(getattr(m, "uses_padding", False) for m in self)


class Patches(nn.Module):
    """ViT's patch embedding: [C, H, W] → [(H/size)·(W/size), dim], one token per
    non-overlapping size×size patch, in row-major order (a convolution with stride = kernel)."""

    def __init__(self, channels: int, size: int, dim: int):
        super().__init__()
        self.project = nn.Conv2d(channels, dim, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x).flatten(2).transpose(1, 2)


def sinusoidal_positions(tokens: int, dim: int) -> torch.Tensor:
    """The fixed positions of "Attention is all you need": sin on even, cos on odd features."""
    position = torch.arange(tokens, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(tokens, dim)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: dim // 2])
    return table


class Positions(nn.Module):
    """Adds a position embedding to [T, D]: learned (initialised N(0, 0.02²), as ViT and
    BERT do) or sinusoidal (a fixed buffer, no parameters)."""

    def __init__(self, tokens: int, dim: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        else:
            self.register_buffer("table", sinusoidal_positions(tokens, dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table


class ClassToken(nn.Module):
    """Prepends one learned token: [T, D] → [T + 1, D]; `pool_tokens(cls)` reads it back."""

    def __init__(self, dim: int):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention on [T, D] (no residual, no norm). Padded tokens are
    never attended to; with `causal`, a token attends only to itself and the tokens before
    it (a decoder's, as in CALM and LayerSkip). Its cost is 4·T·D² (the q, k, v and output
    projections) plus 2·T²·D (scores and the weighted sum) multiply-accumulates, causal or
    not: the masked scores are computed and then ignored."""

    uses_padding = True

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        self.heads, self.dropout, self.causal = heads, dropout, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than with scaled_dot_product_attention: on a CPU that call
        # runs a fused kernel FlopCounterMode does not count, and the executor's costs
        # must equal FlopCounterMode's for the same run (2·T²·D MACs here).
        scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # [B, heads, T, T]
        padding = align_padding(padding, t)
        # Masked scores are the lowest finite number rather than −inf: a query with every key
        # masked (a padded token before any real one, once `causal`) then gets finite weights
        # instead of NaNs, which the next layer would spread (0 · NaN is NaN).
        lowest = torch.finfo(scores.dtype).min
        if padding is not None:
            scores = scores.masked_fill(padding[:, None, None, :], lowest)  # no key that is padding
        if self.causal:
            later = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # key after the query
            scores = scores.masked_fill(later, lowest)
        weights = nn.functional.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """A pre-norm transformer encoder block (ViT, GPT-2):
    x + attention(layernorm(x)), then x + ffn(layernorm(x)) with a GELU feed-forward of
    width `ffn`; dropout after the attention and after the feed-forward."""

    uses_padding = True

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, dropout, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attention(self.norm1(x), padding))
        return x + self.drop(self.ffn(self.norm2(x)))


class PoolTokens(nn.Module):
    """[T, D] → [D]: the first token (`cls`, after `class_token`) or the mean over the
    tokens that are not padding (`mean`)."""

    uses_padding = True

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        if self.how == "cls":
            return x[:, 0]
        padding = align_padding(padding, x.shape[1])
        if padding is None:
            return x.mean(dim=1)
        keep = (~padding).to(x.dtype)[:, :, None]
        return (x * keep).sum(dim=1) / keep.sum(dim=1)


TOKEN_MODULES = (Patches, Attention, TransformerBlock, nn.Embedding)

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


def _need_tokens(name: str, shape: Shape) -> None:
    if len(shape) != 2:
        raise LayerError(f"`{name}` needs a sequence of tokens [tokens, width], but gets {list(shape)}")


def _need_heads(name: str, dim: int, heads: int) -> None:
    if dim % heads:
        raise LayerError(f"`{name}` with {heads} heads needs a token width divisible by {heads}, but it is {dim}")


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


@layer("embedding", Param("vocab", "posint", doc="number of token ids: ids lie in [0, vocab)"),
       Param("dim", "posint", doc="token width"),
       doc="token ids → learned vectors [T, dim]; id 0 is padding (its vector stays zero)",
       takes="token ids [T]", reads_tokens=True)
def _embedding(shape, a):
    if len(shape) != 1:
        raise LayerError(f"`embedding` needs a sequence of token ids [tokens], but gets {list(shape)}")
    return nn.Embedding(a["vocab"], a["dim"], padding_idx=PAD_ID)


@layer("patches", Param("size", "posint", doc="patch side in pixels"),
       Param("dim", "posint", doc="token width"),
       doc="ViT patch embedding: one token per size×size patch → [(H/size)·(W/size), dim]", takes="[C, H, W]")
def _patches(shape, a):
    _need_image("patches", shape)
    size = a["size"]
    if shape[1] % size or shape[2] % size:
        raise LayerError(f"`patches({size})` needs a height and width divisible by {size}, "
                         f"but the input is {shape[1]}×{shape[2]}")
    return Patches(shape[0], size, a["dim"])


@layer("positions", Param("kind", "choice", "learned", choices=("learned", "sinusoidal")),
       doc="adds a position embedding, learned or sinusoidal (fixed)", takes="[T, D]")
def _positions(shape, a):
    _need_tokens("positions", shape)
    if a["kind"] == "sinusoidal" and shape[1] % 2:
        raise LayerError(f"`positions(sinusoidal)` needs an even token width, but it is {shape[1]}")
    return Positions(shape[0], shape[1], a["kind"])


@layer("class_token", doc="prepends a learned class token → [T+1, D]", takes="[T, D]")
def _class_token(shape, a):
    _need_tokens("class_token", shape)
    return ClassToken(shape[1])


@layer("layernorm", Param("eps", "number", 1e-5),
       doc="layer normalisation over the last dimension (the token width)", takes="[T, D] or [F]")
def _layernorm(shape, a):
    if len(shape) not in (1, 2):
        raise LayerError(f"`layernorm` needs [tokens, width] or [features], but gets {list(shape)}")
    return nn.LayerNorm(shape[-1], a["eps"])


CAUSAL_DOC = "each token attends only to itself and the tokens before it (a decoder's attention)"


@layer("attention", Param("heads", "posint"), Param("dropout", "fraction", 0.0),
       Param("causal", "bool", False, doc=CAUSAL_DOC),
       doc="multi-head self-attention (no residual or norm); ignores padded tokens", takes="[T, D]")
def _attention(shape, a):
    _need_tokens("attention", shape)
    _need_heads("attention", shape[1], a["heads"])
    return Attention(shape[1], a["heads"], a["dropout"], a["causal"])


@layer("transformer", Param("heads", "posint"), Param("ffn", "posint", doc="feed-forward width"),
       Param("dropout", "fraction", 0.0), Param("causal", "bool", False, doc=CAUSAL_DOC),
       doc="pre-norm encoder block: x + attention(layernorm(x)), x + ffn(layernorm(x)) with GELU",
       takes="[T, D]", size=lambda a: 4)  # four linear layers and two norms
def _transformer(shape, a):
    _need_tokens("transformer", shape)
    _need_heads("transformer", shape[1], a["heads"])
    return TransformerBlock(shape[1], a["heads"], a["ffn"], a["dropout"], a["causal"])


@layer("pool_tokens", Param("how", "choice", "mean", choices=("cls", "mean")),
       doc="[T, D] → [D]: the first (class) token, or the mean over tokens that are not padding",
       takes="[T, D]")
def _pool_tokens(shape, a):
    _need_tokens("pool_tokens", shape)
    return PoolTokens(a["how"])


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
