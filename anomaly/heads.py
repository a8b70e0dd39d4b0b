"""The detector's scoring heads as one graph for a compiled runtime (``anomaly.runtime``): from one
image's raw features to PFM's mapping error, the memory bank's distance and the final map.

The graph computes what ``PFMMappings.error_maps``, ``memory_bank.distance_maps`` and
``scoring`` compute in PyTorch eager (the reference, which the tests compare it with). The
mapping nets' weights, the bank, the maps' scales and the score's weights are inputs, not
constants, so one compiled graph serves every detector of the same architecture and image size,
and a fit's held-out scoring (part-trained nets, a bank without the held-out reference) runs the
same graph as the predictions it calibrates.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .mapping import PFMMappings, mapping_error, position_encoding
from .memory_bank import patch_embedding
from .runtime import CompiledModule
from .scoring import gaussian_blur

BRANCHES = (("encode_source", "shared", "decode_target"), ("encode_target", "shared", "decode_source"))


def _plan(module: nn.Module, prefix: str, index: dict[str, int]) -> list[tuple]:
    """The layers of ``module`` in order: ("linear", weight index, bias index or None) or ("relu",)."""
    plan = []
    for name, layer in module.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if isinstance(layer, nn.Linear):
            plan.append(("linear", index[f"{full}.weight"], index.get(f"{full}.bias")))
        elif isinstance(layer, nn.ReLU):
            plan.append(("relu",))
    return plan


def mapping_parameters(mappings: PFMMappings) -> list[np.ndarray]:
    """The folded nets' parameters in the order ``ScoringHeads`` takes them, float32 arrays."""
    return [p.detach().numpy() for net in mappings.folded() for p in net.parameters()]


