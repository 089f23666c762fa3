"""examples/clip: shard reading, training with resume, evaluation, checkpoints through open_clip.

Needs open_clip (with a torchvision that matches torch) and webdataset; skipped without them.
Everything runs on CPU on a few dozen generated 32x32 images.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import tarfile
from pathlib import Path

import pytest
import torch

try:
    import open_clip
    import torchvision  # noqa: F401
    import webdataset  # noqa: F401
    from open_clip_train import params  # noqa: F401
except Exception as exn:  # ImportError, or torchvision built for another torch (RuntimeError)
    pytest.skip(f"examples/clip needs open_clip and webdataset: {exn}", allow_module_level=True)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "clip"
sys.path.insert(0, str(EXAMPLE))
import data  # noqa: E402
import evaluate as ev  # noqa: E402
import main as oc_main  # noqa: E402
import make_data  # noqa: E402
import train  # noqa: E402

MODEL = "shapes-tiny"
N_TRAIN, N_VAL, PER_SHARD = 64, 30, 16


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("shapes")
    make_data.make(out, n_train=N_TRAIN, n_val=N_VAL, per_shard=PER_SHARD)
    ev.register_configs()
    return make_data.patterns(out, N_TRAIN, N_VAL, PER_SHARD)


@pytest.fixture(scope="module")
def run_two_steps(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train.main(args(shapes, out, "--steps", "2", "--save-every", "1",
                    "--zeroshot-dir", shapes["folder"], "--retrieval-data", shapes["val"]))
    return out


def args(shapes: dict, out: Path, *extra: str) -> list[str]:
    return ["--model", MODEL, "--train-data", shapes["train"], "--out", str(out),
            "--batch-size", "16", "--micro-batch-size", "8", "--warmup", "1", "--lr", "1e-3",
            "--loss", "chunked", "--shuffle-buffer", "8", "--no-progress", *extra]


def losses(out: Path) -> dict[int, float]:
    with (out / "log.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_brace_expansion(shapes) -> None:
    urls = data.expand_shards(shapes["train"])
    assert [Path(u).name for u in urls] == ["0000.tar", "0001.tar", "0002.tar", "0003.tar"]
    both = data.expand_shards(f"{shapes['train']}::{shapes['val']}")
    assert len(both) == 6  # 4 train shards, 2 val shards
    missing = shapes["train"].replace("0003}", "0009}")
    with pytest.raises(FileNotFoundError, match="6 of 10 shards .* are missing"):
        data.expand_shards(missing)


def test_loader_batches_and_position(shapes) -> None:
    _, pre, _ = open_clip.create_model_and_transforms(MODEL)
    tok = open_clip.get_tokenizer(MODEL)
    loader = data.PairLoader(shapes["train"], 8, pre, tok, shuffle_buffer=8)
    images, texts = next(loader)
    assert images.shape == (8, 3, 32, 32) and texts.shape == (8, 16)
    next(loader)
    assert loader.position == 16
    torch.manual_seed(0)
    third = next(loader)
    resumed = data.PairLoader(shapes["train"], 8, pre, tok, shuffle_buffer=8, start=16)
    torch.manual_seed(0)
    again = next(resumed)
    assert torch.equal(third[0], again[0]) and torch.equal(third[1], again[1])
    # an epoch is every sample once; the next epoch reshuffles
    seen = data.ShardStream(data.expand_shards(shapes["train"]), shuffle_buffer=8, epochs=1)
    keys = [s["__key__"] for s in seen]
    assert sorted(keys) == [f"{i:08d}" for i in range(N_TRAIN)]


def test_worker_processes_give_the_same_batches(shapes) -> None:
    """Decoding in 2 processes: the same batches, corrupt counts and position as in one."""
    _, pre, _ = open_clip.create_model_and_transforms(MODEL)
    tok = open_clip.get_tokenizer(MODEL)
    one = data.PairLoader(shapes["train"], 12, pre, tok, shuffle_buffer=8, start=3)
    two = data.PairLoader(shapes["train"], 12, pre, tok, shuffle_buffer=8, start=3, workers=2)
    try:
        for _ in range(7):  # past an epoch of 64
            a, b = next(one), next(two)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert one.position == two.position
    finally:
        two.close()


def test_corrupt_samples_are_skipped_and_counted(shapes, tmp_path) -> None:
    good = data.expand_shards(shapes["val"])[0]
    bad = tmp_path / "0000.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for i, member in enumerate(src.getmembers()[:12]):  # 6 samples
            payload = src.extractfile(member).read()
            if i == 0:
                payload = b"not a jpeg"  # sample 0: broken image
            if i == 3:
                continue  # sample 1: no caption
            member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
    _, pre, _ = open_clip.create_model_and_transforms(MODEL)
    loader = data.PairLoader(str(bad), 4, pre, open_clip.get_tokenizer(MODEL),
                             shuffle_buffer=0, epochs=1)
    images, _ = next(loader)
    assert images.shape[0] == 4
    assert loader.counts.corrupt == 2 and loader.position == 6
    assert len(list(data.read_pairs(str(bad)))) == 4


def _cut(src: str, dst: Path, keep: int) -> None:
    """The first `keep` bytes of tar `src` at `dst`."""
    dst.write_bytes(Path(src).read_bytes()[:keep])


def test_damaged_shards_are_named_once(shapes, tmp_path) -> None:
    """A tar cut at a member boundary or inside a member: the shard is reported once (however
    many epochs read it), the samples before the cut are read, none is counted twice."""
    good = data.expand_shards(shapes["val"])[0]
    with tarfile.open(good) as t:
        members = t.getmembers()
    boundary = members[8].offset  # four whole samples, then the cut
    for name, keep in (("boundary", boundary), ("inside", boundary + 700)):
        bad = tmp_path / name / "0000.tar"
        bad.parent.mkdir()
        _cut(good, bad, keep)
        stream = data.ShardStream([str(bad)], shuffle_buffer=0, epochs=2)
        samples = [s for s in stream if "txt" in s and any(e in s for e in data.IMAGE_EXTS)]
        assert len(samples) == 8, name  # two epochs of the four whole samples
        assert list(stream.counts.bad_shards) == [str(bad)], (name, stream.counts.bad_shards)
        assert "cut short" in stream.counts.bad_shards[str(bad)]
        assert data.truncated(good) is None


def test_undecodable_shards_stop_with_an_error(shapes, tmp_path) -> None:
    good = data.expand_shards(shapes["val"])[0]
    bad = tmp_path / "0000.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            payload = src.extractfile(member).read()
            if member.name.endswith(".jpg"):
                payload = b"not a jpeg"
            member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
    _, pre, _ = open_clip.create_model_and_transforms(MODEL)
    loader = data.PairLoader(str(bad), 4, pre, open_clip.get_tokenizer(MODEL), shuffle_buffer=0)
    with pytest.raises(RuntimeError, match="no sample of rank 0's shards decodes"):
        next(loader)


def test_resume_latest_without_checkpoint_starts_fresh(shapes, tmp_path) -> None:
    train.main(args(shapes, tmp_path, "--steps", "1", "--resume", "latest"))
    assert sorted(losses(tmp_path)) == [1]


def test_resume_in_place_keeps_the_log_and_latest_is_atomic(shapes, tmp_path, monkeypatch) -> None:
    """Resumed in its own folder from step 2 of 3, a run keeps rows 1 and 2 (the checkpoint's
    own row) as they were and rewrites row 3 with the same value; eval.csv names `step` once;
    a failure while `latest.pt` is repointed leaves the previous one."""
    train.main(args(shapes, tmp_path, "--steps", "3", "--save-every", "1",
                    "--retrieval-data", shapes["val"], "--eval-every", "1"))
    first = losses(tmp_path)
    ckpts = tmp_path / "checkpoints"
    train.main(args(shapes, tmp_path, "--steps", "3", "--resume", str(ckpts / "step_0000002.pt"),
                    "--retrieval-data", shapes["val"], "--eval-every", "1"))
    assert losses(tmp_path) == first and sorted(first) == [1, 2, 3]
    with (tmp_path / "eval.csv").open() as f:
        header = next(csv.reader(f))
        assert header.count("step") == 1 and len(list(f)) == 3
    assert not list(ckpts.glob("*.tmp"))

    def no_link(*a, **k):
        raise OSError("killed")

    monkeypatch.setattr(train.os, "link", no_link)
    with pytest.raises(OSError, match="killed"):
        train.main(args(shapes, tmp_path, "--steps", "4", "--resume", "latest"))
    assert torch.load(ckpts / "latest.pt", weights_only=True)["step"] == 3


def test_csv_log_drops_a_torn_row_and_widens_its_header(tmp_path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n1")  # killed while writing step 13
    log = train.CsvLog(path, keep_upto=2)
    log.add({"step": 3, "loss": 0.25, "bad_shards": 0})
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[2]["bad_shards"] == "0"
    assert rows[0]["loss"] == "0.5" and rows[0]["bad_shards"] == ""
    train.CsvLog(path, keep_upto=3)  # resumed again: the widened rows all stay
    with path.open() as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_resume_latest_falls_back_to_the_newest_step(shapes, tmp_path) -> None:
    """A kill while `latest.pt` was repointed leaves step files: `--resume latest` continues
    from the newest of them instead of starting over."""
    train.main(args(shapes, tmp_path, "--steps", "2", "--save-every", "1"))
    first = losses(tmp_path)
    (tmp_path / "checkpoints" / "latest.pt").unlink()
    (tmp_path / "checkpoints" / "step_0000002.pt").unlink()
    train.main(args(shapes, tmp_path, "--steps", "2", "--resume", "latest"))
    assert losses(tmp_path) == first


def test_log_is_written_as_the_run_goes(shapes, tmp_path, monkeypatch) -> None:
    """A run that dies at step 2 without a checkpoint has step 1's row on disk."""
    real = data.PairLoader.__next__
    calls = []

    def dying(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(data.PairLoader, "__next__", dying)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(shapes, tmp_path, "--steps", "3"))
    assert sorted(losses(tmp_path)) == [1]


