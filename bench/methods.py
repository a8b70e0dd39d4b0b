"""The methods under test, behind one interface: ``fit(images)``, ``maps(images)``, ``predict(image)``.

- ``pfm``: the app's detector, default configuration (EfficientNet-Lite0 -> Lite1).
- ``knn``: a compact PatchCore-style memory bank on the app's own EfficientNet-Lite0 features
  (strides 8 and 16, 3x3 average-pooled, stride 16 upsampled to 8, concatenated), distance to
  the nearest reference patch, upsampled and smoothed like PFM's map; image score = max.
- ``patchcore`` / ``padim``: anomalib's own torch models with the same offline EfficientNet-Lite0
  weights loaded into their timm feature extractors (their defaults otherwise: PatchCore with
  a 10 % coreset and 9-neighbour reweighting, PaDiM with 100 random channels of strides 4/8/16).

Every method sees the same RGB PIL images, resized by ``anomaly.detector.to_tensor`` to S x S.
``pfm`` and ``knn`` run their backbones (PFM its scoring heads too) on a chosen runtime
(``anomaly.runtime.RUNTIMES``: OpenVINO or PyTorch eager); anomalib's models run in PyTorch eager.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from anomaly.backbones import EFFNET_LITE_NORM, build_effnet_lite_classifier, load_extractor
from anomaly.detector import DetectorConfig, PFMDetector, to_tensor
from anomaly.scoring import gaussian_blur

METHODS = ("pfm", "knn", "patchcore", "padim")
ANOMALIB_METHODS = ("patchcore", "padim")
RUNTIME_METHODS = ("pfm", "knn")              # backbones on anomaly.backbones' runtimes
LABELS = {"pfm": "PFM (app)", "knn": "kNN bank (bench)", "patchcore": "anomalib PatchCore",
          "padim": "anomalib PaDiM"}
BASELINE_BACKBONE = "efficientnet_lite0"      # the source network of the app's default pair
ANOMALIB_INSTALL = "pip install --no-deps -r requirements-bench.txt"


class Method(Protocol):
    name: str
    runtime: str            # where its networks ran: "openvino" or "torch"

    def fit(self, images: list[Image.Image]) -> None:
        """Learn from k good RGB images."""

    def maps(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (maps (N, S, S) float32 at the model's resolution, image scores (N,))."""

    def predict(self, image: Image.Image) -> tuple[np.ndarray, float]:
        """One image (batch of one) -> (map (H, W) at the image's own size, image score)."""


def build_method(name: str, image_size: int = 256, seed: int = 0, runtime: str | None = None) -> Method:
    """A fresh, unfitted method ``name`` (one of METHODS); ``runtime`` for RUNTIME_METHODS
    (default: ``anomaly.runtime.default_runtime()``), ignored by anomalib's."""
    if name == "pfm":
        return PFMMethod(image_size, seed, runtime)
    if name == "knn":
        return KnnBaseline(image_size, runtime=runtime)
    if name == "patchcore":
        return AnomalibPatchCore(image_size, seed)
    if name == "padim":
        return AnomalibPadim(image_size, seed)
    raise ValueError(f"method {name!r} unknown; choose from {', '.join(METHODS)}")


def anomalib_version() -> str | None:
    """The installed anomalib version, or None when it is not importable."""
    try:
        import anomalib
    except ImportError:
        return None
    return anomalib.__version__


