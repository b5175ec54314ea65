"""Transformers that host a candidate normalization layer: a causal character LM and a ViT.

The sequence half of the proxy models step (data -> models -> train): models.py registers
the builders below as the architectures "lm", "lm_full", "vit" and "vit_full", and the
trainers build them around the candidate's layer factory.

The factory is norm_layer(num_features) -> nn.Module, acting on (N, T, C) over the last
dimension, as torch.nn.LayerNorm(C) does; it replaces every LayerNorm of the network: the
one before attention, the one before the MLP, and the final one. Where the norm sits is the
`placement`:
  "pre"    x + F(Norm(x)) in every block, and a final Norm (GPT-2, ViT): the default;
  "post"   Norm(x + F(x)) in every block (the original Transformer); no final Norm, since
           every block already ends in one;
  "mixln"  Mix-LN (Li et al., arXiv 2412.13795): post-norm in the first floor(depth / 4)
           blocks, pre-norm after them, and the final Norm of the pre-norm part.
A layer that suits one placement only (post-norm trains shallow stacks well and deep ones
badly) is told apart by training it in each.

Attention is F.scaled_dot_product_attention, causal in the LM and bidirectional in the
ViT. There is no dropout, so training stays a function of the seed. Linear and embedding
weights start at N(0, 0.02) (the LM's embed_std changes its embeddings'), the output
projections of residual branches at N(0, 0.02 / sqrt(2 * depth)) (GPT-2), so the residual
stream does not grow with depth; the candidate layer keeps whatever initialisation it
defines.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from evonas.errors import EvonasError

NormLayer = Callable[[int], nn.Module]
"""A sequence layer factory: norm_layer(num_features) -> module over (N, T, C)."""

PLACEMENTS = ("pre", "post", "mixln")
_STD = 0.02
_MLP_RATIO = 4


def _linear(in_features: int, out_features: int, std: float = _STD) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class SelfAttention(nn.Module):
    """Multi-head self-attention over (N, T, C), causal or bidirectional."""

    def __init__(self, width: int, heads: int, causal: bool, out_std: float) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = _linear(width, 3 * width)
        self.proj = _linear(width, width, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """Attention and MLP sublayers, each with its residual and its norm, pre or post."""

    def __init__(self, width: int, heads: int, norm_layer: NormLayer, *, causal: bool,
                 post: bool, out_std: float) -> None:
        super().__init__()
        self.post = post
        self.norm1 = norm_layer(width)
        self.attn = SelfAttention(width, heads, causal, out_std)
        self.norm2 = norm_layer(width)
        self.mlp = nn.Sequential(_linear(width, _MLP_RATIO * width), nn.GELU(),
                                 _linear(_MLP_RATIO * width, width, out_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post:
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Trunk(nn.Module):
    """The blocks in their placement, and the final norm where the last block is pre-norm."""

    def __init__(self, norm_layer: NormLayer, width: int, depth: int, heads: int, *,
                 causal: bool, placement: str) -> None:
        super().__init__()
        out_std = _STD / math.sqrt(2 * depth)
        self.blocks = nn.Sequential(*(
            Block(width, heads, norm_layer, causal=causal, post=post, out_std=out_std)
            for post in post_norm_blocks(placement, depth)))
        self.norm = nn.Identity() if placement == "post" else norm_layer(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


def post_norm_blocks(placement: str, depth: int) -> list[bool]:
    """For each block, whether it is post-norm under `placement`."""
    if placement not in PLACEMENTS:
        raise EvonasError(f"unknown norm placement {placement!r}: use one of "
                          f"{', '.join(PLACEMENTS)}")
    if placement == "mixln" and depth < 4:
        raise EvonasError(f"placement mixln puts post-norm in the first quarter of the blocks, "
                          f"none of {depth}: use depth >= 4 or placement pre")
    n_post = {"pre": 0, "post": depth, "mixln": depth // 4}[placement]
    return [i < n_post for i in range(depth)]


def _check_shape(width: int, depth: int, heads: int) -> None:
    for name, value in (("width", width), ("depth", depth), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvonasError(f"transformer {name} must be a positive integer, got {value!r}")
    if width % heads:
        raise EvonasError(f"transformer width {width} is not a multiple of its {heads} heads: "
                          f"use a width divisible by {heads}")


# --- language model ----------------------------------------------------------------------


class TransformerLM(nn.Module):
    """Causal character LM: token and learnt position embeddings, blocks, norm, head.

    forward(ids (N, T), T <= context) -> next-token logits (N, T, vocab_size).
    """

    def __init__(self, norm_layer: NormLayer, vocab_size: int, width: int, depth: int,
                 heads: int, context: int, placement: str = "pre", tie: bool = True,
                 embed_std: float = _STD) -> None:
        super().__init__()
        _check_shape(width, depth, heads)
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(context, width)
        for emb in (self.tok_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=embed_std)
        self.trunk = Trunk(norm_layer, width, depth, heads, causal=True, placement=placement)
        self.head = nn.Linear(width, vocab_size, bias=False)
        if tie:  # one matrix reads and writes characters: fewer parameters to fit in a proxy
            self.head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.head.weight, std=_STD)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise EvonasError(f"sequence of {t} tokens exceeds the LM's context {self.context}: "
                              f"feed windows of at most {self.context}")
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(t, device=ids.device))
        return self.head(self.trunk(x))


def transformer_lm(norm_layer: NormLayer, width: int = 64, num_classes: int = 65,
                   depth: int = 2, heads: int = 4, context: int = 64, placement: str = "pre",
                   tie: bool = True, embed_std: float = _STD) -> TransformerLM:
    """The LM by registry convention: num_classes is the vocabulary size (65 for tiny
    Shakespeare). Proxy: width 64, depth 2, context 64; full training: depth 6, context 256,
    width 256 or more.

    embed_std sets the scale of the residual stream at the input. Layers that do not
    normalise (DyT) see it unchanged: at GPT-2's 0.02 a DyT LM proxy does not get past
    symbol frequencies, at 1.0 (untied, so the head keeps 0.02) it learns
    (benchmarks/lm_proxy_norms.py).
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise EvonasError(f"LM context must be a positive integer, got {context!r}")
    if isinstance(embed_std, bool) or not isinstance(embed_std, (int, float)) or not embed_std > 0:
        raise EvonasError(f"LM embed_std must be a positive number, got {embed_std!r}")
    return TransformerLM(norm_layer, num_classes, width, depth, heads, context, placement, tie,
                         embed_std)


