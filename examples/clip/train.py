"""Train a CLIP model (open_clip architecture, from scratch) at a large global batch.

    python examples/clip/train.py --model ViT-B-32 --train-data 'cc3m/{00000..00331}.tar' \
        --batch-size 16384 --micro-batch-size 256 --steps 20000 --out runs/b32
    torchrun --nproc-per-node 4 examples/clip/train.py ...       # DDP, the loss across ranks

Each step takes a global batch, split over ranks and then into micro-batches, through
`infcl.grad_cache_step`: encoder memory is one micro-batch's, loss memory is `infcl.inf_loss`'s
O(B) (CPU: its torch tiles), and the gradients are those of one step on the whole batch.
`--resume` continues from a checkpoint (model, optimizer, scheduler, step, data position, RNG):
the resumed run's losses are the uninterrupted run's.

Writes under --out: `checkpoints/step_NNNNNNN.pt` and `latest.pt` (loadable with
`open_clip.create_model_and_transforms(name, pretrained=path)`), `log.csv` (one row a step),
`eval.csv` (both written as the run goes) and `curves.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import infcl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # noqa: E402
from data import PairLoader, expand_shards  # noqa: E402

LOSSES = {"inf": infcl.inf_loss, "chunked": infcl.ring_loss, "naive": infcl.naive_loss}
"""`chunked` is ring_loss: torch tiles, around the ranks under torchrun, chunked_loss in one process."""
SIGMOID_LOSSES = {"inf": infcl.inf_sigmoid_loss, "chunked": infcl.ring_sigmoid_loss,
                  "naive": infcl.naive_sigmoid_loss}
"""With --siglip: the same three paths of the sigmoid loss."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--model", required=True, help="open_clip model config name (ViT-B-32, or one registered)")
    a("--model-config", action="append", default=[], help="extra JSON config file or folder")
    a("--train-data", required=True, help="shard pattern, e.g. 'cc3m/{00000..00331}.tar'")
    a("--out", type=Path, required=True, help="folder for checkpoints, logs and the plot")
    a("--batch-size", type=int, required=True, help="global batch per step, over all ranks")
    a("--micro-batch-size", type=int, required=True, help="samples per encoder forward")
    a("--steps", type=int, required=True)
    a("--lr", type=float, default=5e-4)
    a("--wd", type=float, default=0.2)
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.98)
    a("--eps", type=float, default=1e-6)
    a("--warmup", type=int, default=100, help="linear warm-up steps, then cosine to 0")
    a("--loss", choices=sorted(LOSSES), default="inf")
    a("--mode", choices=("cache", "accumulate"), default="cache",
      help="gradient cache (loss once) or open_clip accum_freq style (loss per micro-batch)")
    a("--precision", choices=("auto", "bf16", "fp32"), default="auto",
      help="autocast dtype of the encoders; auto: bf16 on CUDA, fp32 on CPU")
    a("--siglip", action="store_true",
      help="the sigmoid loss, with a learnable logit bias (as open_clip's --siglip: scale 10, bias -10)")
    a("--lock-image", action="store_true", help="LiT: freeze the image tower")
    a("--lock-image-from", help="checkpoint whose image tower the locked tower starts from")
    a("--compile", action="store_true", help="torch.compile the encoders")
    a("--grad-clip-norm", type=float, help="clip the gradients' global norm to this before a step")
    a("--imagenet-names", action="store_true",
      help="zero-shot with open_clip's ImageNet class names and OpenAI templates (an ImageNet "
           "val ImageFolder in --zeroshot-dir)")
    a("--resume", help="checkpoint to continue from, or 'latest' for OUT/checkpoints/latest.pt")
    a("--epoch-steps", type=int, default=0,
      help="steps per epoch: checkpoints at epoch ends are named epoch_N.pt and the newest "
           "epoch_latest.pt, as open_clip_train names them (0: step_N.pt and latest.pt)")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    a("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    a("--zeroshot-every", type=int, help="zero-shot every N steps (0: at the end only; default: --eval-every)")
    a("--retrieval-every", type=int, help="retrieval every N steps (0: at the end only; default: --eval-every)")
    a("--zeroshot-dir", help="ImageFolder for zero-shot evaluation")
    a("--retrieval-data", help="shard pattern for retrieval evaluation")
    a("--templates", nargs="+", default=list(ev.DEFAULT_TEMPLATES))
    a("--shuffle-buffer", type=int, default=1000)
    a("--workers", type=int, default=0,
      help="processes that decode and transform images (0: in this one); the batches are the same")
    a("--seed", type=int, default=0)
    a("--tensorboard", type=Path,
      help="also write TensorBoard scalars here, named as open_clip_train names them "
           "(train/loss, train/lr, train/scale, train/samples_per_second at every step; val/<metric> "
           "at each evaluation); needs the tensorboard package")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--no-progress", action="store_true")
    return p.parse_args(argv)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world, device) from torchrun's environment; one process without it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, torch.device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