def test_two_steps_then_resume_reproduces(shapes, run_two_steps, tmp_path) -> None:
    first = losses(run_two_steps)
    assert sorted(first) == [1, 2] and all(v > 0 for v in first.values())
    assert (run_two_steps / "curves.png").stat().st_size > 0
    with (run_two_steps / "eval.csv").open() as f:
        assert "zeroshot_top1" in next(csv.DictReader(f))
    ckpts = run_two_steps / "checkpoints"
    train.main(args(shapes, tmp_path, "--steps", "2", "--resume", str(ckpts / "step_0000001.pt")))
    assert losses(tmp_path) == {2: first[2]}
    want = torch.load(ckpts / "step_0000002.pt", weights_only=True)
    got = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert got["step"] == 2 and got["data"] == want["data"]
    for k, v in want["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k


def test_checkpoint_loads_through_open_clip(run_two_steps) -> None:
    path = run_two_steps / "checkpoints" / "latest.pt"
    model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=str(path))
    saved = torch.load(path, weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_checkpoint_from_another_model(run_two_steps, tmp_path) -> None:
    path = run_two_steps / "checkpoints" / "latest.pt"
    with pytest.raises(ValueError, match="saved from model 'shapes-tiny', not 'ViT-B-32'"):
        ev.read_checkpoint(path, "ViT-B-32")
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["text_projection"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="1 shape mismatches"):
        ev.load_state(open_clip.create_model(MODEL), ckpt["state_dict"], "ckpt")


def test_siglip_trains(shapes, tmp_path) -> None:
    """--siglip: a learnable logit bias that the sigmoid loss moves, a finite loss every step."""
    train.main(args(shapes, tmp_path, "--steps", "2", "--siglip"))
    ckpt = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)
    bias = ckpt["state_dict"]["logit_bias"]
    assert bias.numel() == 1 and float(bias) != -10.0
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and all(math.isfinite(float(r.split(",")[1])) for r in rows[1:])