# --- vision transformer ------------------------------------------------------------------


class ViT(nn.Module):
    """ViT for 32x32 images: patch embedding, class token or mean pooling, blocks, head.

    The final norm sees every token (N, T, C) before pooling, so the candidate layer always
    meets the same layout.
    """

    def __init__(self, norm_layer: NormLayer, num_classes: int, width: int, depth: int,
                 heads: int, patch: int = 4, pool: str = "cls", placement: str = "pre",
                 image_size: int = 32) -> None:
        super().__init__()
        _check_shape(width, depth, heads)
        if pool not in ("cls", "mean"):
            raise EvonasError(f"unknown ViT pooling {pool!r}: use cls or mean")
        if image_size % patch:
            raise EvonasError(f"ViT patch {patch} does not tile {image_size}x{image_size} "
                              f"images: use a divisor of {image_size}")
        self.pool = pool
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        tokens = (image_size // patch) ** 2 + (pool == "cls")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.pos_emb = nn.Parameter(torch.randn(1, tokens, width) * _STD)
        self.trunk = Trunk(norm_layer, width, depth, heads, causal=False, placement=placement)
        self.head = _linear(width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = self.trunk(x + self.pos_emb)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))


def vit(norm_layer: NormLayer, width: int = 64, num_classes: int = 10, depth: int = 4,
        heads: int = 4, patch: int = 4, pool: str = "cls", placement: str = "pre") -> ViT:
    """ViT on CIFAR-10 with 4x4 patches (64 tokens and a class token). Proxy: width 64,
    depth 4; full training: depth 9, width 192 or more."""
    return ViT(norm_layer, num_classes, width, depth, heads, patch, pool, placement)
