"""Benchmarks of the app's PFM detector against baselines; not part of the app.

Run from the repository root: ``python -m anomaly bench --json out.json`` (see bench.cli).
anomalib's PatchCore and PaDiM need ``pip install --no-deps -r requirements-bench.txt``.
"""
