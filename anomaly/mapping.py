"""PFM's bidirectional feature-mapping networks and the anomaly map they produce.

A mapping net sees one feature vector at a time (the paper's 1x1 convolutions), so it is built
from ``nn.Linear`` layers over the channel axis and applied to channel-last features (..., C).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_linear_bn_eval

from .compute import CPU_TURN


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


class PFMMappings(nn.Module):
    """One ``BidirectionalMapping`` per level, with PEFM's optional position encoding.

    ``error_maps`` is the PFM anomaly map before smoothing: each level's mapping error,
    upsampled to the finest level and averaged.
    """

    def __init__(self, source_channels: list[int], target_channels: list[int], latents: list[int],
                 use_position_encoding: bool = False):
        super().__init__()
        self.nets = nn.ModuleList(BidirectionalMapping(cs, ct, c)
                                  for cs, ct, c in zip(source_channels, target_channels, latents))
        self.use_position_encoding = use_position_encoding
        self._folded: tuple[BidirectionalMapping, ...] | None = None

    def train(self, mode: bool = True) -> "PFMMappings":
        self._folded = None                       # parameters may change: fold again when needed
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._folded = None
        super()._load_from_state_dict(*args, **kwargs)

    def folded(self) -> tuple[BidirectionalMapping, ...]:
        """The nets with BatchNorm folded into their Linear layers, for prediction (cached)."""
        if self._folded is None:
            self.eval()
            self._folded = tuple(fold_batchnorm(net) for net in self.nets)
        return self._folded

    def inputs(self, source: torch.Tensor, target: torch.Tensor, positions: torch.Tensor,
               hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectors (N, C_S), (N, C_T) at flat positions (N,) of an h x w map -> what enters the
        nets: the vectors themselves, plus the position encoding if configured."""
        if not self.use_position_encoding:
            return source, target
        h, w = hw
        pe_s = position_encoding(source.shape[1], h, w).reshape(h * w, -1)
        pe_t = position_encoding(target.shape[1], h, w).reshape(h * w, -1)
        return source + pe_s[positions], target + pe_t[positions]

    @torch.inference_mode()
    def error_maps(self, source: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
        """Features per level [(B, C_l, h_l, w_l)] -> (B, h_0, w_0) mean of the levels' mapping
        errors at the finest level's resolution, unsmoothed."""
        fine = source[0].shape[2:]
        total = 0.0
        for net, fs, ft in zip(self.folded(), source, target):
            B, _, h, w = fs.shape
            s = fs.permute(0, 2, 3, 1).reshape(B * h * w, -1)                  # (B*h*w, C_S)
            t = ft.permute(0, 2, 3, 1).reshape(B * h * w, -1)                  # (B*h*w, C_T)
            s_in, t_in = self.inputs(s, t, torch.arange(h * w).repeat(B), (h, w))
            err = mapping_error(net, s, t, s_in, t_in).reshape(B, 1, h, w)
            total = total + (err if (h, w) == fine else
                             F.interpolate(err, size=fine, mode="bilinear", align_corners=False))
        return total[:, 0] / len(self.nets)


class FeatureVectors:
    """Channel-last flattened features of one backbone: per level (N * h * w, C)."""

    def __init__(self, feats: list[torch.Tensor]):
        self.shapes = [tuple(f.shape[2:]) for f in feats]
        self.flat = [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).contiguous() for f in feats]


@dataclass(frozen=True)
class TrainingSchedule:
    """Adam with a cosine-decayed learning rate, ``batch`` random vectors per level per step."""

    steps: int
    batch: int
    lr: float
    weight_decay: float


def train_mappings(mappings: PFMMappings, phases: list[tuple[FeatureVectors, FeatureVectors, int]],
                   schedule: TrainingSchedule, seed: int, progress=None,
                   between: Callable[[PFMMappings], None] | None = None) -> PFMMappings:
    """Train ``mappings`` in place on cached features, phase after phase, one cosine schedule.

    phases: (source vectors, target vectors, steps) each, the steps adding up to
    ``schedule.steps``; ``between(mappings)`` is called (in eval mode) after every phase but the
    last. The number of steps is fixed, so a seeded fit gives the same nets however busy the
    machine is. Returns the nets in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(mappings.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay,
                                 fused=True)          # one kernel per step
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=schedule.steps)
    done = 0
    for phase, (src, tgt, steps) in enumerate(phases):
        mappings.train()
        for _ in range(steps):
            with CPU_TURN:
                loss = 0.0
                for level, net in enumerate(mappings.nets):
                    n = src.flat[level].shape[0]
                    idx = torch.randint(n, (min(schedule.batch, n),), generator=generator)
                    s, t = src.flat[level][idx], tgt.flat[level][idx]
                    h, w = src.shapes[level]
                    s_in, t_in = mappings.inputs(s, t, idx % (h * w), (h, w))
                    loss = loss + mapping_error(net, s, t, s_in, t_in).mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                cosine.step()
            done += 1
            if progress and done % 10 == 0:
                progress(done / schedule.steps, f"training mapping networks ({done}/{schedule.steps} steps)")
        mappings.eval()
        if between is not None and phase < len(phases) - 1:
            between(mappings)
    return mappings
