"""PFM's bidirectional feature-mapping networks and the anomaly map they produce.

A mapping net sees one feature vector at a time (the paper's 1x1 convolutions), so it is built
from ``nn.Linear`` layers over the channel axis and applied to channel-last features (..., C).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_linear_bn_eval


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU over the last axis; input (N, c_in) -> (N, c_out)."""
    return nn.Sequential(nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True))


class BidirectionalMapping(nn.Module):
    """S->T and T->S mapping for one level, sharing the bottleneck layer (2c -> c).

    S->T: C_S -> C_S/2+c -> 2c -> [shared 2c -> c] -> 2c -> C_T/2+c -> C_T, and T->S mirrors it.
    """

    def __init__(self, c_source: int, c_target: int, latent: int):
        super().__init__()
        c = latent
        self.encode_source = nn.Sequential(_block(c_source, c_source // 2 + c), _block(c_source // 2 + c, 2 * c))
        self.encode_target = nn.Sequential(_block(c_target, c_target // 2 + c), _block(c_target // 2 + c, 2 * c))
        self.shared = nn.Linear(2 * c, c)
        self.decode_target = nn.Sequential(_block(c, 2 * c), _block(2 * c, c_target // 2 + c),
                                           nn.Linear(c_target // 2 + c, c_target))
        self.decode_source = nn.Sequential(_block(c, 2 * c), _block(2 * c, c_source // 2 + c),
                                           nn.Linear(c_source // 2 + c, c_source))

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source (N, C_S), target (N, C_T) -> (S->T prediction (N, C_T), T->S prediction (N, C_S))."""
        to_target = self.decode_target(self.shared(self.encode_source(source)))
        to_source = self.decode_source(self.shared(self.encode_target(target)))
        return to_target, to_source


def fold_batchnorm(net: BidirectionalMapping) -> BidirectionalMapping:
    """An inference-only copy of ``net`` with each BatchNorm (eval statistics) folded into the
    Linear before it: the same outputs up to rounding, with fewer operations per prediction."""
    folded = copy.deepcopy(net).eval().requires_grad_(False)
    for block in folded.modules():
        if isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], nn.BatchNorm1d):
            block[0] = fuse_linear_bn_eval(block[0], block[1])
            block[1] = nn.Identity()
    return folded


def mapping_error(net: BidirectionalMapping, source: torch.Tensor, target: torch.Tensor,
                  source_in: torch.Tensor | None = None, target_in: torch.Tensor | None = None) -> torch.Tensor:
    """Per-vector error, mean of both directions of the channel-summed squared error.

    source (N, C_S), target (N, C_T): the normalised features (the targets of the mapping);
    source_in/target_in: what enters the nets (the features plus position encoding), default
    the features themselves. Returns (N,).
    """
    to_target, to_source = net(source if source_in is None else source_in,
                               target if target_in is None else target_in)
    return 0.5 * ((to_target - target).pow(2).sum(-1) + (to_source - source).pow(2).sum(-1))


def position_encoding(channels: int, h: int, w: int, grid: int = 64) -> torch.Tensor:
    """PEFM's fixed 2-D sinusoidal encoding for an h x w map -> (h, w, channels).

    Half the channels encode y, half x, frequencies 10000^(-4i/D). Positions are measured in
    units of a ``grid``-cell square spanning the map, so the encoding of a location is the same
    for any feature-map size (the released code only supports a few fixed sizes). The result
    is scaled to unit norm per position, the scale of the L2-normalised features.
    """
    half = channels // 2
    n_freq = max(half // 2, 1)
    freq = torch.pow(10000.0, -4.0 * torch.arange(n_freq, dtype=torch.float32) / max(channels, 1))
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * (grid / h)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * (grid / w)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (L,) -> (L, 2 * n_freq)
        angles = pos[:, None] * freq[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    pe_y = encode(ys)[:, None, :].expand(h, w, -1)
    pe_x = encode(xs)[None, :, :].expand(h, w, -1)
    pe = torch.cat([pe_y, pe_x], dim=-1)
    pe = F.pad(pe, (0, channels - pe.shape[-1]))[..., :channels]
    return pe / math.sqrt(pe.shape[-1] // 2 * 2 or 1)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps, reflect padding, radius 4 sigma."""
    if sigma <= 0:
        return maps
    radius = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps[:, None]                                                  # (B, 1, H, W)
    pad_h, pad_w = min(radius, out.shape[2] - 1), min(radius, out.shape[3] - 1)
    out = F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w > 0 else out
    out = F.conv2d(out, kernel[radius - pad_w: radius + pad_w + 1].view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, pad_h, pad_h), mode="reflect") if pad_h > 0 else out
    out = F.conv2d(out, kernel[radius - pad_h: radius + pad_h + 1].view(1, 1, -1, 1))
    return out[:, 0]
