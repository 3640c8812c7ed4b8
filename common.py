"""What every weight-sharing NAS paper in this repo uses unchanged.

Read a method file (``darts.py``, ...) next to this one. Sections, in order:

  CLI           ``arg``, ``BaseArgs`` (run + retrain flags), ``parse_args``, ``UsageError``
  run folder    seeding, device, logging, atomic checkpoints, JSON helpers
  data          CIFAR-10/100 (torchvision), ImageNet and ImageFolder, ``digits`` (offline, real), ``fake``
  search space  ``PRIMITIVES``, ``OPS`` and the cell pieces of quark0/darts ``operations.py``
  genotypes     ``Genotype``, ``GENOTYPES`` (published cells), ``parse_genotype``
  retraining    ``NetworkCIFAR``, ``NetworkImageNet`` (quark0/darts ``model.py``), ``count_macs``,
                ``train_epoch``, ``evaluate``, ``retrain``
  figures       alpha heatmaps, alpha evolution, training curves, cell drawings

Facts cited as "card §x" are in ../shared/papers/darts_family.md; "official" means
quark0/darts @ f276dd3.
"""

import argparse
import ast
import dataclasses
import difflib
import json
import logging
import os
import random
import shutil
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset


# =====================================================================================
# CLI: a dataclass of flags, parsed with argparse
# =====================================================================================
class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def arg(default, help, group=None):
    """A dataclass field with its --help text (and an optional --help section)."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group})


@dataclasses.dataclass
class BaseArgs:
    # --- run: identical in every method file ---
    exp_name: str = arg("nas", "name of the method; prefix of the run folder", "run")
    seed: int = arg(2, "random seed (official train_search.py --seed 2)", "run")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N (auto = CUDA when present)", "run")
    torch_deterministic: bool = arg(True, "cudnn.deterministic (and benchmark off)", "run")
    amp: bool = arg(False, "bfloat16 autocast for weight steps and retraining (CUDA only)", "run")
    dataset: str = arg("cifar10", "cifar10 | cifar100 | imagefolder | digits | fake", "run")
    data: str = arg("./data", "dataset root (imagefolder: a folder with train/ and val/)", "run")
    image_size: int = arg(0, "input size; 0 = the dataset's own (32 CIFAR, 8 digits)", "run")
    workers: int = arg(2, "DataLoader workers (official: 2)", "run")
    out_dir: str = arg("runs", "where run folders are created", "run")
    run_name: str = arg("", "run folder name; default {exp_name}-{dataset}-s{seed}-{time}", "run")
    steps_per_epoch: int = arg(0, "stop each search and retraining epoch after this many steps (quick tests); "
                               "0 = full epoch", "run")
    report_freq: int = arg(50, "log progress every this many steps (official: 50)", "run")
    genotype: str = arg("", "skip search, retrain this cell: a name (DARTS_V2), a Genotype(...) "
                        "literal or a genotype.json", "run")
    no_retrain: bool = arg(False, "stop after search (write genotype, no retraining)", "run")
    resume: str = arg("", "continue a killed run from the last checkpoint in this run folder, with the "
                      "flags in its args.json (only --device and --workers may be given again)", "run")
    # --- retrain: DARTS protocol, cnn/train.py with --auxiliary --cutout (card §0.6) ---
    retrain_epochs: int = arg(600, "train.py --epochs 600", "retrain")
    retrain_batch_size: int = arg(96, "train.py --batch_size 96", "retrain")
    retrain_lr: float = arg(0.025, "train.py --learning_rate 0.025, cosine to 0", "retrain")
    retrain_momentum: float = arg(0.9, "train.py --momentum 0.9", "retrain")
    retrain_weight_decay: float = arg(3e-4, "train.py --weight_decay 3e-4", "retrain")
    retrain_init_channels: int = arg(36, "train.py --init_channels 36", "retrain")
    retrain_layers: int = arg(20, "train.py --layers 20", "retrain")
    auxiliary: bool = arg(True, "auxiliary tower (paper: on; official flag default off)", "retrain")
    auxiliary_weight: float = arg(0.4, "train.py --auxiliary_weight 0.4", "retrain")
    cutout: bool = arg(True, "cutout (paper: on; official flag default off)", "retrain")
    cutout_length: int = arg(16, "train.py --cutout_length 16 (at 32 px; scaled to the image size)", "retrain")
    drop_path_prob: float = arg(0.2, "train.py --drop_path_prob 0.2 (linear ramp from 0)", "retrain")
    retrain_grad_clip: float = arg(5.0, "train.py --grad_clip 5", "retrain")


def parse_args(args_cls, argv=None):
    """Build an argparse parser from the dataclass: --foo-bar for field foo_bar, sections in
    --help by group ("run", "retrain", else the method's)."""
    doc = (sys.modules[args_cls.__module__].__doc__ or "").strip()
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {}
    for f in dataclasses.fields(args_cls):
        group = f.metadata.get("group") or "search (paper defaults)"
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        if kind is bool:  # --flag for off-by-default switches, --flag / --no-flag for on-by-default
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            groups[group].add_argument(flag, action=action, default=f.default, help=f.metadata["help"])
        else:
            groups[group].add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    return args_cls(**vars(parser.parse_args(argv)))


def cli(main, args_cls):
    """Entry point of every method file: parse flags, run, turn UsageError into one line."""
    try:
        return main(parse_args(args_cls))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is in the run folder's checkpoint", file=sys.stderr)
        sys.exit(130)


# =====================================================================================
# Run folder: seeding, device, logging, checkpoints
# =====================================================================================
# TRY NOT TO MODIFY: seeding
def seed_everything(seed, deterministic=True):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    return torch.Generator().manual_seed(seed)  # for DataLoader shuffling


def get_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but CUDA is not available; use --device cpu")
    return device


def check_common_args(args, device):
    """Flag combinations that no method can run: one clear line instead of a deep traceback."""
    if args.amp and device.type != "cuda":
        raise UsageError("--amp needs a CUDA device (bfloat16 autocast); drop --amp on CPU")
    if args.dataset not in DATASETS:
        hint = difflib.get_close_matches(args.dataset, DATASETS, n=1)
        raise UsageError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    for name in ("epochs", "batch_size", "retrain_batch_size", "init_channels", "layers",
                 "retrain_layers", "retrain_init_channels"):
        if getattr(args, name, 1) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    for train in (True, False):  # missing / empty folders and failed downloads, before any run folder exists
        load_dataset(args.dataset, args.data, train, args.image_size)


def resume_args(args, script):
    """--resume RUN_DIR: check the folder and its checkpoints, then return the run's saved flags
    (with --device and --workers from this command line). Writes nothing, so a bad folder is
    left exactly as it was."""
    run_dir, method = Path(args.resume), Path(script).stem
    if not (run_dir / "args.json").is_file():
        raise UsageError(f"--resume {run_dir}: no args.json there, so it is not a run folder")
    if not (run_dir / Path(script).name).is_file():
        raise UsageError(f"--resume {run_dir}: the run was not made by {Path(script).name}")
    if (run_dir / "results.json").is_file():
        raise UsageError(f"--resume {run_dir}: the run has finished (see its results.json)")
    defaults = type(args)()
    given = [f.name for f in dataclasses.fields(args)
             if f.name not in ("resume", "device", "workers") and getattr(args, f.name) != getattr(defaults, f.name)]
    if given:
        raise UsageError(f"--resume uses the run's own flags; drop --{given[0].replace('_', '-')}")
    for path in sorted(run_dir.glob("checkpoint_*.pt")):
        load_checkpoint(path, method)
    try:
        saved = json.loads((run_dir / "args.json").read_text())
        return type(args)(**{**saved, "resume": str(run_dir), "device": args.device, "workers": args.workers})
    except (ValueError, TypeError) as e:
        raise UsageError(f"--resume {run_dir}: its args.json does not fit this {Path(script).name} ({e})") from None


def start_run(args, script):
    """Create the run folder (never reuse one) with args.json, a copy of the script and a logger
    writing to log.txt and stdout; with --resume, reopen the folder and append to its log. In a
    distributed run rank 0 names the folder and is the only one that writes."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if args.resume:
        run_dir = Path(args.resume)
    else:
        name = args.run_name or f"{args.exp_name}-{args.dataset}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        if torch.distributed.is_initialized():  # one name for all ranks
            box = [name]
            torch.distributed.broadcast_object_list(box, src=0)
            name = box[0]
        run_dir = Path(args.out_dir) / name
        if rank == 0 and run_dir.exists():
            raise UsageError(f"run folder {run_dir} already exists; pick another --run-name")
    log = logging.getLogger(f"nas.{run_dir.resolve()}.{rank}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if rank != 0:
        return run_dir, log  # no handlers: other ranks stay quiet
    if not args.resume:
        run_dir.mkdir(parents=True)
        write_json(run_dir / "args.json", dataclasses.asdict(args))
        shutil.copy(script, run_dir / Path(script).name)  # quark0/darts's scripts_to_save idea
        if Path(script).parent.joinpath("common.py").exists():
            shutil.copy(Path(script).parent / "common.py", run_dir / "common.py")
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "log.txt")):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.info("%s run folder %s", "resuming" if args.resume else "new", run_dir)
    log.info("args %s", json.dumps(dataclasses.asdict(args)))
    return run_dir, log


def setup_distributed(device):
    """Under torchrun (WORLD_SIZE > 1) join the process group, NCCL on CUDA and gloo on CPU, one
    GPU per process; returns (rank, world_size, device). A plain `python x.py` gets (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def append_jsonl(path, obj):
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def keep_jsonl(path, n):
    """Keep the first n rows of a per-epoch log (the rows of epochs a resumed run redoes go)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return rows[:n]


# TRY NOT TO MODIFY: checkpoints
def make_checkpoint(method, epoch, args, generator, **objects):
    """Everything needed to resume after `epoch`: state_dict() of each named object (model,
    optimisers, schedulers), all RNG states, the DataLoader generator, args. Callers add more
    (alphas, genotype) as plain entries."""
    return {"method": method, "epoch": epoch, "args": dataclasses.asdict(args), "generator": generator.get_state(),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            **{name: obj.state_dict() for name, obj in objects.items()}}


def save_checkpoint(path, state):
    """Atomic: write a temp file, then rename, so a kill never leaves a half-written checkpoint."""
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, method):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a torch file, ...
        raise UsageError(f"cannot read checkpoint {path}: it is corrupt ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != method:
        other = ckpt.get("method") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UsageError(f"checkpoint {path} belongs to {other!r}, not {method!r}")
    return ckpt


def resume_from(path, method, generator, **objects):
    """Load a checkpoint (if the run got that far) into the named objects and restore every RNG
    and the DataLoader generator; returns the first epoch still to run (0 without a checkpoint).
    Restore after building the model, so the RNG continues exactly where the killed run was."""
    if not Path(path).exists():
        return 0
    ckpt = load_checkpoint(path, method)
    for name, obj in objects.items():
        obj.load_state_dict(ckpt[name])
    generator.set_state(ckpt["generator"])
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["epoch"] + 1


def forever(loader):
    """Endless batches from a loader, reshuffled each pass: a val iterator that is not rebuilt
    every step (card §7.1 item 7) as quark0/darts's next(iter(valid_queue)) is."""
    while True:
        yield from loader


# =====================================================================================
# Data
# =====================================================================================
DATASETS = ("cifar10", "cifar100", "imagenet", "imagefolder", "digits", "fake")
CIFAR_STATS = {  # card §0.5 and §5.2
    "cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Cutout:
    """DeVries & Taylor: zero one length x length square (centre uniform, clipped at borders).
    Applied after Normalize, as in quark0/darts utils.py."""

    def __init__(self, length):
        self.length = length

    def __call__(self, img):  # img: (C, H, W)
        h, w = img.shape[1:]
        y, x = torch.randint(h, ()).item(), torch.randint(w, ()).item()  # torch RNG: seeded in workers too
        y0, y1 = max(0, y - self.length // 2), min(h, y + self.length // 2)
        x0, x1 = max(0, x - self.length // 2), min(w, x + self.length // 2)
        img = img.clone()
        img[:, y0:y1, x0:x1] = 0.0
        return img


def _image_transforms(train, size, mean, std, cutout, resize):
    """DARTS augmentation: random crop with 4 px padding at 32 px (scaled), flip, normalise, then
    cutout. resize=True (ImageFolder) first brings any image to size x size."""
    steps = [T.Resize(size), T.CenterCrop(size)] if resize else []
    if train:
        steps += [T.RandomCrop(size, padding=max(1, 4 * size // 32)), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if train and cutout > 0:
        steps.append(Cutout(cutout))
    return T.Compose(steps)


class Transformed(torch.utils.data.Dataset):
    """A tensor dataset with a transform on its images (cutout for digits)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.transform(x), y


def _digits(train, image_size, cutout):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes): real data, no download.
    A fixed permutation gives 1297 train / 500 test images; grey is repeated to 3 channels.
    No crop or flip (a flipped digit is another digit); cutout when asked."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.RandomState(0).permutation(len(x))
    idx = perm[:1297] if train else perm[1297:]
    images = torch.tensor(x[idx], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # (N, 1, 8, 8)
    images = ((images - 0.3) / 0.4).repeat(1, 3, 1, 1)  # (N, 3, 8, 8), roughly zero-mean
    if image_size != 8:
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    ds = TensorDataset(images, torch.tensor(y[idx]))
    return Transformed(ds, Cutout(cutout)) if train and cutout > 0 else ds


def _imagenet(root, train, image_size):
    """ILSVRC-2012 as torchvision's ImageFolder reads it: root/train/<wnid>/*.JPEG and
    root/val/<wnid>/*.JPEG (the layout of pytorch/examples imagenet, which quark0/darts README
    points to). Augmentation of official cnn/train_imagenet.py @ f276dd3 lines 112-133: train
    RandomResizedCrop(224), RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4, 0.2), ToTensor,
    Normalize(ImageNet mean/std); val Resize(256), CenterCrop(224). --image-size sets the crop and
    scales the resize by 256/224 (default 224). No cutout: the official ImageNet script has none."""
    size = image_size or 224
    sub = Path(root) / ("train" if train else "val")
    if not sub.is_dir():
        raise UsageError(f"--dataset imagenet needs {sub}/ with one sub-folder per class "
                         "(torchvision ImageFolder layout: train/<class>/*.JPEG, val/<class>/*.JPEG)")
    if train:
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                 T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)]
    else:
        steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    tf = T.Compose(steps + [T.ToTensor(), T.Normalize(*IMAGENET_STATS)])
    try:
        ds = torchvision.datasets.ImageFolder(str(sub), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"--dataset imagenet: {sub} holds no images ({e})") from None
    return ds, len(ds.classes), size


def load_dataset(name, root, train, image_size=0, cutout=0):
    """Returns (dataset, num_classes, image_size). train=True gives the training set with the
    DARTS augmentation (random crop 32 pad 4, flip; cutout only when asked, i.e. retraining)."""
    if name in ("cifar10", "cifar100"):
        size = image_size or 32
        tf = _image_transforms(train, size, *CIFAR_STATS[name], cutout, resize=False)
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            ds = cls(root, train=train, download=True, transform=tf)
        except Exception as e:  # no internet, disk full, corrupt archive
            raise UsageError(f"could not load {name} under {root!r} ({type(e).__name__}: {e}); "
                             "download it there or try --dataset digits") from None
        return ds, len(ds.classes), size
    if name == "imagenet":  # official ImageNet augmentation; cutout is not part of it
        return _imagenet(root, train, image_size)
    if name == "imagefolder":
        sub = Path(root) / ("train" if train else "val")
        if not sub.is_dir() and not train and (Path(root) / "test").is_dir():
            sub = Path(root) / "test"
        if not sub.is_dir():
            raise UsageError(f"--dataset imagefolder needs {sub}/ with one sub-folder per class")
        size = image_size or 32
        tf = _image_transforms(train, size, *IMAGENET_STATS, cutout, resize=True)
        try:
            ds = torchvision.datasets.ImageFolder(str(sub), transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f"--dataset imagefolder: {sub} holds no images ({e})") from None
        return ds, len(ds.classes), size
    if name == "digits":
        size = image_size or 8
        return _digits(train, size, cutout), 10, size
    if name == "fake":  # random images and labels: shapes only
        size = image_size or 32
        tf = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)] + [Cutout(cutout)] * (train and cutout > 0))
        ds = torchvision.datasets.FakeData(1024 if train else 256, (3, size, size), 10, tf,
                                           random_offset=0 if train else 10**6)
        return ds, 10, size
    raise UsageError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")


def loader(ds, batch_size, shuffle, generator, workers, indices=None, sampler=None):
    if indices is not None:
        sampler = SubsetRandomSampler(indices, generator=generator)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      drop_last=False)  # no persistent workers: each epoch re-seeds them from `generator`


def search_loaders(ds, batch_size, train_portion, generator, workers):
    """The official search split (card §0.5): the training set cut by index, the first
    train_portion for weights ("train"), the rest for alpha ("val"); both augmented."""
    split = int(np.floor(train_portion * len(ds)))
    if split < 1 or split >= len(ds):
        raise UsageError(f"--train-portion {train_portion} leaves an empty half of {len(ds)} images")
    return (loader(ds, batch_size, True, generator, workers, list(range(split))),
            loader(ds, batch_size, True, generator, workers, list(range(split, len(ds)))))


# =====================================================================================
# Search space: the DARTS candidate operations (official operations.py, card §0.2)
# =====================================================================================
PRIMITIVES = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]


class ReLUConvBN(nn.Sequential):
    def __init__(self, C_in, C_out, kernel, stride, padding, affine=True):
        super().__init__(nn.ReLU(inplace=False), nn.Conv2d(C_in, C_out, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(C_out, affine=affine))


class DilConv(nn.Sequential):
    """ReLU -> depthwise k x k (dilated) -> 1x1 -> BN, applied once."""

    def __init__(self, C_in, C_out, kernel, stride, padding, dilation, affine=True):
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(C_in, C_in, kernel, stride, padding, dilation, groups=C_in, bias=False),
                         nn.Conv2d(C_in, C_out, 1, bias=False), nn.BatchNorm2d(C_out, affine=affine))


class SepConv(nn.Sequential):
    """The DARTS separable conv is a DilConv(dilation 1) applied twice; only the first has the stride."""

    def __init__(self, C_in, C_out, kernel, stride, padding, affine=True):
        super().__init__(DilConv(C_in, C_in, kernel, stride, padding, 1, affine),
                         DilConv(C_in, C_out, kernel, 1, padding, 1, affine))


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x.mul(0.0) if self.stride == 1 else x[:, :, ::self.stride, ::self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve H and W with two 1x1 stride-2 convs, one shifted by a pixel, concatenated."""

    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        assert C_out % 2 == 0, "FactorizedReduce needs an even number of output channels"
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))  # (B, C_out, H/2, W/2)


OPS = {  # name -> constructor(C, stride, affine)
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride, padding=1),
    "skip_connect": lambda C, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine),
    "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine),
    "conv_7x1_1x7": lambda C, stride, affine: nn.Sequential(
        nn.ReLU(inplace=False), nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
        nn.BatchNorm2d(C, affine=affine)),
}


def cell_preprocess(C_prev_prev, C_prev, C, reduction_prev, affine=True):
    """Inputs of a cell: c_{k-2} (halved by FactorizedReduce after a reduction cell) and c_{k-1},
    both brought to C channels."""
    pre0 = FactorizedReduce(C_prev_prev, C, affine) if reduction_prev else ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine)
    return pre0, ReLUConvBN(C_prev, C, 1, 1, 0, affine)


def reduction_layers(layers):
    """Cells at 1/3 and 2/3 of the depth are reduction cells (8 cells: 2 and 5; 20: 6 and 13)."""
    return (layers // 3, 2 * layers // 3)


# =====================================================================================
# Genotypes: published cells as data, and a safe parser
# =====================================================================================
Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

GENOTYPES = {  # verbatim from the official repos (card §6; other_methods.md §1.3)
    "DARTS_V1": Genotype(
        normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
                ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
        reduce_concat=[2, 3, 4, 5]),
    "DARTS_V2": Genotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
        reduce_concat=[2, 3, 4, 5]),
    "PC_DARTS": Genotype(  # yuhuixu1993/PC-DARTS genotypes.py PC_DARTS_cifar
        normal=[("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
                ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
                ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
        reduce_concat=[2, 3, 4, 5]),
    "PC_DARTS_ImageNet": Genotype(  # yuhuixu1993/PC-DARTS genotypes.py PC_DARTS_image: searched on
        # ImageNet itself (its README's 24.2 % top-1 error); PC_DARTS above is the CIFAR-10 cell
        normal=[("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 1),
                ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
                ("sep_conv_3x3", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)],
        reduce_concat=[2, 3, 4, 5]),
    "PDARTS": Genotype(  # chenxin061/pdarts genotypes.py
        normal=[("skip_connect", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
                ("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)],
        reduce_concat=[2, 3, 4, 5]),
    "GDAS_V1": Genotype(  # D-X-Y/AutoDL-Projects, paper "GDAS" (2.93 %, 3.4 M)
        normal=[("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("sep_conv_5x5", 2),
                ("sep_conv_3x3", 3), ("skip_connect", 0), ("sep_conv_5x5", 4), ("sep_conv_3x3", 3)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("sep_conv_5x5", 2), ("sep_conv_5x5", 1),
                ("dil_conv_5x5", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_5x5", 1)],
        reduce_concat=[2, 3, 4, 5]),
}
GENOTYPES.update({  # SNAS-Series/SNAS-Series SNAS/genotypes.py (other_methods.md §2.4), top-2 format
    "SNAS_mild": Genotype(
        normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("dil_conv_3x3", 1),
                ("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("sep_conv_3x3", 1)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("max_pool_3x3", 1), ("skip_connect", 2),
                ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0), ("dil_conv_5x5", 2)],
        reduce_concat=[2, 3, 4, 5]),
    "SNAS_moderate": Genotype(
        normal=[("dil_conv_5x5", 0), ("skip_connect", 1), ("sep_conv_3x3", 0), ("skip_connect", 1),
                ("skip_connect", 0), ("skip_connect", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 1)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("sep_conv_5x5", 0), ("dil_conv_5x5", 1),
                ("sep_conv_5x5", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 0), ("sep_conv_5x5", 1)],
        reduce_concat=[2, 3, 4, 5]),
    "SNAS_aggressive": Genotype(
        normal=[("sep_conv_5x5", 0), ("skip_connect", 1), ("skip_connect", 0), ("skip_connect", 1),
                ("dil_conv_5x5", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_5x5", 1)],
        normal_concat=[2, 3, 4, 5],
        reduce=[("sep_conv_5x5", 0), ("none", 1), ("sep_conv_5x5", 0), ("none", 1),
                ("none", 1), ("none", 0), ("none", 1), ("none", 0)],
        reduce_concat=[2, 3, 4, 5]),
    # ENAS micro cell (5 nodes, loose ends concatenated): the paper figure as transcribed by
    # ianwhale/nsga-net models/micro_genotypes.py (other_methods.md §3.4; skip_connect = identity)
    "ENAS": Genotype(
        normal=[("sep_conv_3x3", 1), ("skip_connect", 1), ("sep_conv_5x5", 1), ("skip_connect", 0),
                ("avg_pool_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("avg_pool_3x3", 0),
                ("sep_conv_5x5", 1), ("avg_pool_3x3", 0)],
        normal_concat=[2, 3, 4, 5, 6],
        reduce=[("sep_conv_5x5", 0), ("avg_pool_3x3", 1), ("sep_conv_3x3", 1), ("avg_pool_3x3", 1),
                ("avg_pool_3x3", 1), ("sep_conv_3x3", 1), ("sep_conv_5x5", 4), ("avg_pool_3x3", 1),
                ("sep_conv_3x3", 5), ("sep_conv_5x5", 0)],
        reduce_concat=[2, 3, 6]),
})
GENOTYPES["DARTS"] = GENOTYPES["DARTS_V2"]  # official alias
GENOTYPES["PCDARTS"] = GENOTYPES["PC_DARTS"]
GENOTYPES["GDAS"] = GENOTYPES["GDAS_V1"]


def validate_genotype(g, what="genotype"):
    """Check op names, input indices and concat; raise UsageError naming the first problem."""
    for cell, concat in (("normal", g.normal_concat), ("reduce", g.reduce_concat)):
        edges = getattr(g, cell)
        if not isinstance(edges, (list, tuple)) or len(edges) < 2 or len(edges) % 2:
            raise UsageError(f"{what}: {cell} must be a list of (op, input) pairs, two per node")
        for k, edge in enumerate(edges):
            if not (isinstance(edge, (list, tuple)) and len(edge) == 2):
                raise UsageError(f"{what}: {cell}[{k}] = {edge!r} is not an (op, input) pair")
            op, j = edge
            if op not in OPS:
                raise UsageError(f"{what}: {cell}[{k}] has unknown op {op!r}; known: {', '.join(OPS)}")
            if not isinstance(j, int) or not 0 <= j < k // 2 + 2:
                raise UsageError(f"{what}: {cell}[{k}] reads input {j!r}, but node {k // 2 + 2} "
                                 f"can only read states 0..{k // 2 + 1}")
        if not concat or any(not isinstance(c, int) or not 0 <= c < len(edges) // 2 + 2 for c in concat):
            raise UsageError(f"{what}: {cell}_concat {list(concat)!r} names states that do not exist")
    return g


def _literal(node):
    """ast.literal_eval that also accepts range(a, b) (the official files write concat that way)."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
            and not node.keywords):
        return list(range(*[ast.literal_eval(a) for a in node.args]))
    return ast.literal_eval(node)


def parse_genotype(text):
    """A published name (see GENOTYPES), a path to a genotype.json from a run folder, or a
    literal 'Genotype(normal=[...], normal_concat=..., reduce=[...], reduce_concat=...)'.
    Never eval()s user text. Raises UsageError with one line on bad input."""
    text = text.strip()
    if text in GENOTYPES:
        return GENOTYPES[text]
    if not text.startswith("Genotype(") and (text.endswith(".json") or Path(text).is_file()):
        try:
            d = json.loads(Path(text).read_text())
            d = d.get("genotype", d)
            g = Genotype(*[d[k] for k in Genotype._fields])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"cannot read a genotype from {text!r} ({type(e).__name__}: {e})") from None
        g = Genotype([tuple(e) for e in g.normal], list(g.normal_concat), [tuple(e) for e in g.reduce],
                     list(g.reduce_concat))
        return validate_genotype(g, text)
    if not text.startswith("Genotype("):
        hint = difflib.get_close_matches(text, GENOTYPES, n=1)
        raise UsageError(f"unknown genotype {text!r}; known: {', '.join(sorted(GENOTYPES))}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + "; or pass a Genotype(...) literal or a genotype.json")
    try:
        call = ast.parse(text, mode="eval").body
        if not (isinstance(call, ast.Call) and not call.args and
                {k.arg for k in call.keywords} == set(Genotype._fields)):
            raise ValueError(f"needs exactly the keywords {', '.join(Genotype._fields)}")
        fields = {k.arg: _literal(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, TypeError) as e:
        raise UsageError(f"malformed genotype literal ({type(e).__name__}: {e})") from None
    return validate_genotype(Genotype(**fields), "genotype literal")


def genotype_to_dict(g):
    return {k: [list(e) if isinstance(e, tuple) else e for e in v] for k, v in g._asdict().items()}


# =====================================================================================
# Retraining network (official model.py NetworkCIFAR, NetworkImageNet)
# =====================================================================================
def drop_path(x, drop_prob):
    """Drop a whole op output per sample with prob p, scale survivors by 1/(1-p)."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class Cell(nn.Module):
    """A discrete cell read off a genotype: node k = op_a(state_i) + op_b(state_j)."""

    def __init__(self, genotype, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.preprocess0, self.preprocess1 = cell_preprocess(C_prev_prev, C_prev, C, reduction_prev)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.multiplier = len(self.concat)
        self.indices = [j for _, j in edges]
        # only edges leaving the two cell inputs carry the stride in a reduction cell
        self.ops = nn.ModuleList(OPS[op](C, 2 if reduction and j < 2 else 1, True) for op, j in edges)

    def forward(self, s0, s1, drop_prob):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for k in range(0, len(self.ops), 2):
            node = 0
            for op, j in ((self.ops[k], self.indices[k]), (self.ops[k + 1], self.indices[k + 1])):
                h = op(states[j])
                if self.training and drop_prob > 0 and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop_prob)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)  # (B, multiplier*C, H, W)


class AuxiliaryHeadCIFAR(nn.Module):
    """Reads the 8x8 output of the second reduction cell (card §0.6). Inputs smaller than the
    5x5 pool (8x8 digits gives 2x2) are pooled adaptively to the same 2x2 instead."""

    def __init__(self, C, num_classes):
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = F.relu(x)
        x = self.pool(x) if x.shape[-1] >= 5 else F.adaptive_avg_pool2d(x, 2)  # (B, C, 2, 2)
        return self.classifier(self.features(x).flatten(1))


class NetworkCIFAR(nn.Module):
    """Stem conv 3 -> 3C, `layers` cells (reduction at 1/3 and 2/3), global pool, linear.
    forward returns (logits, aux_logits); aux_logits is None unless training with the tower."""

    def __init__(self, C, num_classes, layers, auxiliary, genotype, stem_multiplier=3):
        super().__init__()
        self.drop_path_prob = 0.0
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        self.aux_index = 2 * layers // 3
        reduction_prev = False
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            C_curr = C_curr * 2 if reduction else C_curr
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self.aux_index:
                C_aux = C_prev
        self.auxiliary_head = AuxiliaryHeadCIFAR(C_aux, num_classes) if auxiliary else None
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x):
        logits_aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1)), logits_aux


def count_parameters(model, exclude="auxiliary"):
    """Parameters in millions, the auxiliary head excluded (official count_parameters_in_MB)."""
    return sum(p.numel() for n, p in model.named_parameters() if exclude not in n) / 1e6


class AuxiliaryHeadImageNet(nn.Module):
    """The ImageNet tower (official model.py AuxiliaryHeadImageNet). It reads the output of the
    second reduction cell, which is 7x7 at 224 px (the official docstring says 14x14, but the
    tower sits after cell 2*layers//3, the second reduction); avg pool 5 stride 2 gives 2x2 there.
    quark0/darts and PC-DARTS drop the BatchNorm after the 768-channel conv ("omitted ... due to a
    typo", kept for the paper's numbers); chenxin061/pdarts model.py keeps it: batchnorm=True.
    Other input sizes (small test images) are pooled adaptively to the same 2x2."""

    def __init__(self, C, num_classes, batchnorm=False):
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False)
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), *([nn.BatchNorm2d(768)] if batchnorm else []), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = F.relu(x)
        x = F.adaptive_avg_pool2d(self.pool(x) if x.shape[-1] >= 5 else x, 2)  # (B, C, 2, 2); a no-op at 224 px
        return self.classifier(self.features(x).flatten(1))  # (B, 768) -> (B, num_classes)


class NetworkImageNet(nn.Module):
    """The mobile-setting network of official model.py NetworkImageNet (train_imagenet.py: 14 cells,
    C=48): stem0 = conv3x3 s2 (3 -> C/2), BN, ReLU, conv3x3 s2 (-> C), BN; stem1 = ReLU, conv3x3 s2,
    BN (224 -> 112 -> 56 -> 28 px); the first cell reads (stem0, stem1) with reduction_prev=True,
    so its c_{k-2} input is halved by FactorizedReduce; reduction cells at 1/3 and 2/3 (28 -> 14
    -> 7 px); global average pool, linear. forward returns (logits, aux_logits) as NetworkCIFAR.
    The official global pool is AvgPool2d(7), i.e. the global mean at 224 px; the adaptive pool
    here is the same there and also runs at other sizes."""

    def __init__(self, C, num_classes, layers, auxiliary, genotype, aux_batchnorm=False):
        super().__init__()
        self.drop_path_prob = 0.0
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2), nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
        C_prev_prev, C_prev, C_curr = C, C, C
        self.cells = nn.ModuleList()
        self.aux_index = 2 * layers // 3
        reduction_prev = True  # stem0 (56 px) is twice the size of stem1 (28 px)
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            C_curr = C_curr * 2 if reduction else C_curr
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self.aux_index:
                C_aux = C_prev
        self.auxiliary_head = AuxiliaryHeadImageNet(C_aux, num_classes, aux_batchnorm) if auxiliary else None
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x):
        logits_aux = None
        s0 = self.stem0(x)  # (B, C, H/4, W/4)
        s1 = self.stem1(s0)  # (B, C, H/8, W/8)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1)), logits_aux


def make_network(dataset, C, num_classes, layers, auxiliary, genotype):
    """The retraining network for a dataset: NetworkImageNet for --dataset imagenet (official
    train_imagenet.py), NetworkCIFAR (stride-1 stem) for the others."""
    net = NetworkImageNet if dataset == "imagenet" else NetworkCIFAR
    return net(C, num_classes, layers, auxiliary, genotype)


@torch.no_grad()
def count_macs(model, image_size):
    """Multiply-accumulates (millions) of one eval-mode forward of a (1, 3, image_size, image_size)
    image, auxiliary tower off: the papers' "multiply-adds". torch.utils.flop_counter.FlopCounterMode
    counts 2 FLOPs per MAC of every conv / matmul and nothing for BN, ReLU, pooling or node sums, so
    MACs = FLOPs / 2 = conv + linear MACs, the convention of GDAS's own counter (AutoDL
    flop_benchmark.py); the other papers' figures are 2.6-19 % higher (tests/test_imagenet.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(iter(model.parameters()), None)
    was_training, device = model.training, param.device if param is not None else "cpu"
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e6


# =====================================================================================
# Train / eval loops
# =====================================================================================
def accuracy(logits, y):
    return (logits.argmax(1) == y).float().mean().item() * 100.0


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model, data, device, amp=False, max_steps=0):
    """Mean loss and top-1 accuracy (%) over a loader; models may return (logits, aux)."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for step, (x, y) in enumerate(data):
        if max_steps and step >= max_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(x)
        logits = (out[0] if isinstance(out, tuple) else out).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += y.numel()
    return loss_sum / max(n, 1), 100.0 * correct / max(n, 1)


def train_epoch(model, data, optimizer, device, args, log, epoch):
    """One retraining epoch: CE (+ auxiliary_weight * CE of the tower), grad-norm clip."""
    model.train()
    loss_sum, acc_sum, n, t0 = 0.0, 0.0, 0, time.time()
    steps = min(len(data), args.steps_per_epoch or len(data))
    for step, (x, y) in enumerate(data):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, args.amp):
            logits, logits_aux = model(x)
            loss = F.cross_entropy(logits.float(), y)
            if logits_aux is not None:
                loss = loss + args.auxiliary_weight * F.cross_entropy(logits_aux.float(), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.retrain_grad_clip)
        optimizer.step()
        loss_sum, acc_sum, n = loss_sum + loss.item(), acc_sum + accuracy(logits, y), n + 1
        if (step + 1) % args.report_freq == 0 or step + 1 == steps:
            log.info("retrain epoch %d step %d/%d loss %.4f acc %.2f (%.3f s/step)", epoch, step + 1, steps,
                     loss_sum / n, acc_sum / n, (time.time() - t0) / n)
    return loss_sum / max(n, 1), acc_sum / max(n, 1)


def retrain(genotype, args, device, run_dir, log, method):
    """Train `genotype` from scratch with the DARTS protocol and report test accuracy. Writes
    retrain_history.jsonl and checkpoint_retrain.pt every epoch (resumed by --resume) and
    retrain_curves.png. Under torchrun: DistributedDataParallel, --retrain-batch-size is the
    global batch split over the processes, every rank evaluates, rank 0 writes."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    if args.retrain_batch_size % world:
        raise UsageError(f"--retrain-batch-size {args.retrain_batch_size} does not split over {world} processes")
    generator = torch.Generator().manual_seed(args.seed)
    test_set, num_classes, size = load_dataset(args.dataset, args.data, False, args.image_size)
    cutout = args.cutout_length * size // 32 if args.cutout else 0  # 16 px at 32 px, scaled for other sizes
    train_set, _, _ = load_dataset(args.dataset, args.data, True, args.image_size, cutout)
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, seed=args.seed) if world > 1 else None
    train_data = loader(train_set, args.retrain_batch_size // world, True, generator, args.workers, sampler=sampler)
    test_data = loader(test_set, args.retrain_batch_size, False, generator, args.workers)
    net = NetworkCIFAR(args.retrain_init_channels, num_classes, args.retrain_layers, args.auxiliary,
                       genotype).to(device)
    params = count_parameters(net)
    log.info("retrain %s: %.3f M parameters (auxiliary head excluded)", genotype, params)
    optimizer = torch.optim.SGD(net.parameters(), args.retrain_lr, momentum=args.retrain_momentum,
                                weight_decay=args.retrain_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.retrain_epochs, eta_min=0.0)
    start = resume_from(run_dir / "checkpoint_retrain.pt", method, generator, model=net, optimizer=optimizer,
                        scheduler=scheduler) if args.resume else 0
    history = keep_jsonl(run_dir / "retrain_history.jsonl", start) if args.resume and rank == 0 else []
    if start:
        log.info("resumed retraining after epoch %d", start - 1)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net  # syncs weights from rank 0
    for epoch in range(start, args.retrain_epochs):
        t0 = time.time()
        if sampler is not None:
            sampler.set_epoch(epoch)
        # drop-path probability ramps linearly from 0 (official train.py)
        net.drop_path_prob = args.drop_path_prob * epoch / args.retrain_epochs
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_epoch(model, train_data, optimizer, device, args, log, epoch)
        test_loss, test_acc = evaluate(net, test_data, device, args.amp)
        scheduler.step()
        if rank != 0:
            continue
        row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
               "test_loss": test_loss, "test_acc": test_acc, "seconds": time.time() - t0}
        history.append(row)
        append_jsonl(run_dir / "retrain_history.jsonl", row)
        log.info("retrain epoch %d lr %.5f train_acc %.2f test_acc %.2f (best %.2f) %.1fs", epoch, lr, train_acc,
                 test_acc, max(r["test_acc"] for r in history), row["seconds"])
        save_checkpoint(run_dir / "checkpoint_retrain.pt", {
            **make_checkpoint(method, epoch, args, generator, model=net, optimizer=optimizer, scheduler=scheduler),
            "genotype": genotype_to_dict(genotype)})
    if world > 1:  # the test of the distributed path compares these lines across ranks
        print(f"rank {rank}: final weights checksum {sum(p.double().sum().item() for p in net.parameters()):.12e}",
              flush=True)
    if rank != 0:
        return None
    plot_curves(history, ["train_acc", "test_acc"], run_dir / "retrain_curves.png", "retraining")
    return {"genotype": genotype_to_dict(genotype), "params_M": params,
            "test_acc": history[-1]["test_acc"] if history else None,
            "best_test_acc": max((r["test_acc"] for r in history), default=None),
            "retrain_epochs": args.retrain_epochs, "processes": world}


# =====================================================================================
# Diagnostics
# =====================================================================================
def dominant_eigenvalue(loss, params, iters=20, tol=1e-4, seed=0):
    """Power iteration with Hessian-vector products (double backward): the eigenvalue of largest
    magnitude of d2 loss / d params2, the RobustDARTS collapse signal (Zela et al., ICLR 2020,
    arXiv:1909.09656) when params are the alphas. Its own generator leaves the run's RNG alone."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
    lam = None
    for _ in range(iters):
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)  # H v
        new = sum((h * x).sum() for h, x in zip(hv, v)).item()  # Rayleigh quotient v' H v
        if lam is not None and abs(new - lam) <= tol * abs(new):
            return new
        lam, v = new, [h.detach() for h in hv]
    return lam


# =====================================================================================
# Figures (matplotlib, no display needed)
# =====================================================================================
def pyplot():
    """matplotlib.pyplot, on the file-only Agg backend unless pyplot is already in use (a notebook)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # a script: draw to files; a notebook keeps its inline backend
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_alphas(weights, path, primitives=PRIMITIVES, title="softmax(alpha)"):
    """Heatmap per cell type: weights = {"normal": (E, n_ops), "reduce": (E, n_ops)}."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(weights), figsize=(5.5 * len(weights), 6), squeeze=False)
    for ax, (cell, w) in zip(axes[0], weights.items()):
        w = np.asarray(w)
        lo, hi = w.min(), max(w.max(), w.min() + 1e-6)  # relative scale: early alphas are near uniform
        im = ax.imshow(w, cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(len(primitives)), primitives, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(w)), [f"{i}->{n}" for n, i in edge_names(len(w))], fontsize=7)
        ax.set_title(f"{cell} cell: {title}")
        for (r, c), v in np.ndenumerate(w):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if v > (lo + hi) / 2 else "white")
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def edge_names(n_edges):
    """(target node, source state) for the edges of a DARTS cell in edge order: node 2 reads
    states 0-1 (edges 0-1), node 3 reads 0-2 (edges 2-4), ... with states 0, 1 the inputs."""
    names, node = [], 2
    while len(names) < n_edges:
        names += [(node, i) for i in range(node)]
        node += 1
    return names[:n_edges]


def plot_alpha_evolution(history, path, primitives=PRIMITIVES):
    """Mean over edges of each op's softmax weight, per epoch. history: list of
    {"normal": (E, n_ops), "reduce": (E, n_ops)}, one per epoch."""
    plt = pyplot()
    cells = list(history[0])
    fig, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        w = np.asarray([h[cell] for h in history])  # (epochs, E, n_ops)
        for k, name in enumerate(primitives):
            ax.plot(range(1, len(w) + 1), w[:, :, k].mean(1), label=name, marker="." if len(w) < 30 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean softmax weight over edges")
        ax.set_title(f"{cell} cell")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_curves(history, keys, path, title, ylabel="accuracy (%)"):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        ax.plot([r["epoch"] + 1 for r in history], [r[key] for r in history], label=key, marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_genotype(genotype, path):
    """Draw the normal and reduction cells as DAGs: inputs c_{k-2}, c_{k-1} on the left,
    intermediate nodes in the middle, c_k (concat) on the right, op names on the edges. Nodes
    carry the state indices the genotype's (op, input) pairs use: 0, 1 inputs, 2.. nodes."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, cell in zip(axes, ("normal", "reduce")):
        edges, concat = getattr(genotype, cell), getattr(genotype, cell + "_concat")
        n_nodes = len(edges) // 2
        pos = {0: (0.0, 0.75), 1: (0.0, 0.25), "out": (1.0, 0.5)}
        for k in range(n_nodes):
            pos[k + 2] = (0.3 + 0.45 * (k % 2), 0.9 - 0.8 * k / max(n_nodes - 1, 1))
        names = {0: "0: c_{k-2}", 1: "1: c_{k-1}", "out": "c_{k} = concat" + str(list(concat))}
        for k, (op, j) in enumerate(edges):
            _arrow(ax, pos[j], pos[k // 2 + 2], op, "tab:blue" if "conv" in op else "tab:orange")
        for c in concat:
            _arrow(ax, pos[c], pos["out"], "", "0.6")
        for node, (x, y) in pos.items():
            ax.text(x, y, names.get(node, str(node)), ha="center", va="center", fontsize=10,
                    bbox=dict(boxstyle="round", fc="lightyellow" if node in names else "lightblue", ec="k"))
        ax.set_xlim(-0.1, 1.1)
        ax.set_ylim(0.0, 1.0)
        ax.axis("off")
        ax.set_title(f"{cell} cell")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _arrow(ax, a, b, label, color):
    ax.annotate("", xy=b, xytext=a, arrowprops=dict(arrowstyle="->", color=color, lw=1.3,
                                                    shrinkA=14, shrinkB=14, connectionstyle="arc3,rad=0.12"))
    if label:
        ax.text(0.55 * a[0] + 0.45 * b[0], 0.55 * a[1] + 0.45 * b[1], label, fontsize=7, color=color,
                ha="center", va="center", bbox=dict(fc="white", ec="none", alpha=0.7, pad=0.5))
