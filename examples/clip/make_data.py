"""Small real data for the demo: coloured shapes drawn with PIL, captioned, as webdataset shards.

Each image is one shape (circle, square, triangle, diamond, cross) in one colour on a grey
background, at a random size and place. Captions name the colour and the shape in a few
phrasings ("a red circle", "a photo of a small red circle"), so the text tower has to learn
that only the colour and the shape words matter.

Written in the img2dataset layout: `train/0000.tar ...` and `val/0000.tar` hold `NNNNNNNN.jpg`
/ `NNNNNNNN.txt` pairs; `val_folder/<colour>_<shape>/*.jpg` holds the held-out images as an
ImageFolder for zero-shot classification. Deterministic for a given seed.

    python examples/clip/make_data.py --out data/shapes
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
CAPTIONS = (
    "a {c} {s}",
    "a {size} {c} {s}",
    "a photo of a {c} {s}",
    "a drawing of a {size} {c} {s}",
    "{c} {s} on a grey background",
)
TEMPLATES = ("a {}.", "a photo of a {}.", "a drawing of a {}.")
"""Zero-shot prompt templates; the class names are `"<colour> <shape>"`."""
DONE = "done.json"


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def draw(colour: str, shape: str, rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """One image and the size word for its caption."""
    grey = rng.randint(90, 160)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        w = r / 2.5
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return img, "small" if r < 0.28 * size else "large"


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_split(
    out: Path, n: int, per_shard: int, rng: random.Random, size: int, folder: Path | None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = [(c, s) for c in COLOURS for s in SHAPES]
    for shard in range((n + per_shard - 1) // per_shard):
        with tarfile.open(out / f"{shard:04d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                colour, shape = names[i % len(names)] if folder else rng.choice(names)
                img, size_word = draw(colour, shape, rng, size)
                caption = rng.choice(CAPTIONS).format(c=colour, s=shape, size=size_word)
                data = jpeg(img)
                add(tar, f"{i:08d}.jpg", data)
                add(tar, f"{i:08d}.txt", caption.encode())
                if folder is not None:
                    cls = folder / f"{colour}_{shape}"
                    cls.mkdir(parents=True, exist_ok=True)
                    (cls / f"{i:08d}.jpg").write_bytes(data)


def make(out: Path, *, n_train: int = 8000, n_val: int = 600, per_shard: int = 1000,
         size: int = 32, seed: int = 0) -> Path:
    """Write the data set under `out` unless a finished one with the same settings is there."""
    settings = dict(n_train=n_train, n_val=n_val, per_shard=per_shard, size=size, seed=seed)
    done = out / DONE
    if done.exists() and json.loads(done.read_text()) == settings:
        return out
    rng = random.Random(seed)
    write_split(out / "train", n_train, per_shard, rng, size, None)
    write_split(out / "val", n_val, per_shard, rng, size, out / "val_folder")
    done.write_text(json.dumps(settings))
    return out


def patterns(out: Path, n_train: int = 8000, n_val: int = 600, per_shard: int = 1000) -> dict:
    """Brace patterns of the shards `make` wrote, as a user would pass them to train.py."""
    last_train = (n_train + per_shard - 1) // per_shard - 1
    last_val = (n_val + per_shard - 1) // per_shard - 1
    return {
        "train": f"{out}/train/{{0000..{last_train:04d}}}.tar",
        "val": f"{out}/val/{{0000..{last_val:04d}}}.tar",
        "folder": str(out / "val_folder"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/shapes"))
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-val", type=int, default=600)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make(a.out, n_train=a.n_train, n_val=a.n_val, per_shard=a.per_shard, size=a.size, seed=a.seed)
    print(json.dumps(patterns(a.out, a.n_train, a.n_val, a.per_shard), indent=1))


if __name__ == "__main__":
    main()