class PFMMethod:
    """The app's detector as the app uses it (default DetectorConfig, this seed)."""

    name = "pfm"

    def __init__(self, image_size: int = 256, seed: int = 0, runtime: str | None = None):
        self.detector = PFMDetector(DetectorConfig(image_size=image_size, seed=seed), runtime=runtime)

    @property
    def runtime(self) -> str:
        return self.detector.runtime

    def fit(self, images: list[Image.Image]) -> None:
        self.detector.fit(images)

    def maps(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        return self.detector.anomaly_maps(images)

    def predict(self, image: Image.Image) -> tuple[np.ndarray, float]:
        pred = self.detector.predict(image)
        return pred.anomaly_map, pred.pred_score


class _TensorMethod:
    """Shared plumbing: PIL -> (B, 3, S, S) in [0, 1], batched maps, maps at input resolution."""

    name = ""
    batch = 8

    def __init__(self, image_size: int):
        self.image_size = image_size

    def _tensor(self, images: list[Image.Image]) -> torch.Tensor:
        return to_tensor([im.convert("RGB") for im in images], self.image_size)[0]

    def _fit_tensor(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _maps_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [0, 1] -> (maps (B, S, S), scores (B,))."""
        raise NotImplementedError

    def fit(self, images: list[Image.Image]) -> None:
        self._fit_tensor(self._tensor(images))

    @torch.inference_mode()
    def maps(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = [], []
        for start in range(0, len(images), self.batch):
            m, s = self._maps_tensor(self._tensor(images[start:start + self.batch]))
            maps.append(m.float().numpy())
            scores.append(s.float().numpy())
        return np.concatenate(maps).astype(np.float32), np.concatenate(scores)

    @torch.inference_mode()
    def predict(self, image: Image.Image) -> tuple[np.ndarray, float]:
        maps, scores = self._maps_tensor(self._tensor([image]))
        amap = F.interpolate(maps[:, None], size=(image.height, image.width), mode="bilinear",
                             align_corners=False)[0, 0]
        return amap.numpy(), float(scores[0])


class KnnBaseline(_TensorMethod):
    """PatchCore-style kNN on the app's EfficientNet-Lite0 features, no coreset, no augmentation.

    Patch embedding: the (unit-norm) stride-8 and stride-16 features, each 3x3 average-pooled,
    stride 16 upsampled to stride 8, concatenated -> (h*w, C8 + C16) per image. The bank holds
    every reference patch; a test patch scores its Euclidean distance to the nearest one.
    """

    name = "knn"

    def __init__(self, image_size: int = 256, sigma: float = DetectorConfig.sigma,
                 strides: tuple[int, ...] = (8, 16), max_chunk_elements: int = 1 << 24,
                 runtime: str | None = None):
        super().__init__(image_size)
        self.extractor = load_extractor(BASELINE_BACKBONE, runtime)
        self.levels = [self.extractor.strides.index(s) for s in strides]
        self.sigma = sigma
        self.max_chunk_elements = max_chunk_elements          # floats per distance block
        self.bank = torch.empty(0)

    @property
    def runtime(self) -> str:
        return self.extractor.runtime

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, h, w) locally aggregated patch features at the finest stride."""
        feats = self.extractor(x)
        feats = [F.avg_pool2d(feats[level], 3, stride=1, padding=1) for level in self.levels]
        h, w = feats[0].shape[2:]
        return torch.cat([feats[0]] + [F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
                                       for f in feats[1:]], dim=1)

    @torch.inference_mode()
    def _fit_tensor(self, x: torch.Tensor) -> None:
        parts = []
        for start in range(0, x.shape[0], self.batch):
            e = self.embed(x[start:start + self.batch])                       # (b, C, h, w)
            parts.append(e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]))      # (b*h*w, C)
        self.bank = torch.cat(parts)                                          # (K*h*w, C)

    def nearest_distance(self, queries: torch.Tensor) -> torch.Tensor:
        """(M, C) -> (M,) Euclidean distance to the nearest bank vector, in chunks of queries."""
        rows = max(1, self.max_chunk_elements // max(1, self.bank.shape[0]))
        return torch.cat([torch.cdist(queries[i:i + rows], self.bank).amin(1)
                          for i in range(0, queries.shape[0], rows)])

    def _maps_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank.numel() == 0:
            raise RuntimeError("the kNN baseline is not fitted yet: call fit() first")
        S = self.image_size
        e = self.embed(x)
        B, C, h, w = e.shape
        dist = self.nearest_distance(e.permute(0, 2, 3, 1).reshape(-1, C))   # (B*h*w,)
        maps = F.interpolate(dist.reshape(B, 1, h, w), size=(S, S), mode="bilinear", align_corners=False)
        maps = gaussian_blur(maps[:, 0], self.sigma * S / 256)               # (B, S, S)
        return maps, maps.flatten(1).amax(1)


def _effnet_level_indices(strides: tuple[int, ...]) -> list[int]:
    """timm ``features_only`` out_indices of tf_efficientnet_lite0 at these strides."""
    import timm

    probe = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True)
    reductions = probe.feature_info.reduction()
    return [reductions.index(s) for s in strides]


