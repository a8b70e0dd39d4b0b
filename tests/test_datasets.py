"""anomaly.datasets: the MVTec AD layout on the real data and on hand-made folders."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly import datasets
from anomaly.datasets import Category, discover, load_mask, reference_paths

# category -> (train/good, test good, test defective, defect folders), from shared/data/README.md
REAL = {
    "bottle": (64, 20, 63, {"broken_large", "broken_small", "contamination"}),
    "magnetic_tile": (64, 100, 392, {"blowhole", "break", "crack", "fray", "uneven"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_counts_match_the_readme(data_dir, name):
    n_train, n_good, n_defective, defects = REAL[name]
    category = discover(data_dir / name)
    samples = datasets.test_samples(category)
    assert category.name == name
    assert len(datasets.list_images(category.train_dir)) == n_train
    assert sum(not s.label for s in samples) == n_good
    assert sum(s.label for s in samples) == n_defective
    assert {s.defect_type for s in samples} == defects | {"good"}
    assert all(s.label == (s.defect_type != "good") for s in samples)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_masks_found_for_every_defective_image(data_dir, name):
    samples = datasets.test_samples(discover(data_dir / name))
    for s in samples:
        if s.label:
            assert s.mask_path is not None, s.path
            assert s.mask_path.name == f"{s.path.stem}_mask.png"
            assert s.mask_path.parent.name == s.defect_type
        else:
            assert s.mask_path is None
    defective = [s for s in samples if s.label]
    for s in defective[:: max(1, len(defective) // 10)]:   # a spread sample of masks
        mask = load_mask(s.mask_path, 128)
        assert mask.shape == (128, 128) and mask.dtype == bool


@pytest.mark.slow
def test_real_protocol_slices(data_dir):
    category = discover(data_dir / "magnetic_tile")
    pool = sorted(p for p in category.train_dir.iterdir())
    assert reference_paths(category, 16, 2) == pool[32:48]
    assert reference_paths(data_dir / "magnetic_tile", 1, 0) == pool[:1]
    slices = [set(reference_paths(category, 8, seed)) for seed in range(3)]
    assert not (slices[0] & slices[1]) and not (slices[1] & slices[2])
    assert reference_paths(category, 64, 0) == pool
    with pytest.raises(ValueError, match="needs 80 images in train/good, it has 64"):
        reference_paths(category, 16, 4)


@pytest.mark.parametrize("shots, seed, message", [(0, 0, "shots=0"), (1, -1, "seed=-1")])
def test_reference_paths_rejects_bad_arguments(tmp_path, shots, seed, message):
    with pytest.raises(ValueError, match=message):
        reference_paths(_layout(tmp_path), shots, seed)


def _image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (value, value, value)).save(path)
    return path


def _layout(root: Path) -> Path:
    """A category with mixed extensions, stray non-image files and no ground_truth/."""
    for name in ["b.JPG", "a.png", "c.jpeg", "d.BMP"]:
        _image(root / "train" / "good" / name)
    _image(root / "test" / "good" / "g1.tif")
    _image(root / "test" / "scratch" / "s1.webp")
    _image(root / "test" / "scratch" / "s2.TIFF")
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    (root / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    _image(root / "train" / "good" / "._a.png")         # macOS resource fork, hidden
    return root


def test_mixed_extensions_and_no_ground_truth(tmp_path):
    category = discover(_layout(tmp_path / "widget"))
    assert category == Category("widget", (tmp_path / "widget").resolve())
    assert [p.name for p in reference_paths(category, 2, 0)] == ["a.png", "b.JPG"]
    assert [p.name for p in reference_paths(category, 2, 1)] == ["c.jpeg", "d.BMP"]
    samples = datasets.test_samples(category)
    assert [(s.path.name, s.defect_type, s.label, s.mask_path) for s in samples] == [
        ("g1.tif", "good", False, None),
        ("s1.webp", "scratch", True, None),
        ("s2.TIFF", "scratch", True, None),
    ]


def test_masks_by_either_name_and_missing_ones(tmp_path):
    root = _layout(tmp_path / "widget")
    gt = root / "ground_truth" / "scratch"
    _image(gt / "s1.png", 255)                           # <stem>.* instead of <stem>_mask.png
    samples = {s.path.name: s for s in datasets.test_samples(root)}
    assert samples["s1.webp"].mask_path == gt / "s1.png"
    assert samples["s2.TIFF"].mask_path is None          # masks are optional per image
    _image(gt / "s1_mask.bmp", 255)                      # <stem>_mask.* wins
    assert datasets.test_samples(root)[1].mask_path == gt / "s1_mask.bmp"


def test_load_mask_resizes_with_nearest_and_binarises(tmp_path):
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 0:30] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = load_mask(tmp_path / "m.png", 20)
    assert out.shape == (20, 20) and out.dtype == bool
    assert out.mean() == pytest.approx(0.25)              # left half of the middle rows
    assert set(np.unique(out)) == {False, True}
    Image.fromarray((mask > 0).astype(np.uint8)).save(tmp_path / "ones.png")   # 0/1 masks
    assert np.array_equal(load_mask(tmp_path / "ones.png", 20), out)
    with pytest.raises(ValueError, match="size=0"):
        load_mask(tmp_path / "m.png", 0)


# (folder to delete from a valid layout, leave it there empty?, expected message)
BROKEN = [
    ("train/good", False, "train/good"),
    ("train/good", True, "train/good"),
    ("test/good", False, "no test/good"),
    ("test/scratch", True, "without images.*scratch"),
    ("test/scratch", False, "no defect folder"),
]


@pytest.mark.parametrize("folder, keep_empty, message", BROKEN)
def test_discover_explains_a_broken_layout(tmp_path, folder, keep_empty, message):
    root = _layout(tmp_path / "widget")
    shutil.rmtree(root / folder)
    if keep_empty:
        (root / folder).mkdir()
    with pytest.raises(ValueError, match=message):
        discover(root)


def test_discover_rejects_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        discover(tmp_path / "nope")