def test_bad_arguments(shapes, tmp_path) -> None:
    with pytest.raises(ValueError, match="not a multiple of --micro-batch-size"):
        train.main(args(shapes, tmp_path, "--steps", "1", "--micro-batch-size", "6"))
    with pytest.raises(FileNotFoundError, match="missing"):
        train.main(args({"train": str(tmp_path / "{0000..0001}.tar")}, tmp_path, "--steps", "1"))


OC_FLAGS = ["--model", "ViT-B-32", "--train-data", "a/{0..9}.tar", "--train-num-samples", "1000",
            "--batch-size", "64", "--accum-freq", "2", "--epochs", "3", "--workers", "8",
            "--precision", "amp_bf16", "--logs", "L", "--name", "n"]


def test_open_clip_train_flags_keep_their_meaning() -> None:
    """Per-GPU --batch-size times --accum-freq times the ranks is the loss's batch; epochs of
    --train-num-samples make the steps; the model's own defaults (ViT: beta2 0.98, eps 1e-6)."""
    got, notes = oc_main.translate(OC_FLAGS, world=2)
    opts = dict(zip(got[::2], got[1::2], strict=False))
    # open_clip_train's count: ceil(1000 / 128) = 8 batches, up to the 8 workers: 8, / 2 = 4
    assert (opts["--batch-size"], opts["--micro-batch-size"], opts["--steps"]) == ("256", "64", "12")
    assert opts["--out"] == str(Path("L") / "n") and opts["--precision"] == "bf16"
    assert (opts["--beta2"], opts["--eps"], opts["--mode"]) == ("0.98", "1e-06", "accumulate")
    assert opts["--workers"] == "8" and not any("--workers" in n for n in notes)
    cached, _ = oc_main.translate([*OC_FLAGS, "--grad-cache"], world=2)
    assert cached[cached.index("--mode") + 1] == "cache"


