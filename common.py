"""What every weight-sharing NAS paper in this repo uses unchanged.

Read a method file (``darts.py``, ...) next to this one. Sections, in order:

  CLI           ``arg``, ``BaseArgs`` (run + retrain flags), ``parse_args``, ``UsageError``
  run folder    seeding, device, logging, atomic checkpoints, JSON helpers
  data          CIFAR-10/100 (torchvision), ImageNet and ImageFolder, ``digits`` (offline, real), ``fake``
  search space  ``PRIMITIVES``, ``OPS`` and the cell pieces of quark0/darts ``operations.py``
  genotypes     ``Genotype``, ``GENOTYPES`` (published cells), ``parse_genotype``
  retraining    ``NetworkCIFAR``, ``NetworkImageNet`` (quark0/darts ``model.py``), ``count_macs``,
                ``train_epoch``, ``evaluate``, ``retrain``
  pipeline      ``prepare`` and ``run``: what every method file's main() does around its search
  figures       alpha heatmaps, alpha evolution, training curves, cell drawings

"Official" means quark0/darts @ f276dd3 (cnn/). Deviations shared by every method file (each file's
own list adds to these):
    C1. ours: retraining steps the cosine lr schedule at the end of each epoch; cnn/train.py line 98
        steps it first, so its epoch 0 trains at eta(1) rather than the initial lr.
    C2. ours: a training loader drops its last batch when that batch holds a single image (BatchNorm
        cannot train on one image; the auxiliary head has 1x1 maps); the official loaders keep it.
    C3. ours: odd feature-map sizes work: FactorizedReduce pads its shifted half by one pixel (the
        official op needs even sizes), and the CIFAR auxiliary head pools adaptively to 2x2 unless its
        input is 8-10 px (image sizes 29-40), where the official 5x5/stride-3 pool already gives 2x2.
    C4. ours: the result of a retraining is the last epoch's test accuracy; the official train.py logs
        every epoch's and the papers do not say which they report. No epoch is chosen on the test set.
    C5. ours: --grad-clip 0 / --retrain-grad-clip 0 mean no clipping (clip_grad_norm_ with 0 would zero
        every gradient).
"""

