"""TimeUNet: a time-conditioned U-Net vector field v(x, t) for images (B, C, H, W).

GroupNorm (never BatchNorm: it would couple the samples of a batch and break the divergence),
SiLU, residual blocks with scale-shift time conditioning, self-attention at chosen resolutions,
einops for the reshapes. Any H, W: down-sampling rounds up and up-sampling returns to the size
of the matching skip connection, so odd sizes (7x7 after two halvings of 28) work.
Attention is written out (einsum + softmax) so that it has the double backward the
maximum-likelihood objective needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flows.context import Context
from flows.errors import ConfigError, FlowsError
from flows.nn.embedding import TimeFeatures, time_rows
from flows.nn.registry import FieldKind, check_augment, register_field

__all__ = ["TimeUNet", "UNetSettings"]


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm_plain(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.group_norm`` in plain operations (a mean and a variance per sample and group), in float32 at least, as
    the fused kernel runs under autocast (a bf16 variance of large activations loses its digits)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    g = x.to(dtype).reshape(x.shape[0], groups, -1)
    var, mean = torch.var_mean(g, dim=-1, keepdim=True, correction=0)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = ((g - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    return y * weight.to(dtype).view(shape) + bias.to(dtype).view(shape)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, same numbers to rounding); inside torch.compile it is written out in plain
    operations, because torch.compile fails to differentiate the fused kernel in forward mode, which a compiled
    maximum-likelihood solve uses for its divergence (Jacobian-vector products)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return group_norm_plain(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, d_time: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(d_time, 2 * c_out)
        self.norm2 = GroupNorm(groups, c_out)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.time(temb), "b (two c) -> two b c 1 1", two=2)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class Attention(nn.Module):
    def __init__(self, channels: int, groups: int, heads: int = 1):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three n d) h w -> three b n (h w) d", three=3, n=self.heads)
        weights = torch.einsum("bnid,bnjd->bnij", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        o = torch.einsum("bnij,bnjd->bnid", weights, v)
        return x + self.out(rearrange(o, "b n (h w) d -> b (n d) h w", h=h, w=w))


class Level(nn.Module):
    """Residual blocks at one resolution, each optionally followed by attention."""

    def __init__(self, widths: Sequence[tuple[int, int]], d_time: int, groups: int, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(a, b, d_time, groups) for a, b in widths)
        self.attn = nn.ModuleList(Attention(b, groups) if attention else nn.Identity() for _, b in widths)


class TimeUNet(nn.Module):
    """Vector field on images. ``forward(x, t, context=None)``: x (B, C, H, W), t (B,) or () → (B, C, H, W).

    With ``classes`` > 0 the field is class-conditional, v(x, t, y) with labels y (B,) in 0..classes: an
    embedding of the label (``classes`` is the null label of classifier-free guidance) is added to the
    time embedding that every residual block reads.
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (),
        groups: int = 8,
        classes: int = 0,
    ):
        super().__init__()
        c_img, res = shape[0], shape[1]
        d_time = 4 * channels
        self.time = TimeFeatures(channels)
        self.time_mlp = nn.Sequential(nn.Linear(channels, d_time), nn.SiLU(), nn.Linear(d_time, d_time))
        self.classes = classes
        self.label = nn.Embedding(classes + 1, d_time) if classes else None  # row ``classes``: no label
        self.stem = nn.Conv2d(c_img, channels, 3, padding=1)
        widths, skips, c = [channels * m for m in channel_mult], [channels], channels
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        resolutions = []
        for i, width in enumerate(widths):
            pairs = []
            for _ in range(num_res_blocks):
                pairs.append((c, width))
                c = width
                skips.append(c)
            self.down.append(Level(pairs, d_time, groups, res in attention_resolutions))
            resolutions.append(res)
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            if not last:
                skips.append(c)
                res = (res + 1) // 2
        self.mid = Level([(c, c), (c, c)], d_time, groups, attention=True)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            pairs = []
            for _ in range(num_res_blocks + 1):
                pairs.append((c + skips.pop(), width))
                c = width
            self.up.append(Level(pairs, d_time, groups, resolutions[i] in attention_resolutions))
            self.upsample.append(nn.Conv2d(c, c, 3, padding=1) if i > 0 else nn.Identity())
        self.out = nn.Sequential(GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, c_img, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        temb = self.time_mlp(self.time(time_rows(t, x.shape[0], x.dtype)))  # (1, d) when t is shared
        if self.label is not None:
            if context is None:
                raise FlowsError(f"this field is class-conditional: pass labels in 0..{self.classes - 1}")
            temb = temb + self.label(context.long()).to(temb.dtype)
        elif context is not None:
            raise FlowsError("this field was built without labels: it takes no context")
        h = self.stem(x)
        skips = [h]
        for level, down in zip(self.down, self.downsample, strict=True):
            for block, attn in zip(level.blocks, level.attn, strict=True):
                h = attn(block(h, temb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        for block, attn in zip(self.mid.blocks, self.mid.attn, strict=True):
            h = attn(block(h, temb))
        for level, up in zip(self.up, self.upsample, strict=True):
            for block, attn in zip(level.blocks, level.attn, strict=True):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), temb))
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.out(h)


@dataclass
class UNetSettings:
    """``model.*`` for ``model.name=unet`` (images (C, H, W); any H, W)."""

    name: Literal["unet"] = "unet"
    channels: int = 32  # width at full resolution
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # one level per entry, halving H, W
    num_res_blocks: int = 1  # residual blocks per level
    attention_resolutions: list[int] = field(default_factory=list)  # spatial sizes (H) that get self-attention
    groups: int = 8  # GroupNorm groups (never BatchNorm: it couples samples)
    augment: int = 0  # ANODE: extra dimensions (vectors) or channels (images) the field solves in (flows.augment)

    def check(self, prefix: str = "model.") -> None:
        check_augment(self.augment, prefix)
        if self.channels <= 0 or self.num_res_blocks < 0:
            raise ConfigError(f"invalid config value: {prefix}channels must be > 0.")
        if not self.channel_mult or min(self.channel_mult) <= 0:
            raise ConfigError(f"invalid config value: {prefix}channel_mult: values > 0.")
        if self.groups <= 0:
            raise ConfigError(f"invalid config value: {prefix}groups must be > 0.")
        for width in (self.channels * m for m in self.channel_mult):
            if width % self.groups:
                raise ConfigError(
                    f"invalid config value: {prefix}groups={self.groups} must divide every U-Net width "
                    f"({prefix}channels x {prefix}channel_mult = {width})."
                )


def _build(s: UNetSettings, shape: tuple[int, ...], context: Context | None = None) -> TimeUNet:
    classes = context.classes if context is not None else 0
    return TimeUNet(shape, s.channels, s.channel_mult, s.num_res_blocks, s.attention_resolutions, s.groups, classes)


register_field(FieldKind("unet", UNetSettings, _build, data="images", context="labels"))