TB_NAMES = {"samples_per_s": "samples_per_second"}
"""log.csv's column -> open_clip_train's TensorBoard scalar name (after `train/`)."""


def tensorboard_writer(path: Path | None):
    """A `SummaryWriter` for `path` (None: no TensorBoard). Fails before training when the
    tensorboard package is missing, as open_clip_train does, rather than after the first step."""
    if path is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exn:
        raise ImportError(f"--tensorboard needs the tensorboard package ({exn}): "
                          "pip install tensorboard") from exn
    return SummaryWriter(str(path))


def lr_lambda(warmup: int, steps: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def param_groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on gains, biases, embeddings' scale or logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if plain else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(path: Path, *, name: str, model: nn.Module, opt, sched, step: int,
                    positions: list[int], world: int, rngs: list, args: argparse.Namespace) -> None:
    """One file: a `state_dict` open_clip can load, plus what `--resume` needs (every rank's
    data position: ranks that skipped different numbers of bad samples stand at different
    places in their streams)."""
    ckpt = {
        "name": name,
        "state_dict": ev.unwrap(model).state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "data": {"position": positions[0], "positions": positions, "world": world},
        "rng": rngs,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)  # a crash while writing never leaves a half checkpoint behind


def link_latest(ckpt_dir: Path, path: Path, latest: str = "latest.pt") -> None:
    """Point `latest` at `path` atomically: a new link beside it, renamed over it, so that a
    kill at any moment leaves the old or the new one, never none."""
    tmp = ckpt_dir / f"{latest}.tmp"
    tmp.unlink(missing_ok=True)
    os.link(path, tmp)
    os.replace(tmp, ckpt_dir / latest)


def checkpoint_name(done: int, epoch_steps: int) -> str:
    """`epoch_N.pt` at the end of epoch N when epochs are given, else `step_NNNNNNN.pt`."""
    if epoch_steps and done % epoch_steps == 0:
        return f"epoch_{done // epoch_steps}.pt"
    return f"step_{done:07d}.pt"


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint of the highest step among step_*.pt and epoch_*.pt (their own record)."""
    found = []
    for path in [*ckpt_dir.glob("step_*.pt"), *ckpt_dir.glob("epoch_[0-9]*.pt")]:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no full read
            found.append((int(ckpt["step"]), path))
        except Exception:  # a torn or foreign file is not a checkpoint to resume from
            continue
    return max(found)[1] if found else None


class CsvLog:
    """A CSV written as the run goes: one row appended (and flushed) per `add`. A run resumed at
    step `keep_upto` first keeps the rows of steps up to and including it (the checkpoint's own
    row among them) and drops the rest, by writing a new file beside the old and renaming it
    over (a kill during that leaves the old file whole); a fresh run (`keep_upto=0`) starts
    the file anew."""

    def __init__(self, path: Path, keep_upto: int) -> None:
        self.path = path
        self.fields: list[str] | None = None
        kept: list[dict] = []
        if path.exists() and keep_upto > 0:
            text = path.read_text()
            if not text.endswith("\n"):  # the last row was torn by a kill mid-write: drop it
                text = text[: text.rfind("\n") + 1]
            reader = csv.DictReader(io.StringIO(text, newline=""))
            self.fields = list(reader.fieldnames or []) or None
            kept = [r for r in reader if None not in r.values() and int(r["step"]) <= keep_upto]
        self._rewrite(kept)

    def _rewrite(self, rows: list[dict]) -> None:
        """The file as the header of `fields` (none while unknown) and `rows`, replaced whole."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            if self.fields:
                w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        os.replace(tmp, self.path)

    def add(self, row: dict) -> None:
        if self.fields is not None and set(row) - set(self.fields):  # a new column: widen
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            self.fields += [k for k in row if k not in self.fields]
            self._rewrite(rows)
        with self.path.open("a", newline="") as f:
            if self.fields is None:
                self.fields = list(row)
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if f.tell() == 0:
                w.writeheader()
            w.writerow(row)