import argparse
import ast
import dataclasses
import difflib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
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
# CLI: a dataclass of flags, parsed with argparse, each flag's range checked before any work
# =====================================================================================
class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def arg(default, help, group=None, check=None, aliases=()):
    """A dataclass field with its --help text, an optional --help section, a check of its value and
    other spellings of the flag. check: a tuple of the allowed strings, or a range such as ">0",
    ">=1", "[0,1)", "(0,1)", or several joined by " or " ("0 or >=8")."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "check": check,
                                                        "aliases": tuple(aliases)})


def in_range(value, check):
    """Does the number `value` satisfy a range string of arg(check=...)?"""
    for part in (p.replace(" ", "") for p in check.split(" or ")):
        if part[0] in "[(":
            lo, hi = (float(b) for b in part[1:-1].split(","))
            if (value >= lo if part[0] == "[" else value > lo) and (value <= hi if part[-1] == "]" else value < hi):
                return True
        elif part.startswith(">="):
            if value >= float(part[2:]):
                return True
        elif part.startswith(">"):
            if value > float(part[1:]):
                return True
        elif value == float(part):
            return True
    return False


DATASETS = ("cifar10", "cifar100", "imagenet", "imagefolder", "digits", "fake")


def flag(name):
    return "--" + name.replace("_", "-")


@dataclasses.dataclass
class BaseArgs:
    # --- run: identical in every method file ---
    exp_name: str = arg("nas", "name of the method; prefix of the run folder", "run")
    seed: int = arg(2, "random seed (official train_search.py --seed 2)", "run", "[0,4294967295]")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N (auto = CUDA when present)", "run")
    torch_deterministic: bool = arg(True, "cudnn.deterministic (and benchmark off)", "run")
    amp: bool = arg(False, "bfloat16 autocast for weight steps and retraining (CUDA only)", "run")
    channels_last: bool = arg(False, "channels-last memory format for the supernet and the retrained network "
                              "(a GPU speed switch; bench.py measures it)", "run")
    compile: bool = arg(False, "torch.compile the forward of the supernet and the retrained network "
                        "(nn.Module.compile; the first steps compile, later ones are faster)", "run")
    compile_backend: str = arg("inductor", "torch.compile backend of --compile (inductor: generated kernels; "
                               "aot_eager / eager: no code generation, for quick checks)", "run",
                               ("inductor", "aot_eager", "eager"))
    dataset: str = arg("cifar10", " | ".join(DATASETS) + " (imagenet: torchvision's train/ and val/ folders, "
                       "retrained in the mobile setting with train_imagenet.py's recipe)", "run", DATASETS)
    data: str = arg("./data", "dataset root (imagefolder: a folder with train/ and val/)", "run")
    image_size: int = arg(0, "input size, at least 8; 0 = the dataset's own (32 CIFAR, 8 digits)", "run",
                          "0 or >=8")
    workers: int = arg(2, "DataLoader workers (official: 2)", "run", ">=0")
    out_dir: str = arg("runs", "where run folders are created", "run")
    run_name: str = arg("", "run folder name; default {exp_name}-{dataset}-s{seed}-{time}", "run")
    steps_per_epoch: int = arg(0, "stop each search and retraining epoch after this many steps (quick tests); "
                               "0 = full epoch", "run", ">=0")
    report_freq: int = arg(50, "log progress every this many steps (official: 50)", "run", ">=1")
    genotype: str = arg("", "skip search, retrain this cell: a name (DARTS_V2), a Genotype(...) "
                        "literal or a genotype.json", "run")
    no_retrain: bool = arg(False, "stop after search (write genotype, no retraining)", "run")
    resume: str = arg("", "continue a killed run from the last checkpoint in this run folder, with the "
                      "flags in its args.json (only --device and --workers may be given again)", "run")
    # --- retrain: DARTS protocol, cnn/train.py with --auxiliary --cutout ---
    retrain_epochs: int = arg(600, "train.py --epochs 600 (--no-retrain skips retraining)", "retrain", ">=1")
    retrain_batch_size: int = arg(96, "train.py --batch_size 96", "retrain", ">=2")
    retrain_lr: float = arg(0.025, "train.py --learning_rate 0.025", "retrain", ">0")
    retrain_schedule: str = arg("cosine", "lr per epoch: cosine to 0 (train.py) | step: x --retrain-gamma every epoch "
                                "(train_imagenet.py StepLR) | linear to 0, slower in the last 5 epochs (PC-DARTS "
                                "and P-DARTS train_imagenet.py adjust_lr)", "retrain", ("cosine", "step", "linear"))
    retrain_gamma: float = arg(0.97, "lr factor per epoch of --retrain-schedule step (train_imagenet.py --gamma)",
                               "retrain", "(0,1]")
    retrain_warmup_epochs: int = arg(0, "the first N epochs run at lr * (epoch + 1) / N instead (PC-DARTS "
                                     "train_imagenet.py lines 156-159, batch > 256)", "retrain", ">=0")
    label_smoothing: float = arg(0.0, "label smoothing of the training loss, auxiliary loss included "
                                 "(train_imagenet.py --label_smooth)", "retrain", "[0,1)")
    retrain_momentum: float = arg(0.9, "train.py --momentum 0.9", "retrain", "[0,1)")
    retrain_nesterov: bool = arg(False, "Nesterov momentum (train.py: off; the NAS-Bench-201 recipe: on)", "retrain")
    retrain_weight_decay: float = arg(3e-4, "train.py --weight_decay 3e-4", "retrain", ">=0")
    retrain_init_channels: int = arg(36, "train.py --init_channels 36 (NAS-Bench-201: C)", "retrain", ">=1")
    retrain_layers: int = arg(20, "train.py --layers 20 (at least 3: reduction cells sit at 1/3 and 2/3, so "
                              "fewer cells have no normal cell; NAS-Bench-201: N, cells per stage)", "retrain", ">=3")
    auxiliary: bool = arg(True, "auxiliary tower (paper: on; official flag default off)", "retrain")
    auxiliary_weight: float = arg(0.4, "train.py --auxiliary_weight 0.4", "retrain", ">=0")
    aux_batchnorm: bool = arg(False, "ImageNet auxiliary head: BatchNorm after its 768-channel conv (the P-DARTS, "
                              "SNAS and AutoDL heads; quark0/darts model.py has none)", "retrain")
    cutout: bool = arg(True, "cutout (paper: on; official flag default off)", "retrain")
    cutout_length: int = arg(16, "train.py --cutout_length 16 (at 32 px; scaled to the image size)", "retrain",
                             ">=1")
    drop_path_prob: float = arg(0.2, "train.py --drop_path_prob 0.2 (linear ramp from 0)", "retrain", "[0,1)")
    retrain_grad_clip: float = arg(5.0, "train.py --grad_clip 5; 0 = no clipping", "retrain", ">=0")
    retrain_val_portion: float = arg(0.0, "ours: hold out this part of the training set and report accuracy on "
                                     "it instead of the test set (model selection, reproduce.py); 0 = train on "
                                     "all of it and test, as train.py", "retrain", "[0,1)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (unknown flag, bad number) as one line too
        raise UsageError(message)


def _parser(args_cls, suppress=False):
    doc = (sys.modules[args_cls.__module__].__doc__ or "").strip()
    parser = _Parser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                     argument_default=argparse.SUPPRESS if suppress else None)
    groups = {}
    for f in dataclasses.fields(args_cls):
        group = f.metadata.get("group") or "search (paper defaults)"
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        names = [flag(f.name), *f.metadata.get("aliases", ())]
        default = argparse.SUPPRESS if suppress else f.default
        help = f.metadata["help"] + "".join(f" [{when}: {recipe[f.name]}]" for when, recipe in recipes(args_cls).items()
                                            if f.name in recipe)
        kind = type(f.default)
        if kind is bool:  # --flag for off-by-default switches, --flag / --no-flag for on-by-default
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            groups[group].add_argument(*names, dest=f.name, action=action, default=default, help=help)
        else:
            groups[group].add_argument(*names, dest=f.name, type=kind, default=default, help=help)
    return parser


def parse_args(args_cls, argv=None):
    """Build an argparse parser from the dataclass: --foo-bar for field foo_bar (plus its aliases),
    sections in --help by group ("run", "retrain", else the method's). The result's `typed`
    attribute (not a field) holds the names of the flags given on the command line."""
    args = args_cls(**vars(_parser(args_cls).parse_args(argv)))
    args.typed = set(vars(_parser(args_cls, suppress=True).parse_args(argv)))
    return args


def recipes(args_cls):
    """The defaults that another setting brings ({"--dataset imagenet": {field: value}, ...}): a method
    file's Args may define IMAGENET (its official ImageNet retraining, overriding IMAGENET_RETRAIN_ARGS,
    which is DARTS's) and NB201 (its NAS-Bench-201 search protocol) as class attributes; NB201_RETRAIN_ARGS
    holds the benchmark's retraining recipe for every method with a `space` flag."""
    out = {}
    out["--dataset imagenet"] = {**IMAGENET_RETRAIN_ARGS, **getattr(args_cls, "IMAGENET", {})}
    if any(f.name == "space" for f in dataclasses.fields(args_cls)):
        out["--space nb201"] = {**NB201_RETRAIN_ARGS, **getattr(args_cls, "NB201", {})}
    return out


def apply_recipes(args):
    """Give every field of the recipes that apply (recipes()) its recipe value, unless its flag was typed."""
    typed = getattr(args, "typed", None)
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    active = {"--dataset imagenet": args.dataset == "imagenet", "--space nb201": getattr(args, "space", "darts") == "nb201"}
    for when, recipe in recipes(type(args)).items():
        for name, value in recipe.items() if active[when] else ():
            if (name not in typed) if typed is not None else getattr(args, name) == defaults[name]:
                setattr(args, name, value)


# quark0/darts cnn/train_imagenet.py: the mobile setting (14 cells, C=48) and its recipe, lines 24-42; its
# --auxiliary flag is off by default but the README command passes it; drop path 0 (line 35); no cutout.
IMAGENET_RETRAIN_ARGS = {"retrain_epochs": 250, "retrain_batch_size": 128, "retrain_lr": 0.1, "retrain_momentum": 0.9,
                         "retrain_weight_decay": 3e-5, "retrain_schedule": "step", "retrain_gamma": 0.97,
                         "label_smoothing": 0.1, "auxiliary": True, "auxiliary_weight": 0.4, "drop_path_prob": 0.0,
                         "retrain_grad_clip": 5.0, "retrain_init_channels": 48, "retrain_layers": 14, "cutout": False}


def check_args(args):
    """Every field's arg(check=...), plus what holds for all methods; one line on the first problem."""
    for f in dataclasses.fields(args):
        check, value = f.metadata.get("check"), getattr(args, f.name)
        if isinstance(check, str) and not in_range(value, check):
            raise UsageError(f"{flag(f.name)} must be {check.replace(',', ', ')}, got {value}")
        if isinstance(check, tuple) and value not in check:
            hint = difflib.get_close_matches(str(value), check, n=1)
            raise UsageError(f"unknown {flag(f.name)} {value!r}; choose one of {', '.join(check)}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if getattr(args, "nb201_benchmark", ""):
        if getattr(args, "space", "darts") != "nb201":
            raise UsageError("--nb201-benchmark looks up NAS-Bench-201 cells: it needs --space nb201")
        nb201_api(args.nb201_benchmark)  # a missing file or API package is a one-line error, before any work
    if getattr(args, "lr_min", 0) > getattr(args, "lr", float("inf")):
        raise UsageError(f"--lr-min {args.lr_min} is above --lr {args.lr}: the cosine schedule would rise")
    check_out_dir(args)


def check_out_dir(args):
    """--out-dir must be a folder we can write in (or one we can make); nothing is created here."""
    if args.resume:
        return
    path = Path(args.out_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out-dir {path} is a file, not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out-dir {path} cannot be made: {parent} is a file")
    try:  # os.access says yes to root even on a read-only file system: try it
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UsageError(f"--out-dir {path} cannot be written ({parent}: {e.strerror})") from None


def prepare(args, script):
    """First lines of every main(): the device, --resume's saved flags, and every flag's check. Fast:
    no data or model is touched yet."""
    device = get_device(args.device)
    if args.resume:
        args = resume_args(args, script)  # the run's own flags (recipes already applied); checks its files
    else:
        apply_recipes(args)
    check_args(args)
    if args.amp and device.type != "cuda":
        raise UsageError("--amp needs a CUDA device (bfloat16 autocast); drop --amp on CPU")
    return args, device


ACTIVE_RUN = {}  # the run folder, logger and script of the run in progress (for cli's last words)


def cli(main, args_cls, argv=None):
    """Entry point of every method file: parse flags, run; a UsageError becomes one line and exit 2.
    After the run folder exists, the message (and any traceback) also goes to log.txt, with the
    --resume command that continues the run."""
    ACTIVE_RUN.clear()
    try:
        return main(parse_args(args_cls, argv))
    except UsageError as e:
        text = str(e).strip()
        if text.startswith("Caught "):  # raised in a DataLoader worker: torch wraps it with a traceback
            text = text.splitlines()[-1].split("UsageError: ", 1)[-1]
        _last_words(f"error: {text}", 2)
    except KeyboardInterrupt:
        _last_words("interrupted", 130)
    except Exception:
        if ACTIVE_RUN:
            ACTIVE_RUN["log"].exception("unexpected error; %s", _resume_hint())
        raise


def _resume_hint():
    run_dir = ACTIVE_RUN["run_dir"]
    done = {name: len(Path(run_dir, f"{name}_history.jsonl").read_text().splitlines())
            if Path(run_dir, f"{name}_history.jsonl").exists() else 0 for name in ("search", "retrain")}
    kept = (f"{done['search']} search and {done['retrain']} retraining epochs are checkpointed"
            if any(done.values()) else "no epoch had finished, so it starts again from the beginning")
    return f"run folder {run_dir} kept ({kept}); continue with: python {ACTIVE_RUN['script']} --resume {run_dir}"


def _last_words(text, code):
    if ACTIVE_RUN:
        text = f"{text}; {_resume_hint()}"
        ACTIVE_RUN["log"].error(text)  # log.txt (and stdout)
    print(text, file=sys.stderr)
    sys.exit(code)


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
    typed = getattr(args, "typed", None)  # flags typed on the command line (parse_args); else not default
    if typed is None:
        typed = {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != f.default}
    given = sorted(typed - {"resume", "device", "workers"})
    if given:
        raise UsageError(f"--resume uses the run's own flags; drop {flag(given[0])}")
    for path in sorted(run_dir.glob("checkpoint_*.pt")):
        load_checkpoint(path, method)
    try:
        saved = json.loads((run_dir / "args.json").read_text())
        renamed = {a.lstrip("-").replace("-", "_"): f.name for f in dataclasses.fields(args)
                   for a in f.metadata.get("aliases", ())}  # runs made before a flag got its new name
        saved = {renamed.get(k, k): v for k, v in saved.items()}
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
    log.handlers.clear()  # a second run in one process (tests) must not log twice
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "log.txt")):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    ACTIVE_RUN.update(run_dir=run_dir, log=log, script=Path(script).name)
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
    every step as quark0/darts's next(iter(valid_queue)) is (train_search.py line 143)."""
    while True:
        yield from loader


# =====================================================================================
# Data
# =====================================================================================
CIFAR_STATS = {  # cifar10: quark0/darts utils.py lines 63-64; cifar100: chenxin061/pdarts utils.py
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
    return Transformed(ds, Cutout(cutout)) if cutout > 0 else ds


def _imagenet(root, train, image_size, augment):
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
    if augment:
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                 T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)]
    else:
        steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    tf = T.Compose(steps + [T.ToTensor(), T.Normalize(*IMAGENET_STATS)])
    try:
        ds = torchvision.datasets.ImageFolder(str(sub), transform=tf, loader=read_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"--dataset imagenet: {sub} holds no images ({e})") from None
    return ds, len(ds.classes), size