def test_open_clip_train_flags_not_implemented_are_named() -> None:
    with pytest.raises(ValueError, match="--lr-scheduler, --report-to wandb,tensorboard"):
        oc_main.translate([*OC_FLAGS, "--report-to", "wandb,tensorboard", "--lr-scheduler",
                           "const"])
    with pytest.raises(ValueError, match="--precision fp16"):
        oc_main.translate([*OC_FLAGS, "--precision", "fp16"])
    with pytest.raises(ValueError, match="makes no step"):
        oc_main.translate([*OC_FLAGS, "--train-num-samples", "100", "--workers", "1"], world=2)
    with pytest.raises(ValueError, match="--epochs 0"):
        oc_main.translate([*OC_FLAGS, "--epochs", "0"])
    with pytest.raises(ValueError, match="--logs none"):
        oc_main.translate([*OC_FLAGS, "--logs", "none"])
    with pytest.raises(ValueError, match="--precision pure_bf16"):
        oc_main.translate([*OC_FLAGS, "--precision", "pure_bf16"])


def test_open_clip_train_eval_frequencies() -> None:
    """Frequency 0 never evaluates; each kind keeps its own cadence (in epochs of 4 steps)."""
    flags = [*OC_FLAGS, "--imagenet-val", "iv", "--val-data", "v/{0..1}.tar"]
    got, _ = oc_main.translate([*flags, "--zeroshot-frequency", "0", "--val-frequency", "1"], 2)
    assert "--zeroshot-dir" not in got and got[got.index("--retrieval-every") + 1] == "4"
    got, _ = oc_main.translate([*flags, "--zeroshot-frequency", "3", "--val-frequency", "2"], 2)
    assert got[got.index("--zeroshot-every") + 1] == "12"
    assert got[got.index("--retrieval-every") + 1] == "8"


def test_trains_from_an_open_clip_train_command_line(shapes, tmp_path) -> None:
    oc_main.main(["--model", MODEL, "--train-data", shapes["train"], "--train-num-samples", "32",
                  "--batch-size", "8", "--accum-freq", "2", "--epochs", "1", "--precision",
                  "fp32", "--logs", str(tmp_path), "--name", "run", "--grad-cache", "--device",
                  "cpu", "--infcl-loss", "chunked", "--warmup", "1", "--lr", "1e-3",
                  "--val-data", shapes["val"], "--val-frequency", "1", "--grad-clip-norm", "1.0",
                  "--no-progress"])
    run = tmp_path / "run"
    assert sorted(losses(run)) == [1, 2]
    names = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert names == ["epoch_1.pt", "epoch_latest.pt"], names  # open_clip_train's names
    with (run / "eval.csv").open() as f:
        assert "image_to_text_R@1" in next(csv.DictReader(f))
    with pytest.raises(ValueError, match="a run already exists"):  # as open_clip_train refuses
        oc_main.main(["--model", MODEL, "--train-data", shapes["train"], "--train-num-samples",
                      "32", "--batch-size", "8", "--logs", str(tmp_path), "--name", "run",
                      "--device", "cpu"])