def plot(out: Path) -> Path:
    """curves.png: training loss and logit scale per step, evaluation metrics per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "log.csv").open() as f:
        log = list(csv.DictReader(f))
    evals: list[dict] = []
    if (out / "eval.csv").exists():
        with (out / "eval.csv").open() as f:
            evals = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [int(r["step"]) for r in log]
    axes[0].plot(steps, [float(r["loss"]) for r in log])
    axes[0].set(xlabel="step", ylabel="loss", title="contrastive loss (global batch)")
    axes[1].plot(steps, [float(r["scale"]) for r in log])
    axes[1].set(xlabel="step", ylabel="exp(logit_scale)", title="logit scale (inverse temperature)")
    for key in (evals[0].keys() if evals else []):
        if key != "step" and ("top" in key or "R@" in key):
            axes[2].plot([int(r["step"]) for r in evals], [float(r[key]) for r in evals],
                         marker="o", label=key)
    axes[2].set(xlabel="step", ylabel="held-out", title="evaluation", ylim=(0, 1.02))
    if evals:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def check_eval_data(args: argparse.Namespace) -> None:
    """Fail before training, not after it, on evaluation data that is not there."""
    if args.zeroshot_dir:
        folder = Path(args.zeroshot_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"--zeroshot-dir {folder}: no such folder")
        classes = [d for d in folder.iterdir() if d.is_dir()]
        if args.imagenet_names and len(classes) != len(open_clip.IMAGENET_CLASSNAMES):
            raise ValueError(f"--zeroshot-dir {folder} has {len(classes)} class folders; ImageNet "
                             f"names need {len(open_clip.IMAGENET_CLASSNAMES)}")
    if args.retrieval_data:
        expand_shards(args.retrieval_data)


def evaluate(model: nn.Module, tokenizer, preprocess, args, device, *, zeroshot: bool = True,
             retrieval: bool = True) -> dict[str, float]:
    res: dict[str, float] = {}
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):  # evaluating never changes the training's randomness
        if args.zeroshot_dir and zeroshot:
            named = dict(classnames=open_clip.IMAGENET_CLASSNAMES, templates=[
                t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]) if args.imagenet_names else {
                "templates": args.templates}
            res |= ev.zero_shot(model, tokenizer, preprocess, args.zeroshot_dir, device, **named)
        if args.retrieval_data and retrieval:
            res |= ev.retrieval(model, tokenizer, preprocess, args.retrieval_data, device)
    model.train(was_training)
    return res


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world} ranks")
    local_batch = args.batch_size // world
    if local_batch % args.micro_batch_size:
        raise ValueError(
            f"the per-rank batch {local_batch} (--batch-size {args.batch_size} over {world} ranks) "
            f"is not a multiple of --micro-batch-size {args.micro_batch_size}"
        )
    if args.steps < 1 or args.micro_batch_size < 1 or args.batch_size < 1:
        raise ValueError("--steps, --batch-size and --micro-batch-size must be at least 1")
    check_eval_data(args)
    ev.register_configs(*args.model_config)
    if args.model not in open_clip.list_models():
        raise ValueError(f"unknown model {args.model!r}; add its JSON with --model-config")
    out: Path = args.out
    ckpt_dir = out / "checkpoints"
    latest = "epoch_latest.pt" if args.epoch_steps else "latest.pt"
    resume_path = ckpt_dir / latest if args.resume == "latest" else args.resume
    if args.resume == "latest" and not resume_path.exists():
        # the newest checkpoint (a kill while the latest link was repointed leaves it), or
        # none: open_clip's idiom, `--resume latest` on a new run starts it
        resume_path = newest_checkpoint(ckpt_dir)
    ckpt = ev.read_checkpoint(resume_path, args.model) if resume_path else None

    torch.manual_seed(args.seed)  # same initial weights on every rank
    siglip_init = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if args.siglip else {}
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        args.model, device=device, **siglip_init)
    tokenizer = open_clip.get_tokenizer(args.model)
    if args.lock_image:
        if args.lock_image_from and ckpt is None:
            src = ev.read_checkpoint(args.lock_image_from, args.model)
            visual = {k[len("visual."):]: v for k, v in src["state_dict"].items()
                      if k.startswith("visual.")}
            model.visual.load_state_dict(visual)
        model.lock_image_tower(unlocked_groups=0)
    opt = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr,
                            betas=(args.beta1, args.beta2), eps=args.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps))
    start, position = 0, 0
    if ckpt is not None:
        if ckpt["data"]["world"] != world:
            raise ValueError(f"{resume_path} was written by {ckpt['data']['world']} ranks, "
                             f"this run has {world}: resume with the same number of ranks")
        ev.load_state(model, ckpt["state_dict"], str(resume_path))
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]
        position = ckpt["data"].get("positions", [ckpt["data"]["position"]] * world)[rank]
        set_rng_state(ckpt["rng"][rank])
    else:
        torch.manual_seed(args.seed * 7919 + rank)

    frozen = args.lock_image
    ddp = None
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"):
        autocast: Any = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    def encode_image(x):
        with autocast():
            return F.normalize(model.encode_image(x), dim=-1)

    def encode_text(t):
        with autocast():
            return F.normalize(model.encode_text(t), dim=-1)

    def encode_pair(batch):  # one DDP forward for both towers, as DDP wants
        with autocast():
            out = ddp(*batch)
        img, txt = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
        return img, txt

    if args.compile:
        encode_image, encode_text, encode_pair = (
            torch.compile(encode_image), torch.compile(encode_text), torch.compile(encode_pair))
    loss_impl = (SIGMOID_LOSSES if args.siglip else LOSSES)[args.loss]
    if world > 1 and args.loss == "naive":
        raise ValueError("--loss naive materialises one device's logits; across ranks use inf or chunked")
    ring = {"group": dist.group.WORLD} if world > 1 else {}  # the global batch's loss

    def loss_fn(img, txt):  # under autocast, as open_clip's trainer: bf16 products, fp32 loss
        scale = ev.unwrap(model).logit_scale.exp()
        with autocast():
            if args.siglip:
                return loss_impl(img, txt.to(img.dtype), scale, ev.unwrap(model).logit_bias, **ring)
            return loss_impl(img, txt.to(img.dtype), scale, symmetric=True, **ring)

    loader = PairLoader(args.train_data, local_batch, preprocess_train, tokenizer,
                        seed=args.seed, rank=rank, world=world,
                        shuffle_buffer=args.shuffle_buffer, start=position,
                        workers=args.workers)
    log = evals = board = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log, evals = CsvLog(out / "log.csv", start), CsvLog(out / "eval.csv", start)
        board = tensorboard_writer(args.tensorboard)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps,
               disable=rank != 0 or args.no_progress, dynamic_ncols=True,
               mininterval=1 if sys.stderr.isatty() else 15)
    model.train()
    last_eval: dict[str, float] = {}
    if start >= args.steps and rank == 0:
        print(f"{resume_path} is at step {start}, --steps is {args.steps}: nothing to train",
              file=sys.stderr)

    def due(every: int | None, done: int, is_last: bool) -> bool:
        every = args.eval_every if every is None else every
        return is_last or bool(every) and done % every == 0
    for step in bar:
        t0 = time.perf_counter()
        images, texts = next(loader)
        images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        if ddp is None:
            loss = infcl.grad_cache_step(
                encode_image, encode_text, images, texts, loss_fn,
                micro_batch_size=args.micro_batch_size, mode=args.mode, frozen_a=frozen,
                modules=model)
        else:
            loss = infcl.grad_cache_step(
                encode_pair, None, images, texts, loss_fn,
                micro_batch_size=args.micro_batch_size, mode=args.mode, frozen_a=frozen,
                no_sync=ddp.no_sync, modules=model)
        if args.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
        opt.step()
        sched.step()
        with torch.no_grad():
            ev.unwrap(model).logit_scale.clamp_(0, math.log(100))
        loss = loss.float()
        if world > 1:  # each rank's loss is its rows' mean; the global loss is their mean
            dist.all_reduce(loss)
            loss /= world
        done = step + 1
        row = {
            "step": done, "loss": loss.item(), "lr": sched.get_last_lr()[0],
            "scale": ev.unwrap(model).logit_scale.exp().item(),
            "samples_per_s": args.batch_size / (time.perf_counter() - t0),
            "samples_seen": done * args.batch_size, "corrupt": loader.counts.corrupt,
            "bad_shards": len(loader.counts.bad_shards),
        }
        if log is not None:
            log.add(row)
        if board is not None:
            for key in ("loss", "lr", "scale", "samples_per_s"):
                board.add_scalar(f"train/{TB_NAMES.get(key, key)}", row[key], done)
        bar.set_postfix(loss=f"{row['loss']:.3f}", scale=f"{row['scale']:.1f}", refresh=False)
        is_last = done == args.steps
        if is_last or (args.save_every and done % args.save_every == 0):
            rngs = gather_objects(rng_state(), world)
            positions = gather_objects(loader.position, world)
            if rank == 0:
                path = ckpt_dir / checkpoint_name(done, args.epoch_steps)
                save_checkpoint(path, name=args.model, model=model, opt=opt, sched=sched,
                                step=done, positions=positions, world=world, rngs=rngs,
                                args=args)
                link_latest(ckpt_dir, path, latest)
        kinds = {"zeroshot": due(args.zeroshot_every, done, is_last),
                 "retrieval": due(args.retrieval_every, done, is_last)}
        if rank == 0 and (args.zeroshot_dir and kinds["zeroshot"]
                          or args.retrieval_data and kinds["retrieval"]):
            last_eval = evaluate(model, tokenizer, preprocess_val, args, device, **kinds)
            evals.add({"step": done} | last_eval)
            if board is not None:
                for key, value in last_eval.items():
                    if isinstance(value, float):
                        board.add_scalar(f"val/{key}", value, done)
                board.flush()
            bar.write(f"step {done}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in last_eval.items() if isinstance(v, float)))
    bar.close()
    loader.close()
    if board is not None:
        board.close()
    summary: dict[str, Any] = {"out": str(out), "steps": args.steps, "eval": last_eval,
                               "corrupt": loader.counts.corrupt, "read": loader.counts.read,
                               "bad_shards": sorted(loader.counts.bad_shards)}
    if rank == 0:
        if (out / "log.csv").exists():
            summary["plot"] = str(plot(out))
        summary["checkpoint"] = str(ckpt_dir / latest)
        if loader.counts.corrupt:
            print(f"skipped {loader.counts.corrupt} corrupt samples of {loader.counts.read}; "
                  f"first: {loader.counts.errors[:3]}", file=sys.stderr)
        for url, why in sorted(loader.counts.bad_shards.items()):
            print(f"damaged shard {url}: {why}", file=sys.stderr)
    if world > 1:
        dist.barrier()
    return summary


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
