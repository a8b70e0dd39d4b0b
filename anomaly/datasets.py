"""Reading evaluation data in the MVTec AD folder layout, and the project's few-shot protocol.

```
<category>/train/good/*                              normal images (reference pool)
<category>/test/good/*                               normal test images
<category>/test/<defect>/*                           defective test images
<category>/ground_truth/<defect>/<stem>_mask.png     optional masks (non-zero = defect)
```
Images may have any common extension (case-insensitive); masks may be named ``<stem>_mask.*``
or ``<stem>.*``. Files whose names start with a dot (e.g. macOS ``._x.png``) are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GOOD = "good"


@dataclass(frozen=True)
class Category:
    """One dataset category: its name (the folder's name) and its root folder."""
    name: str
    root: Path

    @property
    def train_dir(self) -> Path:
        return self.root / "train" / GOOD

    @property
    def test_dir(self) -> Path:
        return self.root / "test"

    @property
    def ground_truth_dir(self) -> Path:
        return self.root / "ground_truth"


@dataclass(frozen=True)
class Sample:
    """One test image; label True = defective; mask_path None when no mask was found."""
    path: Path
    defect_type: str
    label: bool
    mask_path: Path | None


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def discover(directory: str | Path) -> Category:
    """Check that ``directory`` holds one category in the MVTec AD layout -> Category.

    Raises ValueError naming what is missing: train/good with images, test/ with a good
    folder and at least one defect folder, each holding images.
    """
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"{directory}: not a directory")
    category = Category(root.name, root)
    if not category.train_dir.is_dir() or not list_images(category.train_dir):
        raise ValueError(f"{root}: expected normal reference images in train/good/ "
                         f"(MVTec AD layout: train/good, test/good, test/<defect>)")
    if not category.test_dir.is_dir():
        raise ValueError(f"{root}: no test/ folder (expected test/good and test/<defect>)")
    folders = _test_folders(category)
    if GOOD not in folders:
        raise ValueError(f"{root}: no test/good/ folder of normal test images")
    if len(folders) < 2:
        raise ValueError(f"{root}: test/ has no defect folder besides good/")
    empty = [name for name, folder in folders.items() if not list_images(folder)]
    if empty:
        raise ValueError(f"{root}: test folders without images ({', '.join(IMAGE_EXTENSIONS)}): "
                         f"{', '.join(empty)}")
    return category


def reference_paths(category: Category | str | Path, shots: int, seed: int) -> list[Path]:
    """The k = ``shots`` references of ``seed``: sorted(train/good)[seed * k:(seed + 1) * k]."""
    category = category if isinstance(category, Category) else discover(category)
    if shots < 1:
        raise ValueError(f"shots={shots}; must be at least 1")
    if seed < 0:
        raise ValueError(f"seed={seed}; must be 0 or more")
    pool = list_images(category.train_dir)
    if (seed + 1) * shots > len(pool):
        raise ValueError(f"{category.name}: shots={shots} with seed={seed} needs "
                         f"{(seed + 1) * shots} images in train/good, it has {len(pool)} "
                         f"(largest seed for {shots} shots: {len(pool) // shots - 1})")
    return pool[seed * shots:(seed + 1) * shots]


def test_samples(category: Category | str | Path) -> list[Sample]:
    """All test images, by folder name then file name, with labels and masks where found."""
    category = category if isinstance(category, Category) else discover(category)
    samples = []
    for defect, folder in _test_folders(category).items():
        masks = _mask_index(category.ground_truth_dir / defect) if defect != GOOD else {}
        for path in list_images(folder):
            mask = masks.get(f"{path.stem}_mask", masks.get(path.stem))
            samples.append(Sample(path, defect, defect != GOOD, mask))
    return samples


test_samples.__test__ = False  # not a pytest test, even when a test module imports it by name


def load_mask(path: str | Path, size: int) -> np.ndarray:
    """Mask file -> (size, size) bool, resized with nearest neighbour; True = defect.

    Lossless masks count every non-zero pixel; JPEG masks are cut at 128 to drop artefacts.
    """
    if size < 1:
        raise ValueError(f"size={size}; must be at least 1")
    with Image.open(path) as image:
        cut = 127 if image.format == "JPEG" else 0
        grey = ImageOps.exif_transpose(image).convert("L")
    resized = grey.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(resized) > cut


def _test_folders(category: Category) -> dict[str, Path]:
    """Folder name -> folder for every sub-folder of test/, sorted by name."""
    return {p.name: p for p in sorted(category.test_dir.iterdir())
            if p.is_dir() and not p.name.startswith(".")}


def _mask_index(folder: Path) -> dict[str, Path]:
    """Stem -> mask file for the images in ``folder``; empty when the folder does not exist."""
    return {p.stem: p for p in list_images(folder)} if folder.is_dir() else {}