def _load_offline_weights(timm_extractor) -> None:
    """Copy the app's offline EfficientNet-Lite0 ImageNet weights into anomalib's extractor."""
    features = timm_extractor.feature_extractor                  # timm EfficientNetFeatures
    own = features.state_dict()
    weights = build_effnet_lite_classifier(BASELINE_BACKBONE).state_dict()
    features.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=True)


def _import_anomalib(what: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecation notes of other modules
            if what == "patchcore":
                from anomalib.models.image.patchcore.torch_model import PatchcoreModel as model
            else:
                from anomalib.models.image.padim.torch_model import PadimModel as model
    except ImportError as err:
        raise ImportError(f"anomalib's {what} is not importable ({err}); install the benchmark's "
                          f"requirements: {ANOMALIB_INSTALL}") from err
    return model


class _AnomalibMethod(_TensorMethod):
    """anomalib's torch model fed with EfficientNet-Lite's own input normalisation (mean/std 0.5)."""

    runtime = "torch"

    def __init__(self, image_size: int, seed: int):
        super().__init__(image_size)
        self.seed = seed
        self.mean = torch.tensor(EFFNET_LITE_NORM.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(EFFNET_LITE_NORM.std).view(1, 3, 1, 1)
        self.model = None

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def _collect(self, x: torch.Tensor) -> None:
        """Training-mode forward passes: the model stores the reference embeddings."""
        self.model.train()
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch):
                self.model(self._normalise(x[start:start + self.batch]))

    def _maps_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(self._normalise(x))
        return out.anomaly_map[:, 0], out.pred_score.reshape(-1)


class AnomalibPatchCore(_AnomalibMethod):
    """anomalib PatchcoreModel: strides 8 + 16 of EfficientNet-Lite0, 10 % coreset, 9 neighbours."""

    name = "patchcore"

    def __init__(self, image_size: int = 256, seed: int = 0, coreset_ratio: float = 0.1,
                 num_neighbors: int = 9):
        super().__init__(image_size, seed)
        model = _import_anomalib("patchcore")
        self.coreset_ratio = coreset_ratio
        self.model = model(layers=_effnet_level_indices((8, 16)), backbone="tf_efficientnet_lite0",
                           pre_trained=False, num_neighbors=num_neighbors)
        _load_offline_weights(self.model.feature_extractor)
        self.model.eval()

    def _fit_tensor(self, x: torch.Tensor) -> None:
        self._collect(x)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)                          # coreset's random first centre
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore", DeprecationWarning)   # of an argument not passed
                self.model.subsample_embedding(self.coreset_ratio)    # (and no progress bar)
        self.model.eval()


class AnomalibPadim(_AnomalibMethod):
    """anomalib PadimModel: strides 4 + 8 + 16 of EfficientNet-Lite0 (176 channels), 100 kept."""

    name = "padim"

    def __init__(self, image_size: int = 256, seed: int = 0, n_features: int = 100):
        super().__init__(image_size, seed)
        model = _import_anomalib("padim")
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)                          # the random channel subset
            self.model = model(backbone="tf_efficientnet_lite0", layers=_effnet_level_indices((4, 8, 16)),
                               pre_trained=False, n_features=n_features)
        _load_offline_weights(self.model.feature_extractor)
        self.model.eval()

    def _fit_tensor(self, x: torch.Tensor) -> None:
        self._collect(x)
        self.model.fit()
        self.model.eval()


def views_of(references: list[Image.Image], config: DetectorConfig) -> torch.Tensor:
    """The (V, 3, S, S) training views PFM's fit extracts features from (same count, same seed)."""
    from anomaly.detector import augment

    refs, _ = to_tensor(references, config.image_size, config.resize)
    n_views = max(1, math.ceil(config.views / len(references)))
    return augment(refs, n_views, config, torch.Generator().manual_seed(config.seed))
