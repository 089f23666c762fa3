"""Zero-shot classification and image<->text retrieval for open_clip models and checkpoints.

    python examples/clip/evaluate.py --model shapes-tiny --checkpoint runs/demo/checkpoints/latest.pt \
        --zeroshot-dir data/shapes/val_folder --retrieval-data 'data/shapes/val/{0000..0000}.tar'

Zero-shot: each class name is filled into every prompt template, the normalised text embeddings
are averaged per class into a classifier, and images are assigned to the nearest class (top-1,
top-5). Class names are the ImageFolder's folder names with `_` read as a space, unless
`--classnames` gives a file with one name per line. Retrieval: recall@1/5/10 from images to
texts and from texts to images over every pair of a shard set.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import read_pairs  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_TEMPLATES = ("a photo of a {}.", "a {}.", "a drawing of a {}.")


def register_configs(*paths: str | Path) -> None:
    """Make the JSON model configs in `paths` (files or folders) known to open_clip by name."""
    for p in (CONFIG_DIR, *paths):
        open_clip.add_model_config(Path(p))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare open_clip model inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def read_checkpoint(path: str | Path, model_name: str, device: str | torch.device = "cpu") -> dict:
    """A checkpoint saved by train.py, checked to belong to `model_name`.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the checkpoint was saved from another model (name or tensor shapes differ).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a train.py checkpoint (no 'state_dict')")
    if "epoch" in ckpt and "step" not in ckpt:  # open_clip_train's: `name` is the run's there
        raise ValueError(
            f"{path} is an open_clip_train checkpoint (epoch {ckpt['epoch']}), not a train.py "
            f"one: it holds no data position or RNG state to resume from")
    saved = ckpt.get("name")
    if saved is not None and saved != model_name:
        raise ValueError(
            f"checkpoint {path} was saved from model {saved!r}, not {model_name!r}: "
            f"pass --model {saved} (and its config) or another checkpoint"
        )
    return ckpt


def load_state(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """`load_state_dict` with an error that names the mismatched tensors instead of a dump."""
    own = unwrap(model).state_dict()
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not fit this model (saved from another architecture?): "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}"
        )
    unwrap(model).load_state_dict(sd)


def load_model(model_name: str, checkpoint: str | Path | None = None, device: str = "cpu"):
    """(model in eval mode, preprocess_val, tokenizer) from a config name and a checkpoint."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device)
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint, model_name, device)
        load_state(model, ckpt["state_dict"], str(checkpoint))
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest logits, for each k (capped at C)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return {f"top{k}": hit[:, :k].any(1).float().mean().item() for k in ks}


def mean_rank(logits: Tensor, labels: Tensor) -> float:
    """Mean 1-based rank of each row's label among its logits (ties counted in its favour): 1
    is perfect, (C + 1) / 2 is chance. It keeps telling models apart where top-5 saturates."""
    true = logits.gather(1, labels[:, None])
    return ((logits > true).sum(1).float() + 1).mean().item()


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, image_to_text: Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways; `image_to_text[i]` is the index of image i's caption in `text_emb`.

    Several images may share one caption (identical strings are embedded once): a text's
    correct images are all that it captions, and a hit is any of them in the top k.
    """
    sim = image_emb.float() @ text_emb.float().T  # [N images, T texts]
    n, t = sim.shape
    i2t = sim.topk(min(max(ks), t), dim=1).indices == image_to_text[:, None]
    t2i_top = sim.T.topk(min(max(ks), n), dim=1).indices  # [T, k] image indices
    t2i = image_to_text[t2i_top] == torch.arange(t, device=sim.device)[:, None]
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = i2t[:, :k].any(1).float().mean().item()
        out[f"text_to_image_R@{k}"] = t2i[:, :k].any(1).float().mean().item()
    return out


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str], device,
                 batch_size: int = 256) -> Tensor:
    m = unwrap(model)
    parts = [F.normalize(m.encode_text(tokenizer(list(texts[a : a + batch_size])).to(device)), dim=-1)
             for a in range(0, len(texts), batch_size)]
    return torch.cat(parts)


