"""The DDPM U-Net (Ho et al. 2020) as used by the official DDIM code.

Module and parameter names follow the official ``models/diffusion.py`` exactly (``temb.dense.0``,
``down.{i}.block.{j}.norm1``, ``mid.attn_1.q``, ``up.{i}.upsample.conv``, ``nin_shortcut`` ...), so the
released DDPM/DDIM state dicts load with ``strict=True``.  The numerics are the official ones; the
implementation differs only where it is faster: attention goes through
``scaled_dot_product_attention`` (same ``c**-0.5`` scale), the sinusoid frequencies are a
non-persistent buffer (no per-call host->device copy), and the forward has no data-dependent Python
branches, so it runs under ``torch.compile``, bf16 autocast and ``channels_last``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "timestep_embedding_frequencies"]


def timestep_embedding_frequencies(dim: int) -> torch.Tensor:
    """The float32 frequencies of the official ``get_timestep_embedding`` (tensor2tensor variant)."""
    half = dim // 2
    if half < 2:
        raise ValueError(f"timestep embedding dim must be >= 4, got {dim}")
    scale = math.log(10000) / (half - 1)
    return torch.exp(torch.arange(half, dtype=torch.float32) * -scale)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


def _conv1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv, + projected time embedding, GN -> swish -> dropout -> conv, + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = _conv3(in_channels, out_channels)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3(out_channels, out_channels)
        # The official code names the 1x1 shortcut ``nin_shortcut`` (conv_shortcut=False in all configs).
        self.nin_shortcut = _conv1(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        # temb_act = swish(temb), computed once per forward by the caller.
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, q/k/v/proj_out as 1x1 convs (official naming)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = _conv1(channels, channels)
        self.k = _conv1(channels, channels)
        self.v = _conv1(channels, channels)
        self.proj_out = _conv1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        # Pixels as tokens, (B, HW, C): a view when x is channels_last.  The four 1x1 convs run as matrix
        # products on the tokens (the same arithmetic), q/k/v as one product with the bias in its epilogue,
        # so q, k, v come out as (B, 1, HW, C) views that SDPA takes as they are: as convs, the bias add
        # was a separate pass that also re-laid each of q, k, v out for the attention kernel.  The head axis
        # matters too: SDPA's flash/cuDNN kernels take 4-d inputs only; 3-d ones fall back to the math path
        # (fp32 matrix products under autocast).
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c)
        w_qkv = torch.cat([self.q.weight, self.k.weight, self.v.weight]).flatten(1)
        b_qkv = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(tokens, w_qkv, b_qkv).unsqueeze(1).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, scale=int(c) ** (-0.5)).squeeze(1)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + out.reshape(b, hgt, wid, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        # Stride-2 conv with the official asymmetric (right/bottom) zero padding; else 2x2 average pool.
        self.conv = _conv3(channels, channels, stride=2, padding=0) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = _conv3(channels, channels) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class UNet(nn.Module):
    """ε_θ(x_t, t): the DDPM/DDIM U-Net.

    ``forward(x, t)``: x (B, in_channels, H, W), t (B,) long or float timesteps, 0-indexed as in the
    official code (a 0-d t is broadcast over the batch).  Returns (B, out_ch, H, W).
    """

    def __init__(self, *, ch: int = 128, out_ch: int = 3, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 in_channels: int = 3, resolution: int = 32, resamp_with_conv: bool = True):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if ch <= 0 or ch % 32 or any(m <= 0 for m in ch_mult) or not ch_mult:
            raise ValueError(f"ch must be a positive multiple of 32 (GroupNorm(32)) and ch_mult non-empty "
                             f"positive, got ch={ch}, ch_mult={ch_mult}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if resolution % (2 ** (len(ch_mult) - 1)):
            raise ValueError(f"resolution {resolution} must be divisible by 2**(len(ch_mult)-1) = "
                             f"{2 ** (len(ch_mult) - 1)} (one halving per level after the first)")
        self.ch, self.temb_ch = ch, 4 * ch
        self.ch_mult, self.num_res_blocks = ch_mult, num_res_blocks
        self.num_resolutions = len(ch_mult)
        self.resolution, self.in_channels, self.out_ch = resolution, in_channels, out_ch
        self.attn_resolutions = attn_resolutions
        self.register_buffer("temb_freqs", timestep_embedding_frequencies(ch), persistent=False)

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = _conv3(in_channels, ch)

        res = resolution
        in_mult = (1,) + ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[level], ch * mult
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, self.temb_ch, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, self.temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, self.temb_ch, dropout)

        ups = []
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            for i in range(num_res_blocks + 1):
                skip_in = ch * (in_mult[level] if i == num_res_blocks else ch_mult[level])
                up.block.append(ResnetBlock(block_in + skip_in, block_out, self.temb_ch, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            ups.insert(0, up)  # up[i] serves the same resolution as down[i], as in the official code
        self.up = nn.ModuleList(ups)

        self.norm_out = _norm(block_in)
        self.conv_out = _conv3(block_in, out_ch)

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Official sinusoidal embedding: [sin(t f), cos(t f)] in float32, zero-padded if ch is odd."""
        freqs = self.temb_freqs
        if freqs.dtype != torch.float32:  # the model was cast (e.g. .to(bfloat16)): keep the phases exact
            freqs = timestep_embedding_frequencies(self.ch).to(t.device)
        arg = t.float()[:, None] * freqs[None, :]
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
        if self.ch % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.timestep_embedding(t).to(self.temb.dense[0].weight.dtype)  # no-op unless the weights were cast
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](emb)))
        temb = F.silu(temb)  # every ResnetBlock applies swish before temb_proj; do it once

        hs = [self.conv_in(x)]
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(hs[-1], temb)
                if len(down.attn):
                    h = down.attn[i](h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                hs.append(down.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(up.attn):
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))

    def extra_repr(self) -> str:
        return (f"ch={self.ch}, ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks}, "
                f"attn_resolutions={self.attn_resolutions}, resolution={self.resolution}")