def read_image(path):
    """ImageFolder's loader, naming the file it cannot read (a corrupt or truncated image)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise UsageError(f"cannot read image {path} ({type(e).__name__}: {e}); fix or remove it") from None


def load_dataset(name, root, train, image_size=0, cutout=0, augment=None):
    """Returns (dataset, num_classes, image_size). train=True gives the training split, by default
    with the DARTS augmentation (random crop 32 pad 4, flip; cutout only when asked, i.e.
    retraining); augment=False gives the training images as the test set is seen."""
    augment = train if augment is None else augment
    cutout = cutout if augment else 0
    if name in ("cifar10", "cifar100"):
        size = image_size or 32
        tf = _image_transforms(augment, size, *CIFAR_STATS[name], cutout, resize=False)
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            ds = cls(root, train=train, download=True, transform=tf)
        except Exception as e:  # no internet, disk full, corrupt archive
            raise UsageError(f"could not load {name} under {root!r} ({type(e).__name__}: {e}); "
                             "download it there or try --dataset digits") from None
        return ds, len(ds.classes), size
    if name == "imagenet":  # official ImageNet augmentation; cutout is not part of it
        return _imagenet(root, train, image_size, augment)
    if name == "imagefolder":
        sub = Path(root) / ("train" if train else "val")
        if not sub.is_dir() and not train and (Path(root) / "test").is_dir():
            sub = Path(root) / "test"
        if not sub.is_dir():
            raise UsageError(f"--dataset imagefolder needs {sub}/ with one sub-folder per class")
        size = image_size or 32
        tf = _image_transforms(augment, size, *IMAGENET_STATS, cutout, resize=True)
        try:
            ds = torchvision.datasets.ImageFolder(str(sub), transform=tf, loader=read_image)
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f"--dataset imagefolder: {sub} holds no images ({e})") from None
        return ds, len(ds.classes), size
    if name == "digits":
        size = image_size or 8
        return _digits(train, size, cutout), 10, size
    if name == "fake":  # random images and labels: shapes only
        size = image_size or 32
        tf = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)] + [Cutout(cutout)] * (cutout > 0))
        ds = torchvision.datasets.FakeData(1024 if train else 256, (3, size, size), 10, tf,
                                           random_offset=0 if train else 10**6)
        return ds, 10, size
    raise UsageError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")


def check_data(args):
    """Load both splits before any run folder exists: missing or empty folders, failed downloads, and
    an ImageFolder whose val/ classes are not train/'s (the class count would come from the wrong one)."""
    train, n_train, _ = load_dataset(args.dataset, args.data, True, args.image_size)
    test, n_test, _ = load_dataset(args.dataset, args.data, False, args.image_size)
    classes = [getattr(d, "classes", None) for d in (train, test)]
    if classes[0] != classes[1]:
        only = sorted(set(classes[0]) ^ set(classes[1])) or ["(same names, other order)"]
        raise UsageError(f"--dataset {args.dataset}: the train and test/val splits have different classes "
                         f"({n_train} vs {n_test}; differing: {', '.join(map(str, only[:5]))})")
    if n_train < 2:
        raise UsageError(f"--dataset {args.dataset} under {args.data} has {n_train} class: classification "
                         "needs at least 2 (accuracy would be 100 % by construction)")


def loader(ds, batch_size, shuffle, generator, workers, indices=None, sampler=None):
    """shuffle=True marks a training loader: a last batch of one image is dropped (BatchNorm cannot
    train on it); every other batch is kept, as the official loaders do."""
    if indices is not None:
        sampler = SubsetRandomSampler(indices, generator=generator)
    n = len(sampler) if sampler is not None else len(ds)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      drop_last=shuffle and n % batch_size == 1)  # no persistent workers: each epoch re-seeds them


def search_loaders(ds, batch_size, train_portion, generator, workers):
    """The official search split (train_search.py lines 91-100): the training set cut by index, the first
    train_portion for weights ("train"), the rest for alpha ("val"); both augmented."""
    split = int(np.floor(train_portion * len(ds)))
    if split < 1 or split >= len(ds):
        raise UsageError(f"--train-portion {train_portion} leaves an empty half of {len(ds)} images")
    return (loader(ds, batch_size, True, generator, workers, list(range(split))),
            loader(ds, batch_size, True, generator, workers, list(range(split, len(ds)))))


# =====================================================================================
# Search space: the DARTS candidate operations (official operations.py and genotypes.py PRIMITIVES)
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
        shifted = x[:, :, 1:, 1:]
        if x.shape[-1] % 2 or x.shape[-2] % 2:  # ours: odd sizes (the official code needs even ones)
            shifted = F.pad(shifted, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))  # both halves ceil(H/2)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))  # (B, C_out, ceil(H/2), ceil(W/2))


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

