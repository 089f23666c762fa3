"""The CLIP demo: generate shapes data, train a tiny CLIP on CPU, report held-out figures.

    python examples/clip/demo.py            # what `make demo` runs (training: 153 s on 2 CPU cores)
    python examples/clip/demo.py --steps 60 # a shorter run (a couple of minutes, lower accuracy)

1. Writes 8,000 captioned training images and 600 held-out ones as webdataset shards under
   out/clip-demo/data (once; later runs reuse them).
2. Trains the `shapes-tiny` open_clip config from scratch: global batch 256 as 4 micro-batches of
   64 through `infcl.grad_cache_step`, with `infcl.inf_loss` (torch tiles on CPU).
3. Evaluates on the held-out split: zero-shot classification over the 30 colour-shape classes
   (top-1, and the true class's mean rank, which top-5 cannot show: 6 colours make top-5 all
   but certain) and image<->text retrieval, and prints them beside chance.
4. Times the loss of this batch through infcl and through open_clip's `ClipLoss`, and says what
   each holds in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_data  # noqa: E402
import train  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "shapes-tiny.json"


def compare_losses(b: int, d: int, reps: int = 5) -> None:
    """Forward + backward of the CLIP loss of one global batch [b, d] through `infcl.inf_loss`
    and open_clip's `ClipLoss` on this machine, median of `reps`."""
    import open_clip.loss
    import torch

    import infcl

    q = torch.nn.functional.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    s = torch.tensor(14.3)
    calls = {"infcl.inf_loss": lambda: infcl.inf_loss(q, k, s, symmetric=True),
             "open_clip ClipLoss": lambda: open_clip.loss.ClipLoss()(q, k, s)}
    times = {}
    for name, call in calls.items():
        runs = []
        for _ in range(reps):
            t = time.perf_counter()
            call().backward()
            runs.append(time.perf_counter() - t)
        times[name] = sorted(runs)[reps // 2] * 1e3
    logits_mib = 2 * b * b * 4 / 2**20
    print(f"\nthe loss of this batch (B = {b}, D = {d}, forward + backward on this CPU): "
          + ", ".join(f"{n} {ms:.1f} ms" for n, ms in times.items()))
    print(f"  open_clip builds both {b} x {b} fp32 logit matrices ({logits_mib:.2f} MiB) and as "
          f"much again for their gradients: B^2 memory; infcl keeps O(B) statistics and one "
          f"bounded block of them, the same loss to rounding")
    print("  the difference shows at large batches on a GPU: at B = 65536 on one H200 the "
          "materialised loss needs 32 GiB, inf_loss 0.39 GiB (docs/results.md); move to a GPU "
          "(`python -m infcl` checks its path) for that")


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
    classes = round(1 / r["zeroshot_chance"])
    print(f"held-out zero-shot, {classes} classes: top-1 {r['zeroshot_top1']:.1%} (chance "
          f"{r['zeroshot_chance']:.1%}); the true class's mean rank {r['zeroshot_mean_rank']:.2f} "
          f"of {classes} (1 is perfect, chance {(classes + 1) / 2:.1f})")
    for k in (1, 5, 10):
        print(f"retrieval R@{k}: image->text {r[f'image_to_text_R@{k}']:.1%} "
              f"(chance {k / n_text:.1%}), text->image {r[f'text_to_image_R@{k}']:.1%}")
    print(f"({n_pairs} held-out pairs, {n_text} distinct captions)")
    print(f"curves: {summary['plot']}")
    print(f"checkpoint: {summary['checkpoint']} "
          f"(open_clip.create_model_and_transforms('shapes-tiny', pretrained=...) after "
          f"open_clip.add_model_config('examples/clip/configs'))")
    compare_losses(a.batch_size, json.loads(CONFIG.read_text())["embed_dim"])


if __name__ == "__main__":
    main()