def test_bad_eval_data_fails_before_training(shapes, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        train.main(args(shapes, tmp_path, "--steps", "2", "--zeroshot-dir", str(tmp_path / "x")))
    with pytest.raises(ValueError, match="ImageNet names need 1000"):
        train.main(args(shapes, tmp_path, "--steps", "2", "--zeroshot-dir", shapes["folder"],
                        "--imagenet-names"))
    assert not (tmp_path / "log.csv").exists()


def test_topk_accuracy_known_case() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.3, 0.35, 0.4]])
    labels = torch.tensor([0, 1, 1, 0])
    res = ev.topk_accuracy(logits, labels, ks=(1, 2))
    assert res == {"top1": 0.5, "top2": 0.75}


def test_mean_rank_known_case() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]])
    labels = torch.tensor([0, 0, 2])  # ranks 1, 3 and 2 (0.1 ties 0.1: in its favour)
    assert ev.mean_rank(logits, labels) == pytest.approx(2.0)


def test_retrieval_recall_known_case() -> None:
    txt = torch.eye(3)
    img = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.2, 1.0], [0.0, 0.9, 0.1], [0.1, 1.0, 0.0]])
    image_to_text = torch.tensor([0, 1, 2, 1])  # images 1 and 3 share caption 1
    res = ev.retrieval_recall(img, txt, image_to_text, ks=(1, 2))
    # image->text top-1: img0->t0 yes, img1->t2 no, img2->t1 no, img3->t1 yes
    assert res["image_to_text_R@1"] == 0.5 and res["image_to_text_R@2"] == 1.0
    # text->image top-1: t0->img0 yes, t1->img3 yes (a caption of t1), t2->img1 no
    assert res["text_to_image_R@1"] == pytest.approx(2 / 3)
    assert res["text_to_image_R@2"] == pytest.approx(1.0)  # t2's second is img2


def test_zero_shot_and_retrieval_on_shards(shapes, run_two_steps) -> None:
    model, pre, tok = ev.load_model(MODEL, run_two_steps / "checkpoints" / "latest.pt")
    zs = ev.zero_shot(model, tok, pre, shapes["folder"], "cpu")
    assert 0 <= zs["zeroshot_top1"] <= zs["zeroshot_top5"] <= 1
    assert zs["zeroshot_chance"] == pytest.approx(1 / 30)
    assert 1 <= zs["zeroshot_mean_rank"] <= 30
    rr = ev.retrieval(model, tok, pre, shapes["val"], "cpu")
    assert rr["retrieval_pairs"] == N_VAL and rr["image_to_text_R@1"] <= rr["image_to_text_R@10"]
    classifier = ev.zero_shot_classifier(model, tok, ["red circle", "blue square"], ["a {}."], "cpu")
    assert classifier.shape == (64, 2)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(2))


def _torchrun(*train_args: str) -> None:
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(EXAMPLE / "train.py"), *train_args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_resume_under_two_ranks_with_corrupt_samples_on_one(shapes, tmp_path) -> None:
    """Two gloo ranks under torchrun, one shard with broken images, so the ranks stand at
    different places in their streams: resumed from step 1, steps 2 and 3 match exactly."""
    src = data.expand_shards(shapes["train"])
    for i, url in enumerate(src):
        dst = tmp_path / "train" / Path(url).name
        dst.parent.mkdir(exist_ok=True)
        with tarfile.open(url) as a, tarfile.open(dst, "w") as b:
            for j, member in enumerate(a.getmembers()):
                payload = a.extractfile(member).read()
                if i == 0 and member.name.endswith(".jpg") and j < 12:
                    payload = b"broken"  # 6 bad samples in shard 0 only
                member.size = len(payload)
                b.addfile(member, io.BytesIO(payload))
    pattern = str(tmp_path / "train" / "{0000..0003}.tar")
    common = ["--model", MODEL, "--train-data", pattern, "--batch-size", "16",
              "--micro-batch-size", "8", "--warmup", "1", "--lr", "1e-3", "--loss", "chunked",
              "--shuffle-buffer", "8", "--no-progress", "--device", "cpu", "--steps", "3"]
    _torchrun(*common, "--out", str(tmp_path / "a"), "--save-every", "1")
    first = losses(tmp_path / "a")
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "step_0000001.pt", weights_only=True)
    positions = ckpt["data"]["positions"]
    assert len(positions) == 2 and positions[0] != positions[1], positions  # the point
    _torchrun(*common, "--out", str(tmp_path / "b"),
              "--resume", str(tmp_path / "a" / "checkpoints" / "step_0000001.pt"))
    assert losses(tmp_path / "b") == {2: first[2], 3: first[3]}