GENOTYPES = {  # verbatim from the official repos' genotypes.py (quark0/darts cnn/genotypes.py unless noted)
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
GENOTYPES.update({  # SNAS-Series/SNAS-Series SNAS/genotypes.py, top-2 format
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
    # ianwhale/nsga-net models/micro_genotypes.py (the paper's figure of the micro cells; skip_connect = identity)
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


def is_edge_all(edges, steps=4):
    """SNAS's "edge_all" cell: every node keeps all its incoming edges (node k reads states 0..k-1,
    2 + 3 + 4 + 5 = 14 edges), not two. Its 14 (op, input) pairs would read as 7 two-input nodes."""
    sizes = [2 + i for i in range(steps)]
    if len(edges) != sum(sizes):
        return False
    starts = np.cumsum([0] + sizes[:-1])
    return all(sorted(j for _, j in edges[a:a + n]) == list(range(n)) for a, n in zip(starts, sizes))


def validate_genotype(g, what="genotype"):
    """Check op names, input indices and concat; raise UsageError naming the first problem."""
    for cell, concat in (("normal", g.normal_concat), ("reduce", g.reduce_concat)):
        edges = getattr(g, cell)
        if isinstance(edges, (list, tuple)) and is_edge_all([tuple(e) for e in edges]):
            raise UsageError(f"{what}: the {cell} cell is in SNAS's edge_all form (14 edges, node k reads every "
                             "earlier state), not two (op, input) pairs per node; retrain it with snas.py, "
                             "which converts it")
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


def parse_genotype(text, more_names=()):
    """A published name (see GENOTYPES), a path to a genotype.json from a run folder, or a
    literal 'Genotype(normal=[...], normal_concat=..., reduce=[...], reduce_concat=...)'.
    Never eval()s user text. Raises UsageError with one line on bad input; more_names (names the
    calling method reads itself) join GENOTYPES in the suggestions."""
    text = text.strip()
    if text in GENOTYPES:
        return GENOTYPES[text]
    if text.startswith("|"):  # a NAS-Bench-201 arch string: returned as its canonical string
        return nb201_arch_str(parse_nb201_arch(text))
    if not text.startswith("Genotype(") and (text.endswith(".json") or Path(text).is_file()):
        try:
            d = json.loads(Path(text).read_text())
            d = d.get("genotype", d)
            if d.get("space") == "nb201":
                return nb201_arch_str(parse_nb201_arch(d["arch"]))
            g = Genotype(*[d[k] for k in Genotype._fields])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"cannot read a genotype from {text!r} ({type(e).__name__}: {e})") from None
        g = Genotype([tuple(e) for e in g.normal], list(g.normal_concat), [tuple(e) for e in g.reduce],
                     list(g.reduce_concat))
        return validate_genotype(g, text)
    if not text.startswith("Genotype("):
        names = sorted([*GENOTYPES, *more_names])
        hint = difflib.get_close_matches(text, names, n=1)
        raise UsageError(f"unknown genotype {text!r}; known: {', '.join(names)}"
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
    """What genotype.json holds: the Genotype's lists, or for an NB-201 arch string nb201_record's dict; a
    genotype that is already a dict (proxylessnas.py's layer-wise networks) is written as it is."""
    if isinstance(g, str):
        return nb201_record(g)
    if isinstance(g, dict):
        return dict(g)
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
    """Reads the 8x8 output of the second reduction cell (official model.py AuxiliaryHeadCIFAR:
    avg pool 5 stride 3 to 2x2, 1x1 conv 128, 2x2 conv 768, linear). ours: inputs that this pool does
    not bring to 2x2 (other than 8-10 px, i.e. images other than 29-40 px) are pooled adaptively to 2x2."""

    def __init__(self, C, num_classes):
        super().__init__()
        self.pool = nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = F.relu(x)
        x = self.pool(x) if 8 <= min(x.shape[-2:]) and max(x.shape[-2:]) <= 10 else F.adaptive_avg_pool2d(x, 2)
        # x: (B, C, 2, 2)
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
def evaluate(model, data, device, amp=False, max_steps=0, top5=False):
    """Mean loss and top-1 accuracy (%) over a loader (and top-5 accuracy with top5=True); models may
    return (logits, aux)."""
    model.eval()
    loss_sum, correct, correct5, n = 0.0, 0, 0, 0
    for step, (x, y) in enumerate(data):
        if max_steps and step >= max_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(x)
        logits = (out[0] if isinstance(out, tuple) else out).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        if top5:
            correct5 += (logits.topk(min(5, logits.shape[1]), 1).indices == y[:, None]).any(1).sum().item()
        n += y.numel()
    out = loss_sum / max(n, 1), 100.0 * correct / max(n, 1)
    return (*out, 100.0 * correct5 / max(n, 1)) if top5 else out


class Progress:
    """An epoch's running loss and accuracy, a log line every report_freq steps, each step's seconds
    (step_seconds: what bench.py takes the median of) and the CUDA peak memory of the epoch."""

    def __init__(self, log, what, epoch, steps, report_freq, device):
        self.log, self.what, self.epoch, self.steps, self.report_freq = log, what, epoch, steps, report_freq
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.loss_sum, self.acc_sum, self.step_seconds = 0.0, 0.0, []
        self.t0 = self.last = time.perf_counter()

    def update(self, loss, acc):
        """After a step, with its loss (a float: .item() has synchronised the device) and accuracy."""
        now = time.perf_counter()
        self.step_seconds.append(now - self.last)
        self.last, self.loss_sum, self.acc_sum = now, self.loss_sum + loss, self.acc_sum + acc
        n = len(self.step_seconds)
        if n % self.report_freq == 0 or n == self.steps:
            self.log.info("%s epoch %d step %d/%d loss %.4f acc %.2f (%.3f s/step)", self.what, self.epoch, n,
                          self.steps, self.loss_sum / n, self.acc_sum / n, (now - self.t0) / n)

    def summary(self):
        """{train_loss, train_acc, seconds_per_step, step_seconds, peak_gpu_mb} for the epoch's history row."""
        n = max(len(self.step_seconds), 1)
        return {"train_loss": self.loss_sum / n, "train_acc": self.acc_sum / n,
                "seconds_per_step": sum(self.step_seconds) / n, "step_seconds": self.step_seconds,
                "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None}


def speed_up(model, args):
    """--channels-last and --compile, in place (state_dict keys unchanged, so checkpoints are the same)."""
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile(backend=args.compile_backend)
    return model


def clip_grad(params, max_norm):
    """Gradient-norm clipping as the official code does it; max_norm 0 means no clipping (in every file)."""
    if max_norm > 0:
        nn.utils.clip_grad_norm_(params, max_norm)


def train_epoch(model, data, optimizer, device, args, log, epoch):
    """One retraining epoch: CE (+ auxiliary_weight * CE of the tower), grad-norm clip. Returns Progress.summary()."""
    model.train()
    steps = min(len(data), args.steps_per_epoch or len(data))
    progress = Progress(log, "retrain", epoch, steps, args.report_freq, device)
    for step, (x, y) in enumerate(data):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, args.amp):
            out = model(x)
            logits, logits_aux = out if isinstance(out, tuple) else (out, None)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            if logits_aux is not None:
                loss = loss + args.auxiliary_weight * F.cross_entropy(logits_aux.float(), y,
                                                                      label_smoothing=args.label_smoothing)
        loss.backward()
        clip_grad(model.parameters(), args.retrain_grad_clip)
        optimizer.step()
        progress.update(loss.item(), accuracy(logits, y))
    return progress.summary()


def retrain_scheduler(optimizer, args):
    """The lr of each retraining epoch, stepped at its end (common.py Deviation C1): cosine to 0 (train.py),
    step = lr0 gamma^e (train_imagenet.py StepLR(1, 0.97)), or PC-DARTS's linear rule lr0 (E-5-e)/(E-5), and
    lr0 (E-e)/(5 (E-5)) in the last 5 epochs (train_imagenet.py adjust_lr, lines 186-194); a warm-up replaces
    the first W epochs by lr0 (e+1)/W (lines 156-159)."""
    E, W = args.retrain_epochs, args.retrain_warmup_epochs
    if args.retrain_schedule == "cosine" and W == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, E, eta_min=0.0)

    def factor(e):
        if e < W:
            return (e + 1) / W
        if args.retrain_schedule == "step":
            return args.retrain_gamma ** e
        if args.retrain_schedule == "linear":
            last = max(E - 5, 1)
            return (E - 5 - e) / last if E - e > 5 else (E - e) / (last * 5)
        return 0.5 * (1 + math.cos(math.pi * e / E))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def retrain_data(args, generator, world=1, rank=0):
    """The retraining loaders: (train, eval, eval split name, num_classes). With --retrain-val-portion P
    the last P of a fixed permutation of the training set is held out and is the eval split ("val", seen
    without augmentation); the test set is then never loaded, so a selection can only read held-out
    training images. Otherwise the eval split is the test set, as in train.py."""
    plain, num_classes, size = load_dataset(args.dataset, args.data, True, args.image_size, augment=False)
    cutout = args.cutout_length * size // 32 if args.cutout else 0  # 16 px at 32 px, scaled for other sizes
    train_set, _, _ = load_dataset(args.dataset, args.data, True, args.image_size, cutout)
    if args.retrain_val_portion > 0:
        perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0)).tolist()
        n_val = int(round(args.retrain_val_portion * len(train_set)))
        if not 1 <= n_val < len(train_set):
            raise UsageError(f"--retrain-val-portion {args.retrain_val_portion} leaves an empty split of "
                             f"{len(train_set)} training images")
        eval_set, name = torch.utils.data.Subset(plain, perm[:n_val]), "val"
        train_set = torch.utils.data.Subset(train_set, perm[n_val:])
    else:
        (eval_set, _, _), name = load_dataset(args.dataset, args.data, False, args.image_size), "test"
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, seed=args.seed) if world > 1 else None
    train_data = loader(train_set, args.retrain_batch_size // world, True, generator, args.workers, sampler=sampler)
    eval_data = loader(eval_set, args.retrain_batch_size, False, generator, args.workers)
    return train_data, eval_data, name, num_classes, size


def retrain(genotype, args, device, run_dir, log, method, build=None):
    """Train `genotype` from scratch with the DARTS protocol and report the final accuracy on the test
    set (or on held-out training images, --retrain-val-portion). `build(num_classes, image_size)` makes the
    network (default: NB201Network for an NB-201 arch string, NetworkImageNet for --dataset imagenet, else
    NetworkCIFAR, from the retrain flags); it may return logits or (logits, aux_logits). Writes retrain_history.jsonl and checkpoint_retrain.pt
    every epoch (resumed by --resume) and retrain_curves.png. Under torchrun: DistributedDataParallel,
    --retrain-batch-size is the global batch split over the processes, every rank evaluates, rank 0 writes."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    if args.retrain_batch_size % world:
        raise UsageError(f"--retrain-batch-size {args.retrain_batch_size} does not split over {world} processes")
    generator = torch.Generator().manual_seed(args.seed)
    train_data, eval_data, split, num_classes, size = retrain_data(args, generator, world, rank)
    if build is None and isinstance(genotype, str):  # a NAS-Bench-201 arch: the benchmark's network
        net = NB201Network(genotype, num_classes, args.retrain_init_channels, args.retrain_layers)
    elif build is None and args.dataset == "imagenet":  # the mobile setting of train_imagenet.py
        net = NetworkImageNet(args.retrain_init_channels, num_classes, args.retrain_layers, args.auxiliary, genotype,
                              args.aux_batchnorm)
    elif build is None:
        net = NetworkCIFAR(args.retrain_init_channels, num_classes, args.retrain_layers, args.auxiliary, genotype)
    else:
        net = build(num_classes, size)
    net.to(device)
    params, macs = count_parameters(net), count_macs(net, size)
    net = speed_up(net, args)
    log.info("retrain %s: %.3f M parameters (auxiliary head excluded), %.1f M multiply-adds at %d px", genotype,
             params, macs, size)
    optimizer = torch.optim.SGD(net.parameters(), args.retrain_lr, momentum=args.retrain_momentum,
                                weight_decay=args.retrain_weight_decay, nesterov=args.retrain_nesterov)
    scheduler = retrain_scheduler(optimizer, args)
    start = resume_from(run_dir / "checkpoint_retrain.pt", method, generator, model=net, optimizer=optimizer,
                        scheduler=scheduler) if args.resume else 0
    history = keep_jsonl(run_dir / "retrain_history.jsonl", start) if args.resume and rank == 0 else []
    if start:
        log.info("resumed retraining after epoch %d", start - 1)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net  # syncs weights from rank 0
    for epoch in range(start, args.retrain_epochs):
        t0 = time.time()
        if train_data.sampler is not None and hasattr(train_data.sampler, "set_epoch"):
            train_data.sampler.set_epoch(epoch)
        # drop-path probability ramps linearly from 0 (official train.py)
        net.drop_path_prob = args.drop_path_prob * epoch / args.retrain_epochs
        lr = optimizer.param_groups[0]["lr"]
        train = train_epoch(model, train_data, optimizer, device, args, log, epoch)
        top5 = args.dataset == "imagenet"  # train_imagenet.py logs valid_acc_top5 (line 154)
        eval_loss, eval_acc, *eval_acc5 = evaluate(net, eval_data, device, args.amp, top5=top5)
        scheduler.step()  # ours: at the end of the epoch (train.py steps first: its epoch 0 trains at eta(1))
        if rank != 0:
            continue
        row = {"epoch": epoch, "lr": lr, **train, f"{split}_loss": eval_loss, f"{split}_acc": eval_acc,
               **({f"{split}_acc_top5": eval_acc5[0]} if top5 else {}), "seconds": time.time() - t0}
        history.append(row)
        append_jsonl(run_dir / "retrain_history.jsonl", row)
        log.info("retrain epoch %d lr %.5f train_acc %.2f %s_acc %.2f %.1fs", epoch, lr, row["train_acc"], split,
                 eval_acc, row["seconds"])
        save_checkpoint(run_dir / "checkpoint_retrain.pt", {
            **make_checkpoint(method, epoch, args, generator, model=net, optimizer=optimizer, scheduler=scheduler),
            "genotype": genotype_to_dict(genotype)})
    if world > 1:  # the test of the distributed path compares these lines across ranks
        print(f"rank {rank}: final weights checksum {sum(p.double().sum().item() for p in net.parameters()):.12e}",
              flush=True)
    if rank != 0:
        return None
    plot_curves(history, ["train_acc", f"{split}_acc"], run_dir / "retrain_curves.png", "retraining")
    # the result is the last epoch's accuracy: no epoch is picked on the test set
    last = history[-1]
    return {"genotype": genotype_to_dict(genotype), "params_M": params, "macs_M": macs, "image_size": size,
            f"{split}_acc": last[f"{split}_acc"], **{k: v for k, v in last.items() if k.endswith("_top5")},
            "retrain_epochs": args.retrain_epochs, "processes": world}


# =====================================================================================
# The pipeline of every method file's main(): search -> derive -> retrain -> test
# =====================================================================================
def run(args, script, method, device, genotype, search, build=None, distributed_search=False):
    """What main() does after its own checks: load both data splits (errors before any run folder),
    make the run folder, seed, search (unless `genotype` is given), write genotype.json and its
    drawing, retrain with common.retrain (build: see retrain) and write results.json.
    search(args, device, run_dir, log) -> (genotype, summary dict). distributed_search=True: the method's
    search runs under torchrun itself (every rank calls search and returns the same genotype)."""
    if genotype is not None and args.no_retrain:
        raise UsageError("--genotype skips the search and --no-retrain skips retraining: nothing to do")
    nb201 = getattr(args, "space", "darts") == "nb201"
    if genotype is not None and isinstance(genotype, str) != nb201:
        raise UsageError(f"--genotype {args.genotype}: a NAS-Bench-201 arch string needs --space nb201 and "
                         "--space nb201 needs one" + ("" if hasattr(args, "space") else
                                                      f"; {Path(script).stem} has no NAS-Bench-201 space"))
    check_data(args)
    rank, world, device = setup_distributed(device)
    if world > 1 and genotype is None and not distributed_search:
        raise UsageError("under torchrun only retraining is distributed: search with one process, then "
                         "pass --genotype runs/<run>/genotype.json")
    run_dir, log = start_run(args, script)
    seed_everything(args.seed, args.torch_deterministic)
    results = {"method": method, "dataset": args.dataset, "seed": args.seed}
    if genotype is None:
        genotype, results["search"] = search(args, device, run_dir, log)
    else:
        log.info("retraining the given genotype, no search: %s", genotype)
    results["genotype"] = genotype_to_dict(genotype)
    if rank == 0:
        write_json(run_dir / "genotype.json", results["genotype"])
        if not isinstance(genotype, dict):  # a dict genotype (proxylessnas.py) is no cell: its file draws it
            (plot_nb201_cell if isinstance(genotype, str) else plot_genotype)(genotype, run_dir / "genotype.png")
    if not args.no_retrain:
        results["retrain"] = retrain(genotype, args, device, run_dir, log, method, build)
    if rank != 0:
        return None
    if not args.no_retrain:
        split = "val" if args.retrain_val_portion > 0 else "test"
        log.info("%s accuracy %.2f %% (last epoch), %.3f M params", split, results["retrain"][f"{split}_acc"],
                 results["retrain"]["params_M"])
    write_json(run_dir / "results.json", results)
    log.info("done: %s", run_dir / "results.json")
    return results


# =====================================================================================
# NAS-Bench-201 search space (Dong & Yang, ICLR 2020, arXiv:2001.00326)
# =====================================================================================
# Mirrors D-X-Y/AutoDL-Projects @ f46486e, the code the benchmark was built with:
#   xautodl/models/cell_operations.py        ops, ResNetBasicblock
#   xautodl/models/cell_infers/cells.py      InferCell  -> NB201Cell
#   xautodl/models/cell_infers/tiny_network.py TinyNetwork -> NB201Network (the evaluation network)
#   xautodl/models/cell_searchs/search_model_darts.py, search_cells.py: the search supernet (built by
#     each method file from the pieces below; see NB201_OPS, nb201_layout)
#   xautodl/models/cell_searchs/genotypes.py Structure: the arch string, gen_all
#   exps/NAS-Bench-201/main.py generate_meta_info: the order of the 15625 archs (the benchmark index)
# A cell is a DAG on 4 nodes: node 0 is the cell input, node i = sum_{j<i} op_(i,j)(node j), and node 3
# is the cell output. Its 6 edges, in the order of the benchmark's arch string
# |op~0|+|op~0|op~1|+|op~0|op~1|op~2| (also the rows of the official arch_parameters, whose edge keys
# "1<-0" .. "3<-2" are sorted, search_cells.py line 45):
NB201_EDGES = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]  # (to_node, from_node)
NB201_NODES = 4
NB201_PRIMITIVES = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]  # NAS_BENCH_201
NB201_NUM_ARCHS = len(NB201_PRIMITIVES) ** len(NB201_EDGES)  # 15625


class NB201ReLUConvBN(nn.Sequential):
    """ReLU -> Conv k x k (stride, padding k//2) -> BN (cell_operations.py ReLUConvBN). The conv has a
    bias exactly when the BN has no affine (official `bias=not affine`, since AutoDL-Projects 9db2839,
    Sep 2020): evaluation networks (affine=True) have none, search supernets (affine=False) have one."""

    def __init__(self, C_in, C_out, kernel, stride, affine=True, track_running_stats=True):
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(C_in, C_out, kernel, stride, padding=kernel // 2, bias=not affine),
                         nn.BatchNorm2d(C_out, affine=affine, track_running_stats=track_running_stats))


def _nb201_none(C_in, C_out, stride, affine, track_running_stats):
    """Zero (cell_operations.py Zero). Its channel-changing branch is never built: NB-201 cells keep C."""
    if C_in != C_out:
        raise ValueError(f"none: NB-201 cells keep their channels (got C_in={C_in}, C_out={C_out})")
    return Zero(stride)


def _nb201_skip(C_in, C_out, stride, affine, track_running_stats):
    """Identity. The official FactorizedReduce branch for a shape change is never built: NB-201 cells
    keep (C, H, W); the stride and channel changes live in NB201ResNetBlock."""
    if stride != 1 or C_in != C_out:
        raise ValueError(f"skip_connect: NB-201 cells keep their shape (got C_in={C_in}, C_out={C_out}, "
                         f"stride={stride})")
    return nn.Identity()


def _nb201_pool(C_in, C_out, stride, affine, track_running_stats):
    """cell_operations.py POOLING: a 1x1 ReLU-Conv-BN first only when the channels change."""
    pool = nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)
    if C_in == C_out:
        return pool
    return nn.Sequential(NB201ReLUConvBN(C_in, C_out, 1, 1, affine, track_running_stats), pool)


NB201_OPS = {  # name -> constructor(C_in, C_out, stride, affine, track_running_stats); cell_operations.py OPS
    "none": _nb201_none,
    "skip_connect": _nb201_skip,
    "nor_conv_1x1": lambda C_in, C_out, stride, affine, trs: NB201ReLUConvBN(C_in, C_out, 1, stride, affine, trs),
    "nor_conv_3x3": lambda C_in, C_out, stride, affine, trs: NB201ReLUConvBN(C_in, C_out, 3, stride, affine, trs),
    "avg_pool_3x3": _nb201_pool,
}


class NB201ResNetBlock(nn.Module):
    """The residual block between stages (cell_operations.py ResNetBasicblock): ReLU-Conv3x3(stride)-BN ->
    ReLU-Conv3x3-BN, plus a shortcut: AvgPool 2x2 (stride 2) -> Conv 1x1 when stride 2, else a 1x1
    ReLU-Conv-BN when the channels change, else the identity. Search supernets build it with the defaults
    too (affine BN with running stats, search_model_darts.py line 35)."""

    def __init__(self, C_in, C_out, stride=2, affine=True, track_running_stats=True):
        super().__init__()
        self.conv_a = NB201ReLUConvBN(C_in, C_out, 3, stride, affine, track_running_stats)
        self.conv_b = NB201ReLUConvBN(C_out, C_out, 3, 1, affine, track_running_stats)
        if stride == 2:
            self.downsample = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(C_in, C_out, 1, bias=False))
        elif C_in != C_out:
            self.downsample = NB201ReLUConvBN(C_in, C_out, 1, 1, affine, track_running_stats)
        else:
            self.downsample = nn.Identity()

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)
        return self.downsample(x) + self.conv_b(self.conv_a(x))


def nb201_layout(C=16, N=5):
    """The macro skeleton of the evaluation network and of every search supernet (tiny_network.py
    TinyNetwork lines 20-21, search_model_darts.py TinyNetworkDarts lines 26-27): a list of
    (kind, C_in, C_out), kind "cell" (a cell at constant shape) or "resblock" (NB201ResNetBlock, stride 2):
    N cells at C, resblock C -> 2C, N cells at 2C, resblock 2C -> 4C, N cells at 4C (3N + 2 entries)."""
    layout = []
    for stage in range(3):
        C_stage = C * 2 ** stage
        if stage:
            layout.append(("resblock", C_stage // 2, C_stage))
        layout += [("cell", C_stage, C_stage)] * N
    return layout


def nb201_stem(C):
    """Conv 3x3 (3 -> C, no bias) -> BN; no ReLU (every cell op starts with one)."""
    return nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))


def nb201_lastact(C):
    """BN -> ReLU before the global pool (the official `lastact`)."""
    return nn.Sequential(nn.BatchNorm2d(C), nn.ReLU(inplace=True))


class NB201Cell(nn.Module):
    """A discrete cell read off an arch (cells.py InferCell): node i = sum_{j<i} op_(i,j)(node j), the
    output is node 3. Edges leaving node 0 take (C_in, stride), the others (C_out, 1). 'none' edges are
    built (as Zero) and summed, as in the official cell."""

    def __init__(self, edge_ops, C_in, C_out, stride=1, affine=True, track_running_stats=True):
        super().__init__()
        self.edges = nn.ModuleList(
            NB201_OPS[op](C_in if j == 0 else C_out, C_out, stride if j == 0 else 1, affine, track_running_stats)
            for op, (_, j) in zip(edge_ops, NB201_EDGES))

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)
        nodes = [x]
        for i in range(1, NB201_NODES):
            nodes.append(sum(op(nodes[j]) for op, (to, j) in zip(self.edges, NB201_EDGES) if to == i))
        return nodes[-1]


class NB201Network(nn.Module):
    """The benchmark's evaluation network (tiny_network.py TinyNetwork, built by the API's
    get_net_config -> get_cell_based_tiny_net 'infer.tiny'): stem, nb201_layout(C, N) with one arch in
    every cell, BN-ReLU, global pool, linear. `arch` is an arch string or a list of 6 op names in
    NB201_EDGES order. forward returns (logits, None), the (logits, aux_logits) pair `retrain` expects."""

    def __init__(self, arch, num_classes, C=16, N=5):
        super().__init__()
        edge_ops = parse_nb201_arch(arch) if isinstance(arch, str) else list(arch)
        self.arch = nb201_arch_str(edge_ops)  # validates a list too
        self.stem = nb201_stem(C)
        self.cells = nn.ModuleList(NB201Cell(edge_ops, c_in, c_out) if kind == "cell" else NB201ResNetBlock(c_in, c_out)
                                   for kind, c_in, c_out in nb201_layout(C, N))
        self.lastact = nb201_lastact(4 * C)
        self.classifier = nn.Linear(4 * C, num_classes)

    def forward(self, x):  # x: (B, 3, H, W)
        h = self.stem(x)  # (B, C, H, W)
        for cell in self.cells:
            h = cell(h)  # (B, 4C, H/4, W/4) after the two resblocks
        h = F.adaptive_avg_pool2d(self.lastact(h), 1).flatten(1)  # (B, 4C)
        return self.classifier(h), None


def nb201_arch_str(edge_ops):
    """['nor_conv_3x3', 'none', 'avg_pool_3x3', ...] (NB201_EDGES order) -> the benchmark's string
    '|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|...~0|...~1|...~2|' (genotypes.py Structure.tostr)."""
    edge_ops = list(edge_ops)
    if len(edge_ops) != len(NB201_EDGES):
        raise UsageError(f"an NB-201 cell has {len(NB201_EDGES)} edges, got {len(edge_ops)} ops: {edge_ops}")
    for op in edge_ops:
        if op not in NB201_PRIMITIVES:
            raise UsageError(f"unknown NB-201 op {op!r}{_did_you_mean(op, NB201_PRIMITIVES)}; "
                             f"choose from {', '.join(NB201_PRIMITIVES)}")
    nodes = [[f"{op}~{j}" for op, (to, j) in zip(edge_ops, NB201_EDGES) if to == i] for i in range(1, NB201_NODES)]
    return "+".join("|" + "|".join(node) + "|" for node in nodes)


def _did_you_mean(word, choices):
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_nb201_arch(text):
    """The inverse of nb201_arch_str: an arch string -> 6 op names in NB201_EDGES order. Within a node
    the edges may come in any order (as genotypes.py str2structure allows); every source node must
    appear exactly once. Raises UsageError with one line on anything else."""
    if not isinstance(text, str):
        raise UsageError(f"an NB-201 arch must be a string like {nb201_arch_str(['nor_conv_3x3'] * 6)!r}")
    text = text.strip()
    nodes = text.split("+")
    if len(nodes) != NB201_NODES - 1:
        raise UsageError(f"NB-201 arch {text!r}: expected {NB201_NODES - 1} nodes separated by '+', got {len(nodes)}")
    ops = {}
    for i, node in enumerate(nodes, start=1):
        if not (node.startswith("|") and node.endswith("|") and len(node) > 1):
            raise UsageError(f"NB-201 arch {text!r}: node {i} {node!r} must look like '|op~0|...|'")
        for item in node[1:-1].split("|"):
            op, sep, src = item.partition("~")
            if not sep or not src.isdigit():
                raise UsageError(f"NB-201 arch {text!r}: node {i} has {item!r}, expected 'op~j'")
            j = int(src)
            if j >= i:
                raise UsageError(f"NB-201 arch {text!r}: node {i} cannot read node {j} (only nodes 0..{i - 1})")
            if (i, j) in ops:
                raise UsageError(f"NB-201 arch {text!r}: node {i} reads node {j} twice")
            if op not in NB201_PRIMITIVES:
                raise UsageError(f"NB-201 arch {text!r}: unknown op {op!r}{_did_you_mean(op, NB201_PRIMITIVES)}; "
                                 f"choose from {', '.join(NB201_PRIMITIVES)}")
            ops[(i, j)] = op
        missing = [j for j in range(i) if (i, j) not in ops]
        if missing:
            raise UsageError(f"NB-201 arch {text!r}: node {i} has no edge from node(s) {missing}")
    return [ops[edge] for edge in NB201_EDGES]


def nb201_derive(weights):
    """The derived cell: argmax op per edge over a (6, n_ops) matrix of architecture weights, 'none'
    allowed (search_model_darts.py genotype(), lines 94-105; the same rule in search_model_gdas.py)."""
    weights = torch.as_tensor(weights)
    if weights.shape != (len(NB201_EDGES), len(NB201_PRIMITIVES)):
        raise ValueError(f"expected ({len(NB201_EDGES)}, {len(NB201_PRIMITIVES)}) weights, got {tuple(weights.shape)}")
    return nb201_arch_str(NB201_PRIMITIVES[k] for k in weights.argmax(dim=-1).tolist())


_NB201_INDEX = {}  # arch string -> benchmark index, filled on first use


def nb201_all_archs():
    """The benchmark's list of its 15625 arch strings: list position = NB-201 index (what the API's
    query_index_by_arch returns). Not read from the benchmark file: recomputed as the official code
    built it (exps/NAS-Bench-201/main.py generate_meta_info, lines 462-487): Structure.gen_all
    enumerates the ops of edges 1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2 with the first edge slowest
    (= itertools.product over NB201_PRIMITIVES), then random.seed(88); random.shuffle(archs). The file's
    meta_archs is that list (exps/NAS-Bench-201/statistics.py, lines 393 and 526); main.py asserts
    archs[0], [9] and [123], and so does tests/test_nb201.py."""
    import itertools  # local: keeps this section's imports inside it

    archs = [nb201_arch_str(ops) for ops in itertools.product(NB201_PRIMITIVES, repeat=len(NB201_EDGES))]
    random.Random(88).shuffle(archs)  # = random.seed(88); random.shuffle(archs), without touching the global RNG
    return archs


def nb201_index(arch):
    """NB-201 index (0..15624) of an arch string or a list of 6 op names."""
    if not _NB201_INDEX:
        _NB201_INDEX.update((a, i) for i, a in enumerate(nb201_all_archs()))
    ops = parse_nb201_arch(arch) if isinstance(arch, str) else list(arch)
    return _NB201_INDEX[nb201_arch_str(ops)]


def nb201_record(arch):
    """What genotype.json holds for an NB-201 cell: the canonical arch string and its benchmark index."""
    arch = nb201_arch_str(parse_nb201_arch(arch) if isinstance(arch, str) else arch)
    return {"space": "nb201", "arch": arch, "nb201_index": nb201_index(arch)}


NB201_BENCHMARK_HELP = ("a NAS-Bench-201 benchmark file (NAS-Bench-201-v1_1-096897.pth, pip nas-bench-201) or "
                       "NATS-Bench topology file/folder (NATS-tss-v1_0-3ffb9*, pip nats_bench): every search epoch "
                       "logs the derived cell's CIFAR-10/100 and ImageNet16-120 accuracies from it, as "
                       "exps/NAS-Bench-201-algos/*.py do (needs --space nb201)")


def nb201_epoch_row(args, arch, log):
    """What a search epoch in the NB-201 space records of its derived cell (search_history.jsonl): the arch
    string, its benchmark index and, with --nb201-benchmark, the benchmark's 200-epoch accuracies of it
    (nb201_lookup), which the benchmark's own search scripts log every epoch (DARTS-V1.py line 339)."""
    row = {"arch": arch, "nb201_index": nb201_index(arch)}
    if getattr(args, "nb201_benchmark", ""):
        row["nb201"] = acc = nb201_lookup(args.nb201_benchmark, arch)
        log.info("NAS-Bench-201 %d: cifar10 valid %.2f test %.2f | cifar100 valid %.2f test %.2f | ImageNet16-120 "
                 "valid %.2f test %.2f", row["nb201_index"], *acc.values())
    return row


