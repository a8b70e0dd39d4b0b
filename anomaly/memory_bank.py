"""A nearest-neighbour memory bank of normal patches, the second score beside PFM's mapping error.

Each position of an image is described by a locally aggregated patch vector (PatchCore's idea):
the source backbone's stride-8 and stride-16 features as the network gives them (not
L2-normalised: their magnitude carries evidence), each averaged over its 3 x 3 neighbourhood
(zero border), the stride-16 ones upsampled to stride 8, concatenated. The bank holds such
vectors from the good references' views, thinned by greedy coreset selection to a fixed size; a
test patch scores its Euclidean distance to the nearest bank vector.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .compute import CPU_TURN

EMBEDDING_LEVELS = (1, 2)              # strides 8 and 16 of the three levels


def patch_embedding(features: list[torch.Tensor]) -> torch.Tensor:
    """Raw features per level [(N, C_l, h_l, w_l)] -> (N, D, h_1, w_1) patch vectors, D = the
    channels of EMBEDDING_LEVELS."""
    parts = [F.avg_pool2d(features[level], 3, stride=1, padding=1) for level in EMBEDDING_LEVELS]
    size = parts[0].shape[2:]
    return torch.cat([p if p.shape[2:] == size else
                      F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in parts], 1)


def embedding_channels(channels: list[int]) -> int:
    """D of ``patch_embedding`` for a backbone with these channels per level."""
    return sum(channels[level] for level in EMBEDDING_LEVELS)


def flatten(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) -> (N * h * w, D), channel-last."""
    return embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])


def greedy_coreset(vectors: torch.Tensor, size: int, generator: torch.Generator,
                   projection: int = 32, turn: int = 512) -> torch.Tensor:
    """Indices (size,) of ``vectors`` (M, D) that cover them: farthest-point selection on a fixed
    random projection to ``projection`` dims (PatchCore's approximate greedy coreset; 32 dims
    keep the projected vectors in cache). All indices when M <= size.

    The selection loop runs in NumPy: its matrix-vector product and argmax over M take a quarter
    of the time of the same torch calls, whose per-call threading costs more than the work. Runs
    ``turn`` selections per turn on the CPU (see ``compute``)."""
    M = vectors.shape[0]
    if M <= size:
        return torch.arange(M)
    dims = min(projection, vectors.shape[1])
    basis = torch.randn(vectors.shape[1], dims, generator=generator) / dims ** 0.5
    with CPU_TURN:
        projected = (vectors @ basis).contiguous().numpy()                        # (M, dims)
    squares = np.einsum("md,md->m", projected, projected)                        # (M,)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = int(torch.randint(M, (1,), generator=generator))
    nearest = np.full(M, np.inf, dtype=np.float32)                               # (M,) squared
    for block in range(0, size, turn):
        with CPU_TURN:
            for i in range(block, min(block + turn, size)):
                if i:
                    chosen[i] = nearest.argmax()
                c = chosen[i]
                distance = projected @ (-2.0 * projected[c])
                distance += squares
                distance += squares[c]
                np.minimum(nearest, distance, out=nearest)
    return torch.from_numpy(chosen)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, max_elements: int = 1 << 23) -> torch.Tensor:
    """(Q, D) queries, (M, D) bank -> (Q,) Euclidean distance of each query to its nearest bank
    vector, computed in blocks of at most ``max_elements`` distances. Both are first centred on
    the bank's mean: the same distances, with less cancellation in |q|^2 - 2 q.b + |b|^2."""
    rows = max(1, max_elements // max(1, bank.shape[0]))
    center = bank.mean(0) if len(bank) else torch.zeros(bank.shape[1])           # (D,)
    bank = bank - center
    bank_sq = bank.pow(2).sum(1)                                                  # (M,)
    out = []
    for start in range(0, queries.shape[0], rows):
        q = queries[start:start + rows] - center
        d2 = torch.addmm(bank_sq[None, :], q, bank.T, alpha=-2.0).amin(1) + q.pow(2).sum(1)
        out.append(d2.clamp_min_(0.0).sqrt_())
    return torch.cat(out)


def distance_maps(embeddings: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) patch vectors -> (N, 1, h, w) distances to the nearest bank vector."""
    N, _, h, w = embeddings.shape
    return nearest_distance(flatten(embeddings), bank).reshape(N, 1, h, w)
