"""An ImageFolder of ImageNet-like JPEGs made from the photos scikit-image ships (no download): random crops,
flips and rescales to about 500x375 with varied aspect ratios, quality 90, with grayscale and CMYK files among
them, as ImageNet has. For tests and benchmarks of the real decode path; not a dataset to learn from.

    python -m moco_scale.data.photos DIR --count 512      # DIR/train/<class>/*.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

COLOR = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
         "stereo_motorcycle")
GRAY = ("camera", "coins", "moon", "grass", "gravel", "brick", "clock")


def source_photos(names: tuple[str, ...]) -> list[np.ndarray]:
    """The photos of `names` this scikit-image holds locally (HxWx3 or HxW uint8)."""
    import skimage.data

    photos = []
    for name in names:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # a photo this version would have to download
            continue
        img = img[0] if isinstance(img, tuple) else img  # stereo pairs
        photos.append(np.ascontiguousarray(img[..., :3] if img.ndim == 3 else img))
    if len(photos) < 2:
        raise RuntimeError(f"scikit-image holds fewer than 2 of its sample photos {names} locally")
    return photos


def write_photo_folder(root: str | Path, count: int, classes: int = 4, seed: int = 0) -> Path:
    """root/train/c<k>/<i>.jpg, `count` JPEGs (kept where already there). Every 10th is grayscale and every 15th
    CMYK (from colour photos); the longer side is 400-640 px and the aspect ratio 0.6-1.7, most near 4:3 (500x375)."""
    root = Path(root)
    train = root / "train"
    if train.is_dir() and sum(1 for _ in train.rglob("*.jpg")) >= count:
        return root
    rng, color, gray = np.random.default_rng(seed), source_photos(COLOR), source_photos(GRAY)
    for i in range(count):
        photos = gray if i % 10 == 0 else color
        src = photos[(i // 10 if i % 10 == 0 else i) % len(photos)]
        h, w = src.shape[:2]
        ch, cw = (max(64, int(s * rng.uniform(0.5, 1.0))) for s in (h, w))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(src[top:top + ch, left:left + cw])  # mode L for the grayscale photos
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        aspect = 4 / 3 if i % 3 else float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
        longer = 500 if i % 3 else int(rng.integers(400, 641))
        size = (longer, round(longer / aspect)) if aspect >= 1 else (round(longer * aspect), longer)
        img = img.resize(size, Image.BICUBIC)
        if i % 15 == 0 and i % 10:
            img = img.convert("RGB").convert("CMYK")
        folder = train / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--count", type=int, default=512)
    p.add_argument("--classes", type=int, default=4)
    args = p.parse_args()
    print(write_photo_folder(args.root, args.count, args.classes))


if __name__ == "__main__":
    main()