def plot_nb201_history(history, path):
    """The benchmark accuracies of each epoch's derived cell (rows of nb201_epoch_row with "nb201")."""
    plt = pyplot()
    rows = [r for r in history if "nb201" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in rows[0]["nb201"]:
        ax.plot([r["epoch"] + 1 for r in rows], [r["nb201"][key] for r in rows], label=key, marker=".")
    ax.set_xlabel("search epoch")
    ax.set_ylabel("benchmark accuracy of the derived cell (%)")
    ax.set_title("NAS-Bench-201 lookup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# The benchmark's 200-epoch training (configs/nas-benchmark/hyper-opts/200E.config, lines 2-12, the
# same values as CIFAR.config and ImageNet-16.config; exps/NAS-Bench-201/functions.py procedure()
# steps without gradient clipping): no auxiliary head, no drop-path, no cutout; crop + flip only.
NB201_RETRAIN = {"epochs": 200, "batch_size": 256, "lr": 0.1, "lr_min": 0.0, "momentum": 0.9,
                 "nesterov": True, "weight_decay": 5e-4, "grad_clip": None}


# the same recipe as the retraining flags' values under --space nb201 (see recipes()); C=16, N=5 cells per stage
NB201_RETRAIN_ARGS = {"retrain_epochs": NB201_RETRAIN["epochs"], "retrain_batch_size": NB201_RETRAIN["batch_size"],
                      "retrain_lr": NB201_RETRAIN["lr"], "retrain_momentum": NB201_RETRAIN["momentum"],
                      "retrain_nesterov": NB201_RETRAIN["nesterov"], "retrain_weight_decay": NB201_RETRAIN["weight_decay"],
                      "retrain_grad_clip": 0.0, "retrain_init_channels": 16, "retrain_layers": 5, "auxiliary": False,
                      "cutout": False, "drop_path_prob": 0.0}


def nb201_optimizer(parameters, epochs=NB201_RETRAIN["epochs"], lr=NB201_RETRAIN["lr"],
                    weight_decay=NB201_RETRAIN["weight_decay"]):
    """SGD(momentum 0.9, Nesterov, weight decay on every parameter) and a per-epoch cosine from lr to 0:
    lr_e = lr * (1 + cos(pi * e / epochs)) / 2 at epoch e (xautodl/procedures/optimizers.py
    CosineAnnealingLR with warmup 0 = torch's CosineAnnealingLR stepped once per epoch)."""
    optimizer = torch.optim.SGD(parameters, lr, momentum=NB201_RETRAIN["momentum"], weight_decay=weight_decay,
                                nesterov=NB201_RETRAIN["nesterov"])
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=NB201_RETRAIN["lr_min"])


_NB201_APIS = {}  # benchmark path -> API object: the file is gigabytes, load it once per process


def nb201_api(path):
    """The official benchmark API over `path`, imported and loaded on first use only:
      *.pth, e.g. NAS-Bench-201-v1_1-096897.pth  -> nas_201_api.NASBench201API   (pip nas-bench-201==2.1)
      *.pickle.pbz2, e.g. NATS-tss-v1_0-3ffb9    -> nats_bench.create(path, "tss") (pip nats_bench==1.8)
      a directory, e.g. NATS-tss-v1_0-3ffb9-simple -> the same, fast_mode=True (one file per arch)
    NATS-Bench's topology space ("tss") is the NB-201 space. Raises UsageError for a missing file or
    package, so a method can call this before it writes its run folder."""
    path = Path(path).expanduser()
    key = str(path.resolve())
    if key in _NB201_APIS:
        return _NB201_APIS[key]
    if not path.exists():
        raise UsageError(f"--nb201-benchmark {path}: no such file or directory")
    nats = path.is_dir() or path.name.endswith(".pickle.pbz2")
    package = "nats_bench==1.8" if nats else "nas-bench-201==2.1"
    try:
        if nats:
            import nats_bench
        else:
            import nas_201_api
    except ImportError:
        raise UsageError(f"--nb201-benchmark {path.name} needs the official API: pip install {package}") from None
    if nats:
        api = nats_bench.create(str(path), "tss", fast_mode=path.is_dir(), verbose=False)
    else:
        # the .pth is a pickle of the API's own dicts with numpy scalars in them (the parameter counts),
        # which torch >= 2.6's default torch.load(weights_only=True) refuses; the user vouches for the file
        import warnings

        old = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            with warnings.catch_warnings():  # torch's note that the variable forces weights_only=False
                warnings.simplefilter("ignore", UserWarning)
                api = nas_201_api.NASBench201API(str(path), verbose=False)
        finally:
            if old is None:
                os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
            else:
                os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = old
    _NB201_APIS[key] = api
    return api


def nb201_lookup(path, arch):
    """The benchmark's 200-epoch accuracies (%) of `arch`, averaged over its seeds (is_random=False), as
    the benchmark's authors read them (exps/NATS-Bench/draw-correlations.py get_valid_test_acc, lines
    27-49; the same numbers api.query_by_arch(arch, "200") logs every search epoch in
    exps/NAS-Bench-201-algos/DARTS-V1.py, line 339):
      cifar10_valid   trained on CIFAR-10 train (25K), on the 25K held-out half   ('cifar10-valid', x-valid)
      cifar10_test    trained on all 50K, on the CIFAR-10 test set                ('cifar10', ori-test)
      cifar100_*, imagenet16_120_*  on the benchmark's valid / test halves of the test set (x-valid, x-test)"""
    arch = nb201_arch_str(parse_nb201_arch(arch) if isinstance(arch, str) else arch)
    api = nb201_api(path)
    index = api.query_index_by_arch(arch)
    if index < 0:
        raise UsageError(f"{arch} is not in the benchmark file {path}")
    out = {}
    for key, dataset, metric in [("cifar10_valid", "cifar10-valid", "valid-accuracy"),
                                 ("cifar10_test", "cifar10", "test-accuracy"),
                                 ("cifar100_valid", "cifar100", "valid-accuracy"),
                                 ("cifar100_test", "cifar100", "test-accuracy"),
                                 ("imagenet16_120_valid", "ImageNet16-120", "valid-accuracy"),
                                 ("imagenet16_120_test", "ImageNet16-120", "test-accuracy")]:
        try:
            out[key] = float(api.get_more_info(index, dataset, hp="200", is_random=False)[metric])
        except (KeyError, ValueError, AssertionError) as e:  # what the two APIs raise for a missing entry
            raise UsageError(f"{arch} (index {index}) has no 200-epoch {dataset} {metric} in {path} ({e!r})") from None
    return out


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
    """Heatmap per cell type: weights = {"normal": (E, n_ops), "reduce": (E, n_ops)}; with
    primitives=NB201_PRIMITIVES, {"cell": (6, 5)} rows labelled by NB201_EDGES."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(weights), figsize=(5.5 * len(weights), 6), squeeze=False)
    for ax, (cell, w) in zip(axes[0], weights.items()):
        w = np.asarray(w)
        lo, hi = w.min(), max(w.max(), w.min() + 1e-6)  # relative scale: early alphas are near uniform
        im = ax.imshow(w, cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(len(primitives)), primitives, rotation=60, ha="right", fontsize=8)
        rows = NB201_EDGES if primitives == NB201_PRIMITIVES else edge_names(len(w))  # (to, from) per row
        ax.set_yticks(range(len(w)), [f"{i}->{n}" for n, i in rows], fontsize=7)
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


def plot_nb201_cell(arch, path):
    """Draw a NAS-Bench-201 cell: nodes 0-3 in a row, every edge j -> i with its op ('none' dashed)."""
    plt = pyplot()
    ops = parse_nb201_arch(arch)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    pos = {i: (i / 3, 0.25) for i in range(NB201_NODES)}
    for op, (to, frm) in zip(ops, NB201_EDGES):
        rad = 0.0 if to - frm == 1 else 0.25 * (to - frm) - 0.2  # longer edges arc higher
        ax.annotate("", xy=pos[to], xytext=pos[frm], arrowprops=dict(
            arrowstyle="->", color="0.6" if op == "none" else "tab:blue" if "conv" in op else "tab:orange",
            ls="--" if op == "none" else "-", lw=1.3, shrinkA=14, shrinkB=14, connectionstyle=f"arc3,rad={-rad}"))
        x, y = (pos[frm][0] + pos[to][0]) / 2, 0.25 + rad * (pos[to][0] - pos[frm][0]) / 2  # the arc's apex
        ax.text(x, y, op, fontsize=8, ha="center", va="center", bbox=dict(fc="white", ec="none", alpha=0.8))
    for node, (x, y) in pos.items():
        ax.text(x, y, str(node), ha="center", va="center", fontsize=11, bbox=dict(boxstyle="circle", fc="lightblue"))
    ax.set_xlim(-0.1, 1.1)
    ax.set_ylim(0.1, 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(arch, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _arrow(ax, a, b, label, color):
    ax.annotate("", xy=b, xytext=a, arrowprops=dict(arrowstyle="->", color=color, lw=1.3,
                                                    shrinkA=14, shrinkB=14, connectionstyle="arc3,rad=0.12"))
    if label:
        ax.text(0.55 * a[0] + 0.45 * b[0], 0.55 * a[1] + 0.45 * b[1], label, fontsize=7, color=color,
                ha="center", va="center", bbox=dict(fc="white", ec="none", alpha=0.7, pad=0.5))
