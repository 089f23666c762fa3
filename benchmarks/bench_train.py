"""CLIP training steps on one GPU: ViT-B-32 at 224 px, bf16 autocast, AdamW, as the example
(`examples/clip/train.py`) runs them.

    python benchmarks/bench_train.py --out $OUT [--parts plain cache compile loader]

Parts (each writes rows to `train.csv`, long format as every benchmark here):
- `plain`: one step on the whole batch (no cache) at `--plain-batch` (4096, or half that when it
  does not fit), with open_clip's `ClipLoss` and with `infcl.ClipLoss`: samples/s, peak memory.
- `cache`: `infcl.grad_cache_step` at 16384 and 65536 (micro-batch `--micro`): time per step, split
  into the no-grad encoder pass and the re-encoding's forward (the rest is its backward and the
  optimizer); the loss timed on its own on unit rows of the step's shape; the cache's cost per
  sample against the plain step.
- `compile`: the same cached step at 16384 with `torch.compile`d encoders: compile time (the
  first step's excess) and the steady step against eager.
- `loader`: the example's webdataset loader (`PairLoader`, open_clip's train transform) over
  shards of 224 px JPEGs made here, with `--workers` processes: samples/s alone, and a cached
  step fed by it against the synthetic source.
The synthetic source is random images and tokens already on the GPU, so the loader is not what
is measured. Needs open_clip_torch and webdataset (carried as wheels to the GPU machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import bench_loss
import harness
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss

import infcl

sys.path.insert(0, str(Path(harness.ROOT) / "examples" / "clip"))
import make_data  # noqa: E402
from data import PairLoader  # noqa: E402

MODEL = "ViT-B-32"


class Timer:
    """Wall time of CUDA work, by name: each `with timer(name)` synchronises at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.total = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        harness.sync(self.device)
        t = time.perf_counter()
        yield
        harness.sync(self.device)
        self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t


def build(device: torch.device):
    torch.manual_seed(0)
    model, preprocess_train, _ = open_clip.create_model_and_transforms(MODEL, device=device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2, fused=True)
    return model, opt, preprocess_train, open_clip.get_tokenizer(MODEL)


DEVICE_TYPE = "cuda"


def autocast():
    return torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16)


