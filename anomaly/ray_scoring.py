"""Scoring many image files on a Ray cluster (``python -m anomaly predict ... --engine ray``).

The image paths become a Ray Dataset (``ray.data.from_items``); ``map_batches`` runs a fixed
pool of actors, each of which loads the detector file once and scores its batches with the same
:class:`anomaly.folder_scoring.ImageScorer` as the single-process engine. The driver iterates
the results in order, so rows come back as from ``score_local`` and can be streamed to one file.
Needs ``requirements-ray.txt``; imported only for ``--engine ray``, never by ``import anomaly``.
On a cluster (``address``) the actors get this package's code from the driver (Ray's
``py_modules``); every node must have its requirements installed and see the model file, the
images and the overlay folder at the same paths (shared storage).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import ray

from .folder_scoring import ImageScorer, arrow_schema

BATCH_SIZE = 8          # images per actor call; small, so the last batches spread over workers
PACKAGE = Path(__file__).resolve().parent


class _ActorScorer:
    """The ``map_batches`` callable class: one detector per actor, loaded in ``__init__``."""

    def __init__(self, model: str, threshold: float | None, false_alarm_budget: float | None,
                 alpha: float, cwd: str, threads: int):
        import torch

        torch.set_num_threads(threads)      # before the backbones' runtime sessions are built
        self.scorer = ImageScorer(model, threshold, alpha, cwd, false_alarm_budget)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.scorer.score(item["path"], item["overlay"]) for item in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=arrow_schema())


def score_with_ray(model: str | Path, images: Sequence[Path],
                   overlays: Sequence[Path] | None = None, *, threshold: float | None = None,
                   false_alarm_budget: float | None = None, alpha: float = 0.5, workers: int = 2,
                   address: str | None = None, batch_size: int = BATCH_SIZE) -> Iterator[dict]:
    """Rows of ``images`` in order (as ``folder_scoring.score_local`` gives them), scored by
    ``workers`` Ray actors, each with an ``ImageScorer(model, threshold, alpha, cwd,
    false_alarm_budget)``.

    Uses the Ray instance this process is already connected to; otherwise connects to
    ``address`` (``"auto"``: the cluster ``ray start`` started) or, without one, starts a local
    instance, and shuts it down when the rows are consumed. Each actor reserves
    ``CPUs / workers`` of the cluster's CPUs and runs that many torch threads (at least 1).
    """
    if workers < 1:
        raise ValueError(f"workers={workers}; must be at least 1")
    if not images:
        return
    started = not ray.is_initialized()
    if started and address:             # the actors on every node run this very code
        ray.init(address=address, runtime_env={"py_modules": [str(PACKAGE)]})
    elif started:
        ray.init(address="local", include_dashboard=False)
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    try:
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False          # the CLI prints its own progress
        cpus = ray.cluster_resources().get("CPU", 1.0) / workers
        items = [{"path": str(p), "overlay": str(overlays[i]) if overlays else None}
                 for i, p in enumerate(images)]
        per_call = min(batch_size, math.ceil(len(items) / workers))  # a few images: all busy
        dataset = ray.data.from_items(items,
                                      override_num_blocks=math.ceil(len(items) / per_call))
        scored = dataset.map_batches(
            _ActorScorer, batch_size=per_call, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
            fn_constructor_kwargs={"model": str(Path(model).absolute()), "threshold": threshold,
                                   "false_alarm_budget": false_alarm_budget,
                                   "alpha": alpha, "cwd": os.getcwd(),
                                   "threads": max(1, int(cpus))})
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from batch.to_pylist()
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        if started:
            ray.shutdown()