class ScoringHeads(nn.Module):
    """forward(3 source features (1, C_l, h_l, w_l), 3 target features, the folded nets'
    parameters (``mapping_parameters``), bank (M, D), scales (2,), weights (2,)) ->
    (PFM error (1, h_0, w_0), bank distance (1, h_0, w_0), smoothed map (1, size, size)), or with
    ``smoothing=False`` the combined map unsmoothed (1, h_0, w_0) as the third output: the
    detector smooths it in float32 (``scoring.smooth_array``), so that a graph computed in
    bfloat16 still gives scores of float32 resolution.

    Built from the structure of ``mappings`` (its weights are not used), for maps smoothed with
    ``sigma`` (pixels at 256 px) and upsampled to ``size``. ``bank_chunks`` > 1 searches the
    bank in that many parts, each reduced to its nearest distances before the next (its
    distances stay in cache); only for a bank of fixed length."""

    def __init__(self, mappings: PFMMappings, sigma: float, size: int, bank_chunks: int = 1,
                 smoothing: bool = True):
        super().__init__()
        self.sigma, self.size, self.bank_chunks, self.smoothing = sigma, size, bank_chunks, smoothing
        self.use_position_encoding = mappings.use_position_encoding
        self.plans, offset = [], 0
        for net in mappings.folded():
            index = {name: offset + i for i, (name, _) in enumerate(net.named_parameters())}
            offset += len(index)
            self.plans.append([[step for part in branch for step in _plan(getattr(net, part), part, index)]
                               for branch in BRANCHES])
        self.n_parameters = offset

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source, target = list(inputs[0:3]), list(inputs[3:6])
        params = inputs[6:6 + self.n_parameters]
        bank, scales, weights = inputs[6 + self.n_parameters:]
        fine = source[0].shape[2:]
        pfm = 0.0
        for plans, fs, ft in zip(self.plans, source, target):
            _, _, h, w = fs.shape
            s = F.normalize(fs, dim=1).permute(0, 2, 3, 1).reshape(h * w, -1)       # (h*w, C_S)
            t = F.normalize(ft, dim=1).permute(0, 2, 3, 1).reshape(h * w, -1)       # (h*w, C_T)
            s_in, t_in = s, t
            if self.use_position_encoding:
                s_in = s + position_encoding(s.shape[1], h, w).reshape(h * w, -1)
                t_in = t + position_encoding(t.shape[1], h, w).reshape(h * w, -1)
            net = lambda a, b: (self._run(plans[0], a, params), self._run(plans[1], b, params))
            err = mapping_error(net, s, t, s_in, t_in).reshape(1, 1, h, w)
            pfm = pfm + (err if (h, w) == fine else F.interpolate(err, size=fine, mode="bilinear", align_corners=False))
        pfm = pfm[:, 0] / len(self.plans)                                                   # (1, h_0, w_0)
        patches = patch_embedding(source)                                                   # (1, D, h_1, w_1)
        h1, w1 = patches.shape[2:]
        center = bank.mean(0, keepdim=True)            # (1, D): smaller norms, less cancellation
        queries = patches.permute(0, 2, 3, 1).reshape(h1 * w1, -1) - center                 # (Q, D)
        bank = bank - center                                                                # (M, D)
        d2 = self._nearest_squared(queries, bank) + queries.pow(2).sum(1)
        knn = d2.clamp_min(0.0).sqrt().reshape(1, 1, h1, w1)
        knn = F.interpolate(knn, size=fine, mode="bilinear", align_corners=False)[:, 0]    # (1, h_0, w_0)
        combined = (weights[0] * pfm / scales[0] + weights[1] * knn / scales[1]) / weights.sum()
        if not self.smoothing:
            return pfm, knn, combined
        smoothed = gaussian_blur(combined, self.sigma * combined.shape[1] / 256)
        # F.interpolate's bilinear upsampling as two matrix products: the same map to 5e-7 in
        # float32, and cheaper than OpenVINO's Interpolate on a single-channel map
        rows, cols = (_linear_upsampling(n, self.size) for n in smoothed.shape[1:])
        smoothed = (rows @ smoothed[0] @ cols.T)[None]                                      # (1, S, S)
        return pfm, knn, smoothed

    def _nearest_squared(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """(Q, D) queries, (M, D) bank -> (Q,) min over the bank of |b|^2 - 2 q.b."""
        bank_sq = bank.pow(2).sum(1)                                                        # (M,)
        parts = (zip(bank.chunk(self.bank_chunks), bank_sq.chunk(self.bank_chunks)) if self.bank_chunks > 1
                 else [(bank, bank_sq)])          # not chunk(1): a bank whose length varies stays whole
        nearest = None
        for part, part_sq in parts:
            d2 = (part_sq[None] - 2.0 * queries @ part.T).amin(1)
            nearest = d2 if nearest is None else torch.minimum(nearest, d2)
        return nearest

    @staticmethod
    def _run(plan: list[tuple], x: torch.Tensor, params) -> torch.Tensor:
        for step in plan:
            if step[0] == "linear":
                x = F.linear(x, params[step[1]], None if step[2] is None else params[step[2]])
            else:
                x = F.relu(x)
        return x


def _linear_upsampling(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of F.interpolate's linear interpolation (align_corners=False) along one axis."""
    return F.interpolate(torch.eye(n_in)[:, None, :], size=n_out, mode="linear", align_corners=False)[:, 0, :].T


class FittedHeads(nn.Module):
    """forward(3 source features (1, C_l, h_l, w_l), 3 target features) -> ``ScoringHeads``'
    outputs for one fitted detector, whose nets' parameters, bank, scales and score weights
    (``constants``, in ``ScoringHeads``' order) are constants of the graph: OpenVINO folds the
    bank's norms and pre-packs every weight once instead of on each call."""

    def __init__(self, heads: ScoringHeads, constants: list[np.ndarray]):
        super().__init__()
        self.heads = heads
        self.n_constants = len(constants)
        for i, value in enumerate(constants):
            self.register_buffer(f"constant{i}", torch.tensor(value, dtype=torch.float32))

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(*features, *(getattr(self, f"constant{i}") for i in range(self.n_constants)))


_lock = threading.Lock()
_graphs: OrderedDict[tuple, CompiledModule] = OrderedDict()
MAX_GRAPHS = 8        # (architecture, size, sigma) kept; a detector holds on to its own


def compiled_heads(mappings: PFMMappings, sigma: float, size: int) -> CompiledModule:
    """The compiled ``ScoringHeads`` for detectors whose nets are shaped like ``mappings``,
    shared by all of them in this process (a graph per feature size, built on first use; the
    bank's length may vary); the ``MAX_GRAPHS`` most recently asked for are kept."""
    key = (tuple(tuple(p.shape) for p in mappings.parameters()), mappings.use_position_encoding,
           float(sigma), int(size))
    with _lock:
        if key not in _graphs:
            heads = ScoringHeads(mappings, sigma, size, smoothing=False)
            _graphs[key] = CompiledModule("scoring heads", heads, dynamic={6 + heads.n_parameters: (0,)})
            if len(_graphs) > MAX_GRAPHS:
                _graphs.popitem(last=False)
        _graphs.move_to_end(key)
        return _graphs[key]


BANK_CHUNKS = 8        # parts of a fitted detector's bank searched one after another


def fitted_heads(mappings: PFMMappings, bank: torch.Tensor, scales: torch.Tensor, weights: tuple[float, float],
                 sigma: float, size: int) -> CompiledModule:
    """``FittedHeads`` of one fitted detector, compiled on first use; its third output is the
    combined map unsmoothed (see ``ScoringHeads``)."""
    constants = mapping_parameters(mappings) + [bank.numpy(), scales.numpy(), np.array(weights, np.float32)]
    heads = ScoringHeads(mappings, sigma, size, bank_chunks=min(BANK_CHUNKS, len(bank)), smoothing=False)
    return CompiledModule("fitted scoring heads", FittedHeads(heads, constants))
