"""open_clip_train's command line on this example's trainer (`train.py`).

    python examples/clip/main.py --model ViT-B-32 --train-data 'cc3m/{00000..00331}.tar' \
        --train-num-samples 2800000 --batch-size 256 --accum-freq 4 --epochs 32 \
        --precision amp_bf16 --workers 8 --logs logs --name b32 --grad-cache
    torchrun --nproc-per-node 4 examples/clip/main.py ...   # the same flags under torchrun

A command written for `python -m open_clip_train.main` runs with only the program name changed.
The flags are parsed by open_clip_train's own parser and keep its meanings. `--batch-size` is
per GPU and per micro-step, and `--accum-freq` micro-steps make one optimizer step, so the loss
sees `batch_size x accum_freq x world` pairs. `--epochs` times `--train-num-samples` sets the
number of steps, rounded as open_clip_train rounds them (up, to its loader workers). `--save-frequency`, `--zeroshot-frequency` and `--val-frequency` count in
epochs. `--imagenet-val` is an ImageNet val ImageFolder, scored zero-shot with open_clip's
class names and templates. `--val-data` gives retrieval recall on held-out shards. `--logs`
and `--name` name the run's folder. `--resume latest` continues the run, or starts it.

infcl adds two flags. `--grad-cache`: with `--accum-freq` above 1, the exact gradient cache
(the loss once on the whole batch, each micro-batch re-encoded) instead of open_clip's
accumulation (the loss once per micro-batch). `--infcl-loss inf|chunked|naive` picks the loss
(default `inf`). Whichever of `--local-loss` and `--gather-with-grad` is given, the loss is the
exact loss of the global batch.

The trainer does not implement every flag of open_clip_train. Checkpoints keep open_clip's
names (`checkpoints/epoch_N.pt`, `epoch_latest.pt`; train.py's own content, which open_clip
loads as weights); the logs are `log.csv` / `eval.csv` in place of open_clip's log files, and
`--report-to tensorboard` writes open_clip's TensorBoard scalars to `<logs>/<name>/tensorboard`. A flag it does not implement, given a value other than its default, stops the run
with an error that names the flag: no flag is ignored without a word. Flags that only tune
open_clip's own logging (`--log-every-n-steps`, `--save-most-recent`) are accepted, with a
note saying what they do here. `--workers` decodes images in that many processes, as
open_clip_train's loader workers do, and enters the step count as there.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from open_clip_train import params

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402

PASSED = ("lr", "wd", "beta1", "beta2", "eps", "warmup", "seed")
"""Flags with the same name and meaning in both trainers (`--device` too, when given: else
CUDA when there is one, as open_clip_train picks it)."""
TRANSLATED = {
    "train_data", "model", "train_num_samples", "batch_size", "accum_freq", "epochs",
    "precision", "logs", "name", "resume", "save_frequency", "zeroshot_frequency",
    "val_frequency", "imagenet_val", "val_data", "lock_image", "grad_clip_norm",
    "torchcompile", "siglip", "dataset_type", "workers", "report_to",
}
"""Flags mapped onto train.py's (see `translate`)."""
NOTED = {
    "save_most_recent": "checkpoints/latest.pt always points at the newest checkpoint",
    "log_every_n_steps": "log.csv gets a row every step; --log-every-n-steps changes nothing",
    "local_loss": "the loss is the exact loss of the global batch whatever --local-loss says",
    "gather_with_grad": "the loss is exact across ranks without --gather-with-grad",
}
"""Accepted flags that change nothing in this trainer, and what is printed when one is given."""
PRECISIONS = {"amp_bf16": "bf16", "amp_bfloat16": "bf16", "fp32": "fp32", "amp": "bf16"}
"""open_clip's --precision values this trainer runs (`amp`, fp16 autocast there, runs as bf16
autocast here: there is no fp16 loss scaling in this trainer)."""


def our_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --model is not --model-config
    p.add_argument("--grad-cache", action="store_true")
    p.add_argument("--infcl-loss", choices=sorted(train.LOSSES), default="inf")
    p.add_argument("--model-config", action="append", default=[])
    p.add_argument("--no-progress", action="store_true")
    return p


def run_name(a: argparse.Namespace) -> str:
    """open_clip_train's default run name: date, model, lr, batch, workers, precision."""
    date = datetime.datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    model = a.model.replace("/", "-")
    return "-".join([date, f"model_{model}", f"lr_{a.lr}", f"b_{a.batch_size}",
                     f"j_{a.workers}", f"p_{a.precision}"])


def steps_per_epoch(a: argparse.Namespace, world: int) -> int:
    """Optimizer steps per epoch as open_clip_train counts them for webdataset shards: batches
    of the global batch rounded up, then up to a multiple of the loader workers, then divided
    by --accum-freq."""
    batches = math.ceil(a.train_num_samples / (a.batch_size * world))
    workers = max(1, a.workers)
    return math.ceil(batches / workers) * workers // a.accum_freq


