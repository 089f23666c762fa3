"""The CLIP demo: generate shapes data, train a tiny CLIP on CPU, report held-out figures.

    python examples/clip/demo.py            # what `make demo` runs (training: 153 s on 2 CPU cores)
    python examples/clip/demo.py --steps 60 # a shorter run (a couple of minutes, lower accuracy)

1. Writes 8,000 captioned training images and 600 held-out ones as webdataset shards under
   out/clip-demo/data (once; later runs reuse them).
2. Trains the `shapes-tiny` open_clip config from scratch: global batch 256 as 4 micro-batches of
   64 through `infcl.grad_cache_step`, with `infcl.inf_loss` (torch tiles on CPU).
3. Evaluates on the held-out split: zero-shot classification over the 30 colour-shape classes
   and image<->text retrieval, and prints them beside chance and where the plot was written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_data  # noqa: E402
import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/clip-demo"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=64)
    a = p.parse_args()

    t0 = time.perf_counter()
    data_dir = make_data.make(a.out / "data")
    shards = make_data.patterns(data_dir)
    print(f"data: {shards['train']} (train), {shards['val']} (held out)")
    run = a.out / "run"
    summary = train.main([
        "--model", "shapes-tiny", "--train-data", shards["train"], "--out", str(run),
        "--batch-size", str(a.batch_size), "--micro-batch-size", str(a.micro_batch_size),
        "--steps", str(a.steps), "--warmup", str(max(1, a.steps // 10)), "--lr", "2e-3",
        "--wd", "0.1", "--loss", "inf", "--eval-every", str(max(1, a.steps // 3)),
        "--save-every", str(max(1, a.steps // 3)),
        "--zeroshot-dir", shards["folder"], "--retrieval-data", shards["val"],
    ])
    r = summary["eval"]
    n_text = int(r["retrieval_texts"])
    n_pairs = int(r["retrieval_pairs"])
    print(f"\ntrained {a.steps} steps of {a.batch_size} ({a.batch_size // a.micro_batch_size} "
          f"micro-batches of {a.micro_batch_size}) in {time.perf_counter() - t0:.0f} s")
    print(f"held-out zero-shot, 30 classes: top-1 {r['zeroshot_top1']:.1%}, "
          f"top-5 {r['zeroshot_top5']:.1%} (chance {r['zeroshot_chance']:.1%} / "
          f"{5 * r['zeroshot_chance']:.1%})")
    for k in (1, 5, 10):
        print(f"retrieval R@{k}: image->text {r[f'image_to_text_R@{k}']:.1%} "
              f"(chance {k / n_text:.1%}), text->image {r[f'text_to_image_R@{k}']:.1%}")
    print(f"({n_pairs} held-out pairs, {n_text} distinct captions)")
    print(f"curves: {summary['plot']}")
    print(f"checkpoint: {summary['checkpoint']} "
          f"(open_clip.create_model_and_transforms('shapes-tiny', pretrained=...) after "
          f"open_clip.add_model_config('examples/clip/configs'))")


if __name__ == "__main__":
    main()
