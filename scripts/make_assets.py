"""Build the example image sets in assets/examples from textures that scikit-image ships.

    python scripts/make_assets.py            # (re)writes assets/examples, deterministic
    python scripts/make_assets.py --check    # ... then fits the detector per category, prints scores

Sources (all CC0, bundled with scikit-image, no download): skimage.data.brick(), gravel(),
grass(), 512 x 512 grayscale photos. Each is tinted with a fixed colour ramp, then cut into
256 x 256 crops at distinct places with a small random rotation, scale and brightness change.
References and good test images are plain crops; defect test images get one synthetic defect
drawn onto the real texture. Everything is seeded: the same scikit-image gives the same PNGs.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage
from skimage import data

ROOT = Path(__file__).resolve().parents[1]
SIZE = 256                      # side of every example image
N_REFERENCES = 8
N_GOOD_TESTS = 2
MAX_ANGLE = 4.0                 # degrees of random rotation per crop
SEED = 2024

# Colour ramps (dark, middle, light) applied to the grayscale photos.
RAMPS = {
    "brick": ((62, 24, 18), (158, 70, 46), (232, 212, 186)),
    "gravel": ((40, 38, 35), (128, 120, 108), (228, 222, 208)),
    "grass": ((20, 40, 12), (78, 118, 40), (182, 208, 120)),
}


def tint(gray: np.ndarray, ramp) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) float in [0, 255] through a 3-stop colour ramp."""
    g = gray.astype(np.float64) / 255.0
    dark, mid, light = (np.asarray(c, dtype=np.float64) for c in ramp)
    lower = dark + (mid - dark) * (g[..., None] * 2.0)
    upper = mid + (light - mid) * (g[..., None] * 2.0 - 1.0)
    return np.where(g[..., None] < 0.5, lower, upper)


def texture(name: str) -> np.ndarray:
    """A scikit-image texture, tinted: (512, 512, 3) float in [0, 255]."""
    return tint(getattr(data, name)(), RAMPS[name])


def crop(source: np.ndarray, cx: float, cy: float, angle: float, scale: float) -> np.ndarray:
    """SIZE x SIZE crop centred at (cx, cy), rotated by angle degrees and zoomed by 1/scale."""
    a = np.deg2rad(angle)
    c, s = np.cos(a) * scale, np.sin(a) * scale
    half = SIZE / 2.0
    # Output (x, y) -> source (c*(x-h) - s*(y-h) + cx, s*(x-h) + c*(y-h) + cy), per channel.
    out = np.empty((SIZE, SIZE, 3))
    for ch in range(3):
        im = Image.fromarray(source[..., ch].astype(np.float32))
        coeffs = (c, -s, cx - half * (c - s), s, c, cy - half * (s + c))
        out[..., ch] = np.asarray(im.transform((SIZE, SIZE), Image.AFFINE, coeffs, Image.BICUBIC))
    return out


def crops(source: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """n crops at distinct places of a 512 x 512 source (a shuffled 4 x 4 grid of centres)."""
    margin = SIZE / 2.0 * 1.05 * (np.cos(np.deg2rad(MAX_ANGLE)) + np.sin(np.deg2rad(MAX_ANGLE))) + 1
    grid = np.linspace(margin, source.shape[0] - margin, 4)
    centres = [(x, y) for y in grid for x in grid]
    order = rng.permutation(len(centres))[:n]
    out = []
    for i in order:
        cx, cy = centres[i] + rng.uniform(-8, 8, 2)
        im = crop(source, cx, cy, rng.uniform(-MAX_ANGLE, MAX_ANGLE), rng.uniform(0.95, 1.05))
        out.append(im * rng.uniform(0.93, 1.07))
    return out


# ---------------------------------------------------------------- defects, drawn on (H, W, 3)

def _blob(rng: np.random.Generator, cx: float, cy: float, radius: float, soft: float) -> np.ndarray:
    """Irregular soft blob in [0, 1], (SIZE, SIZE): a few overlapping ellipses, blurred."""
    canvas = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(6):
        dx, dy = rng.normal(0, radius * 0.35, 2)
        rx, ry = radius * rng.uniform(0.45, 0.8, 2)
        draw.ellipse((cx + dx - rx, cy + dy - ry, cx + dx + rx, cy + dy + ry), fill=255)
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(soft)), dtype=np.float64) / 255.0


def _place(rng: np.random.Generator) -> tuple[float, float]:
    """A defect centre well inside the image."""
    return tuple(rng.uniform(SIZE * 0.3, SIZE * 0.7, 2))