def synthetic(b: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(b, 3, 224, 224, device=device, generator=gen)
    tokens = torch.randint(1, 49407, (b, 77), device=device, generator=gen)
    return images, tokens


def plain_step(model, opt, loss_mod, images, tokens):
    opt.zero_grad(set_to_none=True)
    with autocast():
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = loss_mod(img, txt, model.logit_scale.exp())
    loss.backward()
    opt.step()
    return loss


def cache_step(model, opt, images, tokens, micro: int, timer: Timer | None = None,
               encoders=None):
    enc_i, enc_t = encoders or (model.encode_image, model.encode_text)

    def timed(name, fn):
        def f(x):
            phase = "encode_grad" if torch.is_grad_enabled() else "encode_nograd"
            with timer(phase) if timer else contextlib.nullcontext(), autocast():
                return F.normalize(fn(x), dim=-1)
        return f

    def loss_fn(img, txt):
        with autocast():  # as open_clip's trainer: the loss under autocast (bf16 products)
            return infcl.inf_loss(img, txt, model.logit_scale.exp(), symmetric=True)

    opt.zero_grad(set_to_none=True)
    loss = infcl.grad_cache_step(timed("i", enc_i), timed("t", enc_t), images, tokens, loss_fn,
                                 micro_batch_size=micro, modules=model)
    opt.step()
    return loss


def autocast_loss(q, k, s):
    with autocast():  # as the step runs it
        return infcl.inf_loss(q, k, s, symmetric=True)


def steady(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of `fn` over `steps` calls (after the caller's warm-up)."""
    harness.sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    harness.sync(device)
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--parts", nargs="*", default=["plain", "cache", "compile", "loader"])
    ap.add_argument("--plain-batch", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=1024)
    ap.add_argument("--cache-batches", nargs="*", type=int, default=[16384, 65536])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run at tiny batches")
    args = ap.parse_args()
    dev = torch.device(args.device)
    global DEVICE_TYPE
    DEVICE_TYPE = dev.type
    out = harness.Csv(os.path.join(args.out, "train.csv"), dev)
    lines = []

    def rec(impl, metric, b, value):
        out.add(impl, metric, b, 512, torch.bfloat16, value)
        lines.append(f"{impl:28s} {metric:22s} B={b:<6} {value:.4g}")
        print(lines[-1], flush=True)

    model, opt, preprocess, tokenizer = build(dev)
    per_sample = {}
    if "plain" in args.parts:
        for b in (args.plain_batch, args.plain_batch // 2):
            images = tokens = None
            try:
                images, tokens = synthetic(b, dev)
                for name, loss_mod in (("open_clip ClipLoss", OpenClipLoss()),
                                       ("infcl.ClipLoss", infcl.ClipLoss())):
                    plain_step(model, opt, loss_mod, images, tokens)  # warm-up
                    with harness.peak_above(dev) as peak:
                        plain_step(model, opt, loss_mod, images, tokens)
                    sec = steady(lambda m=loss_mod, x=images, t=tokens: plain_step(model, opt, m, x, t),
                                 args.steps, dev)
                    rec(f"plain / {name}", "samples_per_s", b, b / sec)
                    rec(f"plain / {name}", "step_s", b, sec)
                    rec(f"plain / {name}", "peak_gib", b, peak[0])
                    per_sample.setdefault("plain", sec / b)
                break
            except torch.OutOfMemoryError:
                rec("plain", "oom", b, float("nan"))
                del images, tokens
                opt.zero_grad(set_to_none=True)
                harness.free_memory(dev)
        harness.free_memory(dev)

    if "cache" in args.parts:
        for b in args.cache_batches:
            images, tokens = synthetic(b, dev, seed=b)
            cache_step(model, opt, images, tokens, args.micro)  # warm-up
            timer = Timer(dev)
            with harness.peak_above(dev) as peak:
                with timer("step"):
                    for _ in range(args.steps):
                        cache_step(model, opt, images, tokens, args.micro, timer)
            step_s = timer.total["step"] / args.steps
            enc0 = timer.total.get("encode_nograd", 0.0) / args.steps
            enc1 = timer.total.get("encode_grad", 0.0) / args.steps
            (_, loss_ms, _), loss_peak = bench_loss.time_point(autocast_loss, b, 512,
                                                               torch.float32, dev, 200)
            name = f"grad cache (micro {args.micro})"
            rec(name, "step_s", b, step_s)
            rec(name, "samples_per_s", b, b / step_s)
            rec(name, "encode_nograd_s", b, enc0)
            rec(name, "encode_grad_s", b, enc1)
            rec(name, "loss_s (alone)", b, loss_ms / 1e3)
            rec(name, "loss_share", b, loss_ms / 1e3 / step_s)
            rec(name, "loss_peak_gib (alone)", b, loss_peak)
            rec(name, "peak_gib", b, peak[0])
            if "plain" in per_sample:
                rec(name, "per_sample_vs_plain", b, step_s / b / per_sample["plain"])
            per_sample.setdefault("cache", step_s / b)
            del images, tokens
            harness.free_memory(dev)

    if "compile" in args.parts:
        b = args.cache_batches[0]
        images, tokens = synthetic(b, dev, seed=7)
        eager = steady(lambda: cache_step(model, opt, images, tokens, args.micro), args.steps, dev)
        encoders = (torch.compile(model.encode_image), torch.compile(model.encode_text))
        harness.sync(dev)
        t = time.perf_counter()
        cache_step(model, opt, images, tokens, args.micro, encoders=encoders)
        harness.sync(dev)
        first = time.perf_counter() - t
        cache_step(model, opt, images, tokens, args.micro, encoders=encoders)
        comp = steady(lambda: cache_step(model, opt, images, tokens, args.micro,
                                         encoders=encoders), args.steps, dev)
        rec("grad cache / eager encoders", "step_s", b, eager)
        rec("grad cache / compiled encoders", "step_s", b, comp)
        rec("grad cache / compiled encoders", "compile_s", b, first - comp)
        rec("grad cache / compiled encoders", "compiled_vs_eager", b, comp / eager)
        del images, tokens
        harness.free_memory(dev)

    if "loader" in args.parts:
        b = args.cache_batches[0]
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            n = max(b // 2, 8)  # the loader goes round the epochs
            root = make_data.make(Path(tmp) / "shapes", n_train=n, n_val=8, per_shard=1024,
                                  size=224)
            rec("loader", "make_data_s", n, time.perf_counter() - t)
            pattern = make_data.patterns(root, n, 8, 1024)["train"]
            loader = PairLoader(pattern, b, preprocess, tokenizer, workers=args.workers,
                                prefetch=2)
            try:
                next(loader)  # workers started, first batch
                t = time.perf_counter()
                batches = [next(loader) for _ in range(args.steps)]
                rec(f"loader / {args.workers} workers", "samples_per_s", b,
                    args.steps * b / (time.perf_counter() - t))
                del batches
                harness.sync(dev)
                t = time.perf_counter()
                for _ in range(args.steps):
                    images, tokens = next(loader)
                    images = images.to(dev, non_blocking=True)
                    tokens = tokens.to(dev, non_blocking=True)
                    cache_step(model, opt, images, tokens, args.micro)
                harness.sync(dev)
                fed = (time.perf_counter() - t) / args.steps
            finally:
                loader.close()
            rec(f"grad cache fed by loader ({args.workers} workers)", "samples_per_s", b, b / fed)
            if "cache" in per_sample:
                rec(f"grad cache fed by loader ({args.workers} workers)", "vs_synthetic", b,
                    per_sample["cache"] * b / fed)

    print(f"\nwrote {out.path} ({out.meta['card']}, torch {torch.__version__}, "
          f"open_clip {open_clip.__version__})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
