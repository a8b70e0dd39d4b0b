"""scripts/ablate_pfm.py, the ablations behind the README's magnetic_tile explanation, on a tiny setting."""
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "scripts" / "ablate_pfm.py"


def test_ablation_table_on_real_photos(data_dir):
    run = subprocess.run([sys.executable, str(SCRIPT), str(data_dir / "bottle"), "--shots", "2",
                          "--seeds", "0", "--variants", "base", "knn-raw"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1]
            for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert list(rows) == ["variant", "base", "knn-raw"]
    assert rows["variant"][-3:] == [" broken_large ", " broken_small ", " contamination "]
    for variant in ("base", "knn-raw"):                # both find bottle defects from 2 good photos
        image_auroc, pixel_auroc = float(rows[variant][0]), float(rows[variant][1])
        assert image_auroc > 0.9 and pixel_auroc > 0.9, (variant, image_auroc, pixel_auroc)


def test_unknown_variant_is_refused():
    run = subprocess.run([sys.executable, str(SCRIPT), "x", "--variants", "nonsense"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "invalid choice: 'nonsense'" in run.stderr