LAUNCHER = """
import sys
import open_clip
import open_clip.factory
import infcl

open_clip.add_model_config(sys.argv[1])
calls = []
class Counted:
    def __init__(self, base):
        self.base = base
    def __call__(self, *args, **kwargs):
        loss = self.base(*args, **kwargs)
        forward = loss.forward
        def counted(*a, **k):
            calls.append(1)
            return forward(*a, **k)
        loss.forward = counted
        return loss
open_clip.factory.ClipLoss = Counted(infcl.ClipLoss)
open_clip.factory.SigLipLoss = Counted(infcl.SigLipLoss)
from open_clip_train.main import main
main(sys.argv[2:])
print("infcl losses run:", len(calls))
"""


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_open_clip_train_runs_on_infcl_losses(shapes, tmp_path, siglip) -> None:
    """Migrating's route: open_clip's own trainer (its webdataset pipeline, --accum-freq) with
    the two names replaced trains on infcl's losses, with the pinned webdataset and pandas."""
    import subprocess

    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    cmd = [sys.executable, str(launcher), str(EXAMPLE / "configs"),
           "--model", MODEL, "--train-data", shapes["train"], "--train-num-samples", "32",
           "--dataset-type", "webdataset", "--batch-size", "8", "--accum-freq", "2",
           "--epochs", "1", "--precision", "fp32", "--workers", "1", "--device", "cpu",
           "--logs", str(tmp_path / "logs"), "--name", "run"] + (["--siglip"] if siglip else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # 32 samples in batches of 8: 2 steps of 2 accumulated batches, the loss once per batch
    assert "infcl losses run: 4" in done.stdout, done.stdout[-2000:]
    assert (tmp_path / "logs" / "run" / "checkpoints" / "epoch_1.pt").exists()


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_match_the_logs(shapes, tmp_path) -> None:
    """`--report-to tensorboard` (open_clip_train's flag) writes open_clip's scalar names to
    <logs>/<name>/tensorboard, one value per step equal to log.csv's, val/ ones per evaluation."""
    pytest.importorskip("tensorboard")
    oc_main.main(["--model", MODEL, "--train-data", shapes["train"], "--train-num-samples", "32",
                  "--batch-size", "8", "--accum-freq", "2", "--epochs", "1", "--precision",
                  "fp32", "--logs", str(tmp_path), "--name", "run", "--grad-cache", "--device",
                  "cpu", "--infcl-loss", "chunked", "--warmup", "1", "--val-data", shapes["val"],
                  "--val-frequency", "1", "--report-to", "tensorboard", "--no-progress"])
    run = tmp_path / "run"
    got = _scalars(run / "tensorboard")
    with (run / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    for column, tag in [("loss", "train/loss"), ("lr", "train/lr"), ("scale", "train/scale"),
                        ("samples_per_s", "train/samples_per_second")]:
        want = {int(r["step"]): float(r[column]) for r in rows}
        assert got[tag].keys() == want.keys(), tag
        for step, value in want.items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
    with (run / "eval.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    r1 = got["val/image_to_text_R@1"]
    assert r1[int(last["step"])] == pytest.approx(float(last["image_to_text_R@1"]), rel=1e-6)


def test_report_to_wandb_is_named() -> None:
    with pytest.raises(ValueError, match="--report-to wandb"):
        oc_main.translate(["--model", MODEL, "--train-data", "x.tar", "--train-num-samples", "8",
                           "--report-to", "wandb"])