def translate(argv: Sequence[str], world: int = 1) -> tuple[list[str], list[str]]:
    """(train.py's argv, notes to print) for an open_clip_train command line on `world` ranks.

    Raises:
        ValueError: naming the flags this trainer does not implement (given a non-default value),
            or values it cannot run.
    """
    ours, rest = our_flags().parse_known_args(list(argv))
    a = params.parse_args(rest)
    defaults = vars(params.parse_args(["--model", a.model]))  # the model sets some defaults
    given = {k for k, v in vars(a).items() if defaults.get(k) != v}
    unknown = sorted(given - set(PASSED) - TRANSLATED - set(NOTED) - {"device"})
    problems = [f"--{k.replace('_', '-')}" for k in unknown]
    if a.dataset_type not in ("auto", "webdataset"):
        problems.append(f"--dataset-type {a.dataset_type} (webdataset shards only)")
    if a.precision not in PRECISIONS:
        problems.append(f"--precision {a.precision} (amp_bf16, amp or fp32)")
    if a.train_data is None or a.train_num_samples is None:
        problems.append("--train-data and --train-num-samples are both required")
    elif a.train_data.endswith(".csv"):
        problems.append("a CSV --train-data (webdataset shards only)")
    reports = {r.strip() for r in str(a.report_to).split(",") if r.strip()}
    if reports - {"tensorboard", "all"} or "all" in reports:  # open_clip: "all" includes wandb
        problems.append(f"--report-to {a.report_to} (tensorboard only)")
    if str(a.logs).lower() == "none":
        problems.append("--logs none (this trainer always writes its logs and checkpoints)")
    if problems:
        raise ValueError("not supported by this trainer: " + ", ".join(problems))
    small = [f"--{k.replace('_', '-')} {getattr(a, k)}" for k in
             ("batch_size", "accum_freq", "epochs", "train_num_samples") if getattr(a, k) < 1]
    small += [f"--{k.replace('_', '-')} {getattr(a, k)}" for k in
              ("save_frequency", "zeroshot_frequency", "val_frequency") if getattr(a, k) < 0]
    if small:
        raise ValueError("out of range: " + ", ".join(small))
    per_epoch = steps_per_epoch(a, world)
    if per_epoch < 1:
        raise ValueError(f"--train-num-samples {a.train_num_samples} makes no step of "
                         f"{a.batch_size} x {a.accum_freq} micro-batches on {world} ranks")
    notes = [NOTED[k] for k in sorted(given & set(NOTED))]
    if a.precision == "amp":
        notes.append("--precision amp runs as bf16 autocast here (no fp16 loss scaling)")
    out = Path(a.logs) / (a.name or run_name(a))
    argv_out = [
        "--model", a.model, "--train-data", a.train_data, "--out", str(out),
        "--batch-size", str(a.batch_size * a.accum_freq * world),
        "--micro-batch-size", str(a.batch_size), "--steps", str(per_epoch * a.epochs),
        "--mode", "cache" if ours.grad_cache or a.accum_freq == 1 else "accumulate",
        "--loss", ours.infcl_loss,
        "--precision", PRECISIONS[a.precision],
        "--save-every", str(per_epoch * a.save_frequency), "--epoch-steps", str(per_epoch),
    ]
    for k in PASSED:
        argv_out += [f"--{k}", str(getattr(a, k))]
    if "device" in given:
        argv_out += ["--device", a.device]
    # open_clip_train: frequency 0 never evaluates; otherwise every N epochs and at the end
    if a.imagenet_val and a.zeroshot_frequency:
        argv_out += ["--zeroshot-dir", a.imagenet_val, "--imagenet-names",
                     "--zeroshot-every", str(per_epoch * a.zeroshot_frequency)]
    if a.val_data and a.val_frequency:
        argv_out += ["--retrieval-data", a.val_data,
                     "--retrieval-every", str(per_epoch * a.val_frequency)]
    if a.resume:
        argv_out += ["--resume", a.resume]
    argv_out += ["--workers", str(a.workers)]
    if "tensorboard" in reports:  # where open_clip_train writes it: <logs>/<name>/tensorboard
        argv_out += ["--tensorboard", str(out / "tensorboard")]
    if a.grad_clip_norm is not None:
        argv_out += ["--grad-clip-norm", str(a.grad_clip_norm)]
    flags = {"lock_image": "--lock-image", "torchcompile": "--compile", "siglip": "--siglip"}
    argv_out += [flag for k, flag in flags.items() if getattr(a, k)]
    for path in ours.model_config:
        argv_out += ["--model-config", path]
    if ours.no_progress:
        argv_out.append("--no-progress")
    return argv_out, notes


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        params.parse_args(["--help"])  # open_clip_train's own flags; exits
    world = int(os.environ.get("WORLD_SIZE", "1"))
    argv_out, notes = translate(argv, world)
    out = Path(argv_out[argv_out.index("--out") + 1])
    if "--resume" not in argv_out and (out / "log.csv").exists():
        raise ValueError(f"a run already exists at {out}: pass --resume latest to continue it, "
                         f"or --name to start another (as open_clip_train refuses too)")
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return train.main(argv_out)


if __name__ == "__main__":
    main()