def _polygon(rng: np.random.Generator, corners: int, jitter: float, radii: tuple[float, float]
             ) -> tuple[np.ndarray, tuple[float, float]]:
    """An irregular polygon at a random place -> (inside mask (SIZE, SIZE) bool, its centre)."""
    cx, cy = _place(rng)
    angles = np.linspace(0, 2 * np.pi, corners, endpoint=False) + rng.uniform(-jitter, jitter, corners)
    radius = rng.uniform(*radii, corners)
    poly = [(cx + r * np.cos(t), cy + r * np.sin(t)) for r, t in zip(radius, angles)]
    layer = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(layer).polygon(poly, fill=255)
    return np.asarray(layer) > 0, (cx, cy)


def crack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dark jagged crack (random walk with a branch), 4-7 px wide, with lighter chipped edges."""
    layer = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(layer)
    x, y = rng.uniform(40, 80), rng.uniform(50, 100)
    heading = np.deg2rad(rng.uniform(20, 45))
    points = [(x, y)]
    for _ in range(30):
        heading += rng.normal(0, 0.35)
        step = rng.uniform(5, 8)
        x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        points.append((x, y))
    draw.line(points, fill=255, width=7, joint="curve")
    branch = points[len(points) // 2:len(points) // 2 + 1]
    bx, by = branch[0]
    bh = heading - 1.2
    for _ in range(10):
        bh += rng.normal(0, 0.3)
        bx, by = bx + 6 * np.cos(bh), by + 6 * np.sin(bh)
        branch.append((bx, by))
    draw.line(branch, fill=255, width=4, joint="curve")
    core = np.asarray(layer) > 0
    # Chipped edges: lighter, broken-off material up to 6 px beside the crack, in irregular flakes.
    flakes = ndimage.gaussian_filter(rng.normal(0, 1, (SIZE, SIZE)), 2.0) > 0
    chipped = ndimage.binary_dilation(core, iterations=6) & ~core & flakes
    c = ndimage.gaussian_filter(chipped.astype(np.float64), 0.8)[..., None]
    out = img * (1 - 0.75 * c) + np.array([222.0, 170.0, 138.0]) * 0.75 * c
    a = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64)[..., None] / 255.0
    return out * (1 - a) + np.array([22.0, 16.0, 14.0]) * a


def stain(img: np.ndarray, rng: np.random.Generator, color=(40, 110, 140)) -> np.ndarray:
    """A soft-edged blob of another colour; the texture stays visible underneath."""
    a = _blob(rng, *_place(rng), radius=40, soft=3)[..., None] * 0.95
    return img * (1 - a) + (0.2 * img + 0.8 * np.asarray(color, dtype=np.float64)) * a


def hole(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A missing chunk: a dark, shadowed cavity with a light chipped rim."""
    inside, _ = _polygon(rng, corners=11, jitter=0.25, radii=(20, 34))
    depth = ndimage.distance_transform_edt(inside)
    shade = np.clip(depth / 12.0, 0, 1)[..., None]                 # darker towards the centre
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (SIZE, SIZE)), 1.5)[..., None] * 25
    cavity = np.array([70.0, 58.0, 50.0]) * (1 - 0.6 * shade) + noise
    rim = (ndimage.binary_dilation(inside, iterations=2) & ~inside)[..., None]
    out = np.where(inside[..., None], cavity, img)
    return np.where(rim, np.minimum(out * 0.6 + 90, 255), out)


def patch(img: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> np.ndarray:
    """A rectangle of another texture pasted in, slightly rotated, with a 1-px soft edge."""
    piece = crop(other, *rng.uniform(150, 362, 2), angle=0, scale=1.0)
    layer = Image.new("L", (SIZE, SIZE), 0)
    cx, cy = _place(rng)
    w, h = rng.uniform(28, 40, 2)
    t = np.deg2rad(rng.uniform(-20, 20))
    corners = [(-w, -h), (w, -h), (w, h), (-w, h)]
    ImageDraw.Draw(layer).polygon(
        [(cx + x * np.cos(t) - y * np.sin(t), cy + x * np.sin(t) + y * np.cos(t)) for x, y in corners],
        fill=255)
    a = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float64)[..., None] / 255.0
    return img * (1 - a) + piece * a


