"""scripts/ablate.py, the ablations behind the detector's defaults, on a tiny real setting."""
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "scripts" / "ablate.py"


def test_ablation_table_on_real_photos(data_dir):
    run = subprocess.run([sys.executable, str(SCRIPT), str(data_dir / "bottle"), "--shots", "2",
                          "--seeds", "0", "--variants", "default", "pfm-only"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert list(rows) == ["variant", "default", "pfm-only"]
    for variant in ("default", "pfm-only"):            # both find bottle defects from 2 good photos
        image_auroc, pixel_auroc, _, _ = rows[variant][0].split(" / ")
        assert float(image_auroc) > 0.9 and float(pixel_auroc) > 0.9, (variant, rows[variant])
        assert float(rows[variant][-1]) == float(image_auroc)        # the mean of one category


def test_unknown_variant_is_refused():
    run = subprocess.run([sys.executable, str(SCRIPT), "x", "--variants", "nonsense"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "invalid choice: 'nonsense'" in run.stderr
