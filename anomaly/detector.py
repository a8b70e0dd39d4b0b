"""The PFM detector: fit on a few good images, then score new images with an anomaly map.

    det = PFMDetector(DetectorConfig())
    det.fit(["good1.png", "good2.png", ...])
    pred = det.predict("test.png")      # Prediction(anomaly_map, pred_score, norm_score, ...)
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbones import BACKBONE_PAIRS, DEFAULT_PAIR, load_pair
from .calibration import GoodScoreModel, verdict
from .compute import CPU_TURN
from .heads import compiled_heads, fitted_heads, mapping_parameters
from .image_io import ImageLike, load_image, square_pixels
from .mapping import FeatureVectors, PFMMappings, TrainingSchedule, train_mappings
from .memory_bank import distance_maps, embedding_channels, flatten, greedy_coreset, patch_embedding
from .postprocess import normalize, resize_map
from .runtime import CompiledModule, default_runtime
from .scoring import SCORES, combine, image_scores, smooth, smooth_array
from .serialization import load_detector, save_detector
from .settings import DEFAULT_IMAGE_SIZE
from .settings import MAX_FIT_REFERENCES as MAX_REFERENCES

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
LEAVE_ONE_OUT_MAX = 32    # references scored leave-one-out for the calibration, at most
SCORING_CHUNK = 4          # held-out views scored per turn on the CPU (see compute.CPU_TURN)
FIT_PRECISION = "f32"      # the training views' features: the bank and the nets learn from
                           # float32 features even where predictions run in bfloat16 (see README)


@dataclass
class DetectorConfig:
    """Everything that defines a detector; saved with its weights. ``RANGES`` bounds every number."""

    backbone: str = DEFAULT_PAIR        # key of anomaly.backbones.BACKBONE_PAIRS
    image_size: int = DEFAULT_IMAGE_SIZE  # images are resized (no crop) to image_size^2 (320)
    resize: str = "stretch"             # "stretch" to a square, or "pad": keep the aspect ratio
                                        # and mirror-pad (see README: non-square images)
    score: str = "hybrid"               # "hybrid": PFM's mapping error + the memory bank's
                                        # distance, each over its good-image scale; "pfm", "knn"
    latent_ratio: float = 1.0           # latent width c = max(min_latent, ratio * max(C_S, C_T))
    min_latent: int = 48
    position_encoding: bool = False     # PEFM: add a 2-D sinusoidal encoding to the net inputs
    views: int = 48                     # training views in all (>= 1 per reference)
    flips: bool = True                  # augment with horizontal/vertical flips
    rotation: float = 15.0              # augment with rotations up to this many degrees
    shift: float = 0.04                 # ... and shifts up to this fraction of the side
    steps: int = 100                    # optimiser steps (Adam, cosine-decayed learning rate)
    batch: int = 512                    # feature vectors per level per step (100 x 512: the same
                                        # vectors as 200 x 256 in fewer, larger steps)
    lr: float = 1e-2
    weight_decay: float = 1e-5
    bank_size: int = 4096               # memory bank vectors kept by greedy coreset selection
    sigma: float = 4.0                  # Gaussian smoothing of the map, in pixels at 256 px
    holdout_steps: float = 0.6          # steps before the held-out references join training
    false_alarm_budget: float = 0.05    # expected share of good parts not called OK (REVIEW or
                                        # DEFECT): the threshold is that quantile of good scores
    defect_rate_ratio: float = 0.1      # DEFECT above the score that this share of the budget's
                                        # good parts reach; REVIEW between the two thresholds
    single_reference_margin: float = 0.25  # k = 1: augmented views score this much lower
    seed: int = 0

    RANGES = {"image_size": (64, 1024), "latent_ratio": (0.05, 2.0), "min_latent": (1, 512),
              "views": (1, 1000), "rotation": (0.0, 180.0), "shift": (0.0, 0.5), "steps": (1, 10_000),
              "batch": (1, 8192), "lr": (1e-6, 1.0), "weight_decay": (0.0, 1.0), "bank_size": (16, 65_536),
              "sigma": (0.0, 32.0), "holdout_steps": (0.01, 0.99), "false_alarm_budget": (1e-4, 0.5),
              "defect_rate_ratio": (1e-3, 1.0),
              "single_reference_margin": (0.0, 10.0), "seed": (0, 2**31 - 1)}

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_PAIRS:
            raise ValueError(f"backbone {self.backbone!r} unknown; choose one of {sorted(BACKBONE_PAIRS)}")
        for name, (lo, hi) in self.RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")
        if self.image_size % 16:
            raise ValueError(f"image_size {self.image_size} must be a multiple of 16 in [64, 1024]")
        if self.resize not in ("stretch", "pad"):
            raise ValueError(f"resize must be 'stretch' or 'pad', got {self.resize!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {sorted(SCORES)}, got {self.score!r}")


@dataclass
class FitReport:
    n_references: int
    n_views: int
    seconds: float
    threshold: float
    steps: int                          # optimiser steps done (always config.steps)


@dataclass
class Prediction:
    """One scored image. anomaly_map is (H, W) float32; ``verdict`` is OK (score <= threshold),
    REVIEW or DEFECT (score > defect_threshold); pred_label is True unless the verdict is OK."""

    anomaly_map: np.ndarray
    pred_score: float
    norm_score: float
    threshold: float
    defect_threshold: float
    extras: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return verdict(self.pred_score, self.threshold, self.defect_threshold)

    @property
    def pred_label(self) -> bool:
        return self.pred_score > self.threshold


def to_tensor(images: Sequence[Image.Image], size: int, resize: str = "stretch"
              ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """RGB PIL images -> ((B, 3, size, size) float in [0, 1], content (h, w) of each).

    "stretch" resizes every image to size x size (content = the whole square); "pad" keeps the
    aspect ratio (longer side = size) and fills the rest by mirroring the image, content at
    the top left.
    """
    arrays, content = zip(*(square_pixels(im, size, resize) for im in images)) if images else ((), ())
    content = list(content)
    # in NumPy: a multi-threaded torch op here would leave OpenMP's threads spinning on the
    # cores that a compiled runtime is about to use (see FeatureExtractor.unnormalised)
    # C-contiguous: a strided array would cost the compiled runtime's input a copy
    pixels = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32, order="C") / np.float32(255.0)
    return torch.from_numpy(pixels), content


def augment(images: torch.Tensor, n_views: int, cfg: DetectorConfig, generator: torch.Generator) -> torch.Tensor:
    """(K, 3, S, S) references -> (K * n_views, 3, S, S); view 0 of each is the original.

    Random flips, rotations and shifts, reflection-padded so no black corners appear.
    """
    if n_views == 1:
        return images
    reps = images.repeat_interleave(n_views, dim=0)                       # (K*V, 3, S, S)
    N = reps.shape[0]
    angle = (torch.rand(N, generator=generator) * 2 - 1) * math.radians(cfg.rotation)
    shift = (torch.rand(N, 2, generator=generator) * 2 - 1) * cfg.shift * 2
    flip = torch.ones(N, 2)
    if cfg.flips:
        flip = torch.where(torch.rand(N, 2, generator=generator) < 0.5, -1.0, 1.0)
    original = torch.arange(N) % n_views == 0
    angle[original], shift[original], flip[original] = 0.0, 0.0, 1.0
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * flip[:, 0], -sin * flip[:, 1], shift[:, 0]], 1),
                         torch.stack([sin * flip[:, 0], cos * flip[:, 1], shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(reps.shape), align_corners=False)
    return F.grid_sample(reps, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class PFMDetector:
    """Pre-trained feature mapping (Wan et al. 2022) for few-shot anomaly detection, with a
    nearest-neighbour memory bank on the same features as a second score.

    Holds the shared frozen backbones (``backbones``, never modified), its own mapping nets
    (``mappings``), memory bank (``bank``, (M, D)), the two maps' good-image scales
    (``scales``, (2,)), the calibration scores of good images it did not learn from and the
    threshold derived from them.
    """

    config_class = DetectorConfig

    def __init__(self, config: DetectorConfig | None = None, runtime: str | None = None):
        """``runtime``: where the backbones and the scoring heads run, "openvino" or "torch"
        (default: ``anomaly.runtime.default_runtime()``); it changes speed, and the maps only
        within the runtime's precision (see ``anomaly.runtime``)."""
        self.config = config or DetectorConfig()
        runtime = runtime or default_runtime()
        self.backbones = load_pair(self.config.backbone, runtime)
        self.mappings = self._new_mappings()
        self._heads = (compiled_heads(self.mappings, self.config.sigma, self.config.image_size)
                       if runtime == "openvino" else None)
        self.bank = torch.empty(0, self.embedding_channels)
        self.scales = torch.ones(2)
        self.calibration_scores = torch.empty(0)     # (n,) the held-out references' views
        self.reference_scores = torch.empty(0)       # (k,) each reference, leave-one-out
        self.good_scores: GoodScoreModel | None = None
        self._threshold = self._defect_threshold = float("nan")
        self._own_heads: tuple[tuple, CompiledModule] | None = None     # (fitted state, its graph)

    def _new_mappings(self) -> PFMMappings:
        cfg = self.config
        source, target = self.backbones.source.channels, self.backbones.target.channels
        latents = [max(cfg.min_latent, round(cfg.latent_ratio * max(cs, ct))) for cs, ct in zip(source, target)]
        return PFMMappings(source, target, latents, cfg.position_encoding)

    @property
    def runtime(self) -> str:
        """Where it computes: "openvino" where the backbones and the heads both run there,
        else "torch" (also once an export failed, for the sizes that then run in PyTorch)."""
        heads = "torch" if self._heads is None or self._heads.failed_shapes else "openvino"
        return heads if self.backbones.runtime == heads else "torch"

    @property
    def embedding_channels(self) -> int:
        """D, the length of a memory-bank vector."""
        return embedding_channels(self.backbones.source.channels)

    # ------------------------------------------------------------------ fitted state

    @property
    def is_fitted(self) -> bool:
        return not math.isnan(self._threshold)

    @property
    def threshold(self) -> float:
        """The OK / REVIEW boundary: the estimated score that ``false_alarm_budget`` of good
        parts exceed."""
        self._require_fitted()
        return self._threshold

    @property
    def defect_threshold(self) -> float:
        """The REVIEW / DEFECT boundary (>= threshold)."""
        self._require_fitted()
        return self._defect_threshold

    def expected_false_alarm_rate(self, threshold: float) -> float:
        """Estimated share of good parts that score above ``threshold``."""
        if self.good_scores is None:
            self._require_fitted()
        return self.good_scores.false_alarm_rate(threshold)

    def defect_threshold_for(self, threshold: float) -> float:
        """The DEFECT boundary that goes with an OK boundary ``threshold``: where the expected
        false-alarm rate is ``defect_rate_ratio`` of ``threshold``'s (never below it)."""
        rate = self.expected_false_alarm_rate(threshold) * self.config.defect_rate_ratio
        if rate <= 0.0:
            return float(threshold)
        return max(float(threshold), self.good_scores.threshold_for(rate))

    def thresholds_for(self, false_alarm_budget: float) -> tuple[float, float]:
        """(threshold, defect_threshold) for a budget: the expected share of good parts that
        are not called OK."""
        if self.good_scores is None:
            self._require_fitted()
        threshold = float(np.float32(self.good_scores.threshold_for(false_alarm_budget)))
        return threshold, float(np.float32(self.defect_threshold_for(threshold)))

    def set_false_alarm_budget(self, false_alarm_budget: float) -> None:
        """Re-threshold for another budget (the config records it; nothing is refitted)."""
        thresholds = self.thresholds_for(false_alarm_budget)
        self.config = replace(self.config, false_alarm_budget=float(false_alarm_budget))
        self._threshold, self._defect_threshold = thresholds

    @property
    def score_range(self) -> tuple[float, float]:
        """Raw scores mapped to 0 and 1 by ``norm_score`` (threshold maps to 0.5)."""
        thr = self.threshold
        lo = float(self.calibration_scores.min()) * 0.5 if len(self.calibration_scores) else 0.0
        lo = min(lo, thr * 0.5)
        return lo, thr + (thr - lo)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything fitted, by name: what a detector file holds besides the config."""
        model = self.good_scores.as_array() if self.good_scores else np.full(2, np.nan)
        return {**{f"mappings.{k}": v for k, v in self.mappings.state_dict().items()},
                "bank": self.bank, "scales": self.scales, "calibration_scores": self.calibration_scores,
                "reference_scores": self.reference_scores, "good_score_model": torch.from_numpy(model),
                "threshold": torch.tensor(self._threshold), "defect_threshold": torch.tensor(self._defect_threshold)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Adopt ``tensors()`` of a detector with the same config (shapes checked by the caller)."""
        self.mappings.load_state_dict({k.removeprefix("mappings."): v for k, v in tensors.items()
                                       if k.startswith("mappings.")})
        self.mappings.eval()
        self._own_heads = None                   # the nets changed in place
        self.bank, self.scales = tensors["bank"], tensors["scales"]
        self.calibration_scores = tensors["calibration_scores"]
        self.reference_scores = tensors["reference_scores"]
        self.good_scores = GoodScoreModel.from_array(tensors["good_score_model"].tolist())
        self._threshold = float(tensors["threshold"])
        self._defect_threshold = float(tensors["defect_threshold"])

    def save(self, path) -> Path:
        """Write the fitted detector to one .safetensors file (no pickled objects)."""
        return save_detector(self, path)

    @classmethod
    def load(cls, path) -> "PFMDetector":
        """Read a detector saved by ``save``; ValueError for a corrupt or foreign file."""
        return load_detector(cls, path)

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("the detector is not fitted yet: call fit() with good reference images first")

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def _components(self, mappings: PFMMappings, bank: torch.Tensor, source: list[torch.Tensor],
                    target: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw features per level [(B, C_l, h_l, w_l)] -> [PFM error, bank distance], each
        (B, h_0, w_0) unsmoothed at the finest level's resolution; a map of weight 0 is zeros."""
        weights = SCORES[self.config.score]
        zeros = torch.zeros_like(source[0][:, 0])                                           # (B, h_0, w_0)
        with CPU_TURN:
            compiled = self._compiled_maps(mappings, bank, source, target, torch.ones(2))
            if compiled is not None:
                return [m if w else zeros for m, w in zip(compiled[:2], weights)]
            pfm = mappings.error_maps(unit(source), unit(target)) if weights[0] else zeros
            knn = zeros
            if weights[1]:
                knn = distance_maps(patch_embedding(source), bank)                         # (B, 1, h_1, w_1)
                knn = F.interpolate(knn, size=source[0].shape[2:], mode="bilinear", align_corners=False)[:, 0]
            return [pfm, knn]

    def _compiled_maps(self, mappings: PFMMappings, bank: torch.Tensor, source: list[torch.Tensor],
                       target: list[torch.Tensor], scales: torch.Tensor) -> list[torch.Tensor] | None:
        """The scoring heads on the compiled runtime, image by image -> [PFM error (B, h_0, w_0),
        bank distance (B, h_0, w_0), combined map unsmoothed (B, h_0, w_0)]; None where they run
        in PyTorch."""
        if self._heads is None:
            return None
        if not len(bank):                      # a score without the bank: any vector will do
            bank = torch.zeros(1, self.embedding_channels)
        shared = mapping_parameters(mappings) + [bank.numpy(), scales.numpy().astype(np.float32),
                                                  np.array(SCORES[self.config.score], np.float32)]
        return _per_image(self._heads, [*source, *target], shared)

    def _fitted_heads(self) -> CompiledModule | None:
        """The scoring heads compiled with this detector's fitted nets, bank and scales as
        constants (faster than ``compiled_heads``), built on the first prediction after a fit or
        load; None where the heads run in PyTorch."""
        if self._heads is None:
            return None
        state = (self.mappings, self.bank, self.scales)
        if self._own_heads is None or any(a is not b for a, b in zip(self._own_heads[0], state)):
            bank = self.bank if len(self.bank) else torch.zeros(1, self.embedding_channels)
            self._own_heads = (state, fitted_heads(self.mappings, bank, self.scales, SCORES[self.config.score],
                                                   self.config.sigma, self.config.image_size))
        return self._own_heads[1]

    def _fitted_maps(self, features: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor | None:
        """Raw (source, target) features per level -> (B, h_0, w_0) combined maps, unsmoothed, by
        ``_fitted_heads``, image by image; None where they do not run."""
        heads = self._fitted_heads()
        outputs = None if heads is None else _per_image(heads, [*features[0], *features[1]])
        return None if outputs is None else outputs[2]

    def _smoothed(self, components: list[torch.Tensor], scales: torch.Tensor) -> torch.Tensor:
        """``_components`` -> (B, S, S) final anomaly maps."""
        combined = combine(components, SCORES[self.config.score], scales)
        return smooth(combined, self.config.sigma, self.config.image_size)

    # ------------------------------------------------------------------ public API

    @torch.inference_mode()
    def warm(self) -> None:
        """Build what a fit and predictions at this config need on the compiled runtime (both
        backbones' and the heads' graphs, shared by every detector alike, and a fitted
        detector's own heads), so that the first fit or prediction does not wait for it;
        nothing to build in PyTorch."""
        image = torch.zeros(1, 3, self.config.image_size, self.config.image_size)
        # in the order a fit needs them; each piece takes its own turn on the CPU, so a fit that
        # starts meanwhile goes ahead with what is built (and waits for a graph being built)
        features = self.backbones.features(image, precision=FIT_PRECISION)
        with CPU_TURN:
            self._compiled_maps(self._new_mappings(), torch.zeros(1, self.embedding_channels), *features,
                                torch.ones(2))
        predicted = self.backbones.features(image)
        if self.is_fitted:
            with CPU_TURN:
                self._fitted_maps(predicted)

    def fit(self, images: Sequence[ImageLike], progress: Progress | None = None) -> FitReport:
        """Learn from k good images (1 <= k <= MAX_REFERENCES) and calibrate the threshold.

        ceil(k / 3) held-out references (none for k = 1) stay out of the mapping nets' first
        ``holdout_steps`` of training, and each is scored against the memory bank without its
        own vectors: their views set both maps' scales and the calibration scores. With one
        reference, fresh augmented views of it play that part, their scores raised by
        ``single_reference_margin``.
        """
        cfg = self.config
        if isinstance(images, (str, bytes, Image.Image, np.ndarray)):
            images = [images]
        k = len(images)
        if not 1 <= k <= MAX_REFERENCES:
            raise ValueError(f"fit needs between 1 and {MAX_REFERENCES} good reference images, got {k}")
        started = time.perf_counter()
        report = _stage(progress)
        pil = [load_image(im, name=f"reference {i + 1}") for i, im in enumerate(images)]
        refs, _ = to_tensor(pil, cfg.image_size, cfg.resize)                             # (k, 3, S, S)
        n_views = max(1, math.ceil(cfg.views / k))
        views = augment(refs, n_views, cfg, torch.Generator().manual_seed(cfg.seed))     # (k*V, 3, S, S)
        feats_s, feats_t = self.backbones.features(views, report(0.0, 0.3), precision=FIT_PRECISION)
        bank, bank_view = self._memory_bank(feats_s, report(0.3, 0.4))                    # (M, D), (M,)
        with CPU_TURN:
            unit_s, unit_t = unit(feats_s), unit(feats_t)                                 # PFM's inputs

        reference = torch.arange(k).repeat_interleave(n_views)                            # (k*V,) of each view
        held_out = _held_out(k, cfg.seed)[reference]                                      # (k*V,) bool
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            mappings = self._new_mappings()
        schedule = TrainingSchedule(cfg.steps, cfg.batch, cfg.lr, cfg.weight_decay)
        calibration: list[list[torch.Tensor]] = []

        def score_held_out(partial: PFMMappings) -> None:
            """Each held-out reference's views, by the nets trained without them and the bank
            without that reference's own vectors."""
            parts = []
            for r in reference[held_out].unique().tolist():
                others = bank[reference[bank_view] != r]
                views = (reference == r).nonzero()[:, 0]
                for chunk in views.split(SCORING_CHUNK):        # one short turn on the CPU each
                    parts.append(self._components(partial, others, [f[chunk] for f in feats_s],
                                                  [f[chunk] for f in feats_t]))
            calibration.append([torch.cat(maps) for maps in zip(*parts)])

        with CPU_TURN:
            if held_out.any():
                first = round(cfg.steps * cfg.holdout_steps)
                phases = [(FeatureVectors([f[~held_out] for f in unit_s]),
                           FeatureVectors([f[~held_out] for f in unit_t]), first),
                          (FeatureVectors(unit_s), FeatureVectors(unit_t), cfg.steps - first)]
            else:
                phases = [(FeatureVectors(unit_s), FeatureVectors(unit_t), cfg.steps)]
        train_mappings(mappings, phases, schedule, cfg.seed, report(0.4, 0.95), between=score_held_out)
        margin = 0.0
        if not calibration:   # a single reference: fresh augmented views of it stand in
            fresh = augment(refs, 9, cfg, torch.Generator().manual_seed(cfg.seed + 1))[1:]
            calibration.append(self._components(mappings, bank, *self.backbones.features(fresh)))  # as predicted
            margin = cfg.single_reference_margin
        components = calibration[0]
        scales = torch.stack([c.mean() if c.any() else torch.tensor(1.0) for c in components])
        scores = image_scores(self._smoothed(components, scales)) * (1.0 + margin)
        originals = torch.arange(k) * n_views                                              # view 0 of each
        loo = self._leave_one_out(mappings, bank, reference[bank_view], scales,
                                  [f[originals] for f in feats_s], [f[originals] for f in feats_t])

        self.mappings, self.bank, self.scales = mappings, bank, scales
        self.calibration_scores, self.reference_scores = scores, loo
        self.good_scores = GoodScoreModel.fit(scores.numpy(), loo.numpy(), k, max(1, held_out_count(k)))
        self._threshold, self._defect_threshold = self.thresholds_for(cfg.false_alarm_budget)
        seconds = time.perf_counter() - started
        if progress:
            progress(1.0, "done")
        log.info("fitted on %d references (%d views) in %.1f s, thresholds %.4f / %.4f",
                 k, views.shape[0], seconds, self._threshold, self._defect_threshold)
        return FitReport(k, views.shape[0], seconds, self._threshold, cfg.steps)

    def _leave_one_out(self, mappings: PFMMappings, bank: torch.Tensor, bank_reference: torch.Tensor,
                       scales: torch.Tensor, source: list[torch.Tensor], target: list[torch.Tensor]
                       ) -> torch.Tensor:
        """Each reference's original image scored by the fitted nets and the bank without that
        reference's own vectors -> (k,) scores (empty for k = 1, where no bank remains).

        ``bank_reference`` (M,): the reference each bank vector came from; ``source`` and
        ``target``: the originals' raw features per level [(k, C_l, h_l, w_l)]. At most
        ``LEAVE_ONE_OUT_MAX`` references, spread evenly, are scored."""
        k = source[0].shape[0]
        if k < 2:
            return torch.empty(0)
        chosen = torch.linspace(0, k - 1, min(k, LEAVE_ONE_OUT_MAX)).round().long().unique()
        scores = []
        for r in chosen.tolist():
            others = bank[bank_reference != r] if SCORES[self.config.score][1] else bank
            components = self._components(mappings, others, [f[r:r + 1] for f in source],
                                          [f[r:r + 1] for f in target])
            scores.append(image_scores(self._smoothed(components, scales)))
        return torch.cat(scores)

    def _memory_bank(self, feats_s: list[torch.Tensor], progress: Progress | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training views' raw source features -> (bank (M, D), index of the view each vector came
        from (M,)), M <= bank_size, by greedy coreset selection; an empty bank where the score
        does not use it."""
        if not SCORES[self.config.score][1]:
            return torch.empty(0, self.embedding_channels), torch.empty(0, dtype=torch.long)
        with CPU_TURN:
            embeddings = patch_embedding(feats_s)                                     # (V, D, h, w)
            V, _, h, w = embeddings.shape
            vectors = flatten(embeddings)                                             # (V*h*w, D)
        if progress:
            progress(0.0, "building the memory bank")
        chosen = greedy_coreset(vectors, self.config.bank_size, torch.Generator().manual_seed(self.config.seed))
        return vectors[chosen].contiguous(), chosen // (h * w)

    @torch.inference_mode()
    def anomaly_maps(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (maps (N, S, S) float32 at the model's resolution, scores (N,))."""
        self._require_fitted()
        pil = [load_image(im, name=f"image {i + 1}") for i, im in enumerate(images)]
        return self._maps_of(pil)

    @torch.inference_mode()
    def _maps_of(self, pil: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """PIL images -> (maps (N, S, S) float32 over each image's content, scores (N,))."""
        S = self.config.image_size
        x, content = to_tensor(pil, S, self.config.resize)
        with CPU_TURN:
            features = self.backbones.features(x)
            combined = self._fitted_maps(features)
            if combined is None:
                compiled = self._compiled_maps(self.mappings, self.bank, *features, self.scales)
                combined = None if compiled is None else compiled[2]
            if combined is not None:       # smoothed in float32, whatever the graph computed in
                maps = torch.from_numpy(smooth_array(combined.numpy(), self.config.sigma, S))
            else:
                maps = self._smoothed(self._components(self.mappings, self.bank, *features), self.scales)
        if self.config.resize == "pad":   # crop the mirrored margin, stretch the content to S x S
            maps = torch.cat([F.interpolate(m[None, None, :h, :w], size=(S, S), mode="bilinear",
                                            align_corners=False)[0] for m, (h, w) in zip(maps, content)])
        maps = maps.numpy().astype(np.float32)
        return maps, maps.reshape(len(maps), -1).max(1)                 # image_scores, in NumPy

    def predict(self, images: ImageLike | Sequence[ImageLike], resolution: str = "input"):
        """One image -> Prediction; a list -> list of Predictions.

        resolution="input" gives each map at its image's own size (H, W); "model" at S x S.
        """
        self._require_fitted()
        if resolution not in ("input", "model"):
            raise ValueError(f"resolution must be 'input' or 'model', got {resolution!r}")
        single = isinstance(images, (str, bytes, Image.Image, np.ndarray)) or not isinstance(images, Sequence)
        batch = [images] if single else list(images)
        if not batch:
            return []
        pil = [load_image(im, name=f"image {i + 1}") for i, im in enumerate(batch)]
        maps, scores = self._maps_of(pil)
        thr, defect = self.threshold, self.defect_threshold
        lo, hi = self.score_range
        out = []
        for im, amap, score in zip(pil, maps, scores):
            if resolution == "input":
                amap = resize_map(amap, im.size)
            out.append(Prediction(amap, float(score), float(normalize(float(score), thr, lo, hi)), thr, defect))
        return out[0] if single else out


def _per_image(heads: CompiledModule, features: list[torch.Tensor], constants: Sequence[np.ndarray] = ()
               ) -> list[torch.Tensor] | None:
    """A compiled heads graph run image by image: raw features per level [(B, C_l, h_l, w_l)]
    (source levels, then target levels) and the inputs every image shares -> its outputs, each
    concatenated over the batch; None where the graph does not run."""
    per_image = []
    for i in range(features[0].shape[0]):
        outputs = heads.run([np.ascontiguousarray(f[i:i + 1].numpy()) for f in features] + list(constants))
        if outputs is None:
            return None
        per_image.append(outputs)
    return [torch.from_numpy(np.concatenate(maps)) for maps in zip(*per_image)]


def unit(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Features per level [(B, C, h, w)] -> the same, L2-normalised over channels (PFM's inputs)."""
    return [F.normalize(f, dim=1) for f in features]


def held_out_count(k: int) -> int:
    """How many of k references calibrate the threshold: ceil(k / 3), none for k = 1."""
    return math.ceil(k / 3) if k > 1 else 0


def _held_out(k: int, seed: int) -> torch.Tensor:
    """(k,) bool: which references are held out (``held_out_count`` of them, chosen by seed)."""
    mask = torch.zeros(k, dtype=torch.bool)
    mask[torch.randperm(k, generator=torch.Generator().manual_seed(seed))[:held_out_count(k)]] = True
    return mask


def _sub(progress: Progress | None, start: float, end: float) -> Progress | None:
    """A progress callback that maps [0, 1] onto [start, end] of ``progress``."""
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * fraction, message)


def _stage(progress: Progress | None):
    return lambda start, end: _sub(progress, start, end)