def foreign_object(img: np.ndarray, rng: np.random.Generator, color=(200, 40, 40)) -> np.ndarray:
    """A shaded, irregular piece of coloured plastic lying on the surface."""
    inside, (cx, cy) = _polygon(rng, corners=8, jitter=0.3, radii=(16, 26))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    light = 1.0 + 0.25 * ((cx - xx) + (cy - yy)) / 30.0              # lit from the top left
    body = np.clip(np.asarray(color, dtype=np.float64) * light[..., None], 0, 255)
    shadow = ndimage.shift(inside.astype(np.float64), (4, 4), order=0)[..., None] * 0.45
    out = img * (1 - shadow)
    return np.where(inside[..., None], body, out)


def wire(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A blue cable, 5 px thick, lying across the surface in a curve, with a dark shadow."""
    t = np.linspace(0, 1, 60)
    x0, y0 = rng.uniform(30, 70), rng.uniform(40, 90)
    x = x0 + t * rng.uniform(140, 180)
    y = y0 + t * rng.uniform(60, 110) + 18 * np.sin(t * np.pi * rng.uniform(1.5, 2.5))
    out = img.copy()
    for offset, value, width in (((3, 3), None, 6), ((0, 0), (40, 95, 215), 5)):
        layer = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(layer).line(list(zip(x + offset[0], y + offset[1])), fill=255, width=width,
                                   joint="curve")
        a = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float64)[..., None] / 255
        target = out * 0.4 if value is None else np.asarray(value, dtype=np.float64)
        out = out * (1 - a) + target * a
    return out


# ---------------------------------------------------------------- categories

def build_category(name: str, source: np.ndarray, defects: dict, rng: np.random.Generator,
                   out: Path) -> None:
    """Write references/ref_XX.png, test/good_XX.png and test/defect_<kind>.png for one category."""
    pieces = crops(source, N_REFERENCES + N_GOOD_TESTS + len(defects), rng)
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "references").mkdir(parents=True)
    (folder / "test").mkdir()
    for i, im in enumerate(pieces[:N_REFERENCES]):
        save(im, folder / "references" / f"ref_{i + 1:02d}.png")
    for i, im in enumerate(pieces[N_REFERENCES:N_REFERENCES + N_GOOD_TESTS]):
        save(im, folder / "test" / f"good_{i + 1:02d}.png")
    for (kind, draw), im in zip(defects.items(), pieces[N_REFERENCES + N_GOOD_TESTS:]):
        save(draw(im, rng), folder / "test" / f"defect_{kind}.png")


def save(im: np.ndarray, path: Path) -> None:
    Image.fromarray(np.clip(np.rint(im), 0, 255).astype(np.uint8)).save(path, optimize=True)


def build(out: Path) -> None:
    rng = np.random.default_rng(SEED)
    brick, gravel, grass = texture("brick"), texture("gravel"), texture("grass")
    build_category("brick_wall", brick, {
        "crack": crack,
        "stain": stain,
        "hole": hole,
        "patch": lambda im, r: patch(im, r, gravel),
    }, rng, out)
    build_category("gravel", gravel, {
        "rust_stain": lambda im, r: stain(im, r, color=(175, 62, 8)),
        "plastic": foreign_object,
        "wire": wire,
        "grass_patch": lambda im, r: patch(im, r, grass),
    }, rng, out)


def check() -> None:
    """Fit the default detector on each category's references and print every test score."""
    sys.path.insert(0, str(ROOT))
    from anomaly import DetectorConfig, PFMDetector
    from anomaly.examples import example_label, example_sets

    for name, (refs, tests) in example_sets().items():
        det = PFMDetector(DetectorConfig())
        det.fit(refs)
        print(f"{name}: threshold {det.threshold:.4f}, reference scores "
              + " ".join(f"{s:.4f}" for s in det.calibration_scores))
        for path, pred in zip(tests, det.predict(tests)):
            expected = "defect" if example_label(path) else "good"
            ok = "ok" if pred.pred_label == (expected == "defect") else "WRONG"
            print(f"  {path.name:24s} {pred.pred_score:.4f}  norm {pred.norm_score:.2f}  "
                  f"{pred.verdict:6s} (expected {expected}) {ok}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "examples")
    parser.add_argument("--check", action="store_true", help="fit the detector and print scores")
    args = parser.parse_args()
    build(args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*.png"))
    print(f"wrote {len(list(args.out.rglob('*.png')))} images, {total / 1e6:.2f} MB, to {args.out}")
    if args.check:
        check()


if __name__ == "__main__":
    main()