@torch.no_grad()
def encode_images(model: nn.Module, images: Iterable[Tensor], device) -> Tensor:
    m = unwrap(model)
    return torch.cat([F.normalize(m.encode_image(x.to(device)), dim=-1) for x in images])


def zero_shot_classifier(model: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                         templates: Sequence[str], device) -> Tensor:
    """`[D, C]`: per class, the renormalised mean of its prompts' text embeddings."""
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts, device).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1).T


def zero_shot(model: nn.Module, tokenizer: Callable, preprocess: Callable, folder: str | Path,
              device, *, templates: Sequence[str] = DEFAULT_TEMPLATES,
              classnames: Sequence[str] | None = None, batch_size: int = 256) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy and the true class's mean rank on an ImageFolder
    (`folder/<class>/<image>`)."""
    from torchvision.datasets import ImageFolder

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"no ImageFolder at {folder}")
    ds = ImageFolder(str(folder), transform=preprocess)
    names = list(classnames) if classnames else [c.replace("_", " ") for c in ds.classes]
    if len(names) != len(ds.classes):
        raise ValueError(f"{len(names)} class names for {len(ds.classes)} folders in {folder}")
    classifier = zero_shot_classifier(model, tokenizer, names, templates, device)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size)
    logits, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            logits.append(encode_images(model, [x], device) @ classifier)
            labels.append(y.to(device))
    logits_all, labels_all = torch.cat(logits), torch.cat(labels)
    res = topk_accuracy(logits_all, labels_all)
    res["mean_rank"] = mean_rank(logits_all, labels_all)
    return {f"zeroshot_{k}": v for k, v in res.items()} | {"zeroshot_chance": 1 / len(names)}


def retrieval(model: nn.Module, tokenizer: Callable, preprocess: Callable, pattern: str, device,
              *, batch_size: int = 256) -> dict[str, float]:
    """Recall@1/5/10 both ways over every (image, caption) pair of a shard set."""
    images, captions = [], []
    for image, caption in read_pairs(pattern):
        images.append(preprocess(image))
        captions.append(caption)
    if not images:
        raise ValueError(f"no readable pairs in {pattern}")
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    img = encode_images(model, [torch.stack(images[a : a + batch_size])
                                for a in range(0, len(images), batch_size)], device)
    txt = encode_texts(model, tokenizer, unique, device, batch_size)
    mapping = torch.tensor([index[c] for c in captions], device=img.device)
    res = retrieval_recall(img, txt, mapping)
    return res | {"retrieval_pairs": len(images), "retrieval_texts": len(unique)}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="open_clip model config name")
    p.add_argument("--model-config", action="append", default=[],
                   help="extra JSON config file or folder to register (repeatable)")
    p.add_argument("--checkpoint", help="train.py checkpoint (default: untrained weights)")
    p.add_argument("--zeroshot-dir", help="ImageFolder for zero-shot classification")
    p.add_argument("--classnames", help="file with one class name per line, in folder order")
    p.add_argument("--templates", help="file with one prompt template per line, with {}")
    p.add_argument("--retrieval-data", help="shard pattern for image<->text retrieval")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    register_configs(*a.model_config)
    model, preprocess, tokenizer = load_model(a.model, a.checkpoint, a.device)
    res: dict[str, float] = {}
    if a.zeroshot_dir:
        names = Path(a.classnames).read_text().splitlines() if a.classnames else None
        tmpl = Path(a.templates).read_text().splitlines() if a.templates else DEFAULT_TEMPLATES
        res |= zero_shot(model, tokenizer, preprocess, a.zeroshot_dir, a.device,
                         templates=tmpl, classnames=names)
    if a.retrieval_data:
        res |= retrieval(model, tokenizer, preprocess, a.retrieval_data, a.device)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
