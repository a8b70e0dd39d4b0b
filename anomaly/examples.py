"""The example image sets shipped in ``assets/examples`` (built by ``scripts/make_assets.py``).

Layout: ``<category>/references/*.png`` (good images to fit on) and
``<category>/test/{good,defect}_*.png`` (images to score; the name says the true label).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ExampleSet(NamedTuple):
    """One category's example images; unpacks as ``references, tests = example_set``."""

    references: list[Path]      # good images to fit on
    tests: list[Path]           # images to score, named good_* or defect_*

    @property
    def test_labels(self) -> list[bool | None]:
        """Per test image: True = defect, False = good, None = unknown (see example_label)."""
        return [example_label(p) for p in self.tests]


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def example_sets(root: Path | None = None) -> dict[str, ExampleSet]:
    """Category name -> ExampleSet(references, tests), image paths sorted by name.

    Categories without reference images are skipped; a missing ``root`` gives {}.
    """
    root = EXAMPLES_DIR if root is None else Path(root)
    if not root.is_dir():
        return {}
    sets = {}
    for category in sorted(p for p in root.iterdir() if p.is_dir()):
        references = _images(category / "references")
        if references:
            sets[category.name] = ExampleSet(references, _images(category / "test"))
    return sets


def example_label(path: Path | str) -> bool | None:
    """True for a ``defect_*`` example, False for ``good_*``, None for any other name."""
    name = Path(path).name
    if name.startswith("defect_"):
        return True
    if name.startswith("good_"):
        return False
    return None
