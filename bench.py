"""bench.py: what each method's search costs, side by side on one device, and whether the speed switches
keep it numerically sane.

For every method file, bench.py runs the file's own search (its main(), in this process, with --epochs 1
--steps-per-epoch WARMUP+STEPS --no-retrain on random images, --dataset fake) and reads what common.Progress
wrote per step to search_history.jsonl. A step is what the method does per training batch: for the
DARTS family one architecture step on a val batch plus one weight step (GDAS, SNAS, VIM-NAS, DAAS alike;
SNAS updates both on the same batch), for iDARTS one alpha step with its --inner-steps (5) weight steps,
for ENAS one shared-weight step of a sampled child, for ProxylessNAS one weight step on sampled paths (its
first search epoch has no architecture step, later ones one every --arch-update-every batches, so bench
times weight steps only, and its 40 warm-up epochs are not in the whole-search figure). Warm-up epochs
without architecture steps are switched off (--warmup-epochs 0 where a method has them), so every timed
step is a full one.

    python bench.py                                      # every method at its paper configuration
    python bench.py --device cuda --channels-last --compile --no-torch-deterministic
    python bench.py --methods darts,gdas --batch-size 16 --image-size 16 --layers 5 --init-channels 8
    python bench.py --check-switches                     # each speed switch alone vs the plain run

Reported per method: the median seconds of a step after --warmup steps (and min-max over --steps steps),
peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: the most bytes held for backward at once, counted
with torch.autograd.graph.saved_tensors_hooks over distinct storages, so weights saved by an op count too),
and extrapolations: one search epoch = median step x steps per epoch (ceil(train_portion x --train-images /
batch), iDARTS: the val half), the whole search = epoch x the method's default --epochs (P-DARTS: x its 3
stages, each timed on its own supernet). Not in the extrapolation: per-epoch extras (val evaluation,
genotype derivation, ENAS's 30 x 10 controller samples, DAAS's discretization gap), and warm-up epochs that
train weights only (PC-DARTS 15 of 50, P-DARTS 10 of 25 per stage, DAAS 7 of 50): an upper bound for
those three. Methods without per-step times in their history fall back to the mean step (warm-up
included), marked "mean".

--check-switches runs each method again for --check-steps steps, plain and with one switch at a time
(--channels-last; --compile with --compile-backend; on CUDA also --amp and --no-torch-deterministic) and
compares the mean training loss of those steps: within --rtol of the plain run (--amp: --amp-rtol,
bfloat16) or the switch is reported FAIL and bench.py exits 1.

Output: the table on stdout, bench.json and bench.png (bars: search days per method) in --out-dir.
The run folders of the searches go to a temporary folder and their figures are not rendered (both kept
with --keep-runs, in --out-dir/runs).
"""

import contextlib
import dataclasses
import importlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
from common import UsageError, arg

ROOT = Path(__file__).resolve().parent
METHODS = ["darts", "pc_darts", "p_darts", "gdas", "snas", "daas", "idarts", "vim_nas", "enas", "proxylessnas"]
# per-method glue: flags that keep a one-epoch bench short without changing what a step does
EXTRA = {"enas": ["--controller-train-steps", "1", "--controller-num-aggregate", "1", "--derive-samples", "1",
                  "--stat-samples", "1"]}
# the papers' published search costs (GPU-days), for the figure and the README
# (DARTS: per search, as the PC-DARTS README counts it; GDAS: 0.17 with FRC, "four GPU hours"; VIM-NAS:
# "within 10 minutes"; DAAS and iDARTS: none found)
PAPER_GPU_DAYS = {"darts": 0.4, "darts (2nd order)": 1.0, "pc_darts": 0.1, "p_darts": 0.3, "gdas": 0.17,
                  "snas": 1.5, "enas": 0.45, "vim_nas": 10 / 60 / 24}


@dataclasses.dataclass
class Args:
    methods: str = arg("all", "comma-separated method files to bench (all = every one present: "
                       + ", ".join(METHODS) + ")")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N (auto = CUDA when present)")
    batch_size: int = arg(0, "search batch size; 0 = each method's own (paper) default", check=">=0")
    layers: int = arg(0, "cells in the supernet; 0 = each method's own", check="0 or >=3")
    init_channels: int = arg(0, "supernet channels; 0 = each method's own", check=">=0")
    image_size: int = arg(32, "image side in pixels (CIFAR: 32)", check=">=8")
    train_images: int = arg(50000, "training images an epoch is extrapolated to (CIFAR-10: 50000)", check=">=1")
    steps: int = arg(5, "timed steps per method (median and min-max over them)", check=">=1")
    warmup: int = arg(2, "steps run first and not timed (with --compile: the compiling steps)", check=">=0")
    amp: bool = arg(False, "bfloat16 autocast (CUDA only), as the method files' --amp")
    channels_last: bool = arg(False, "channels-last supernets, as the method files' --channels-last")
    compile: bool = arg(False, "torch.compile the supernets, as the method files' --compile")
    compile_backend: str = arg("inductor", "torch.compile backend (aot_eager / eager: no code generation)",
                               check=("inductor", "aot_eager", "eager"))
    torch_deterministic: bool = arg(True, "cudnn.deterministic; --no-torch-deterministic turns on "
                                    "cudnn.benchmark (a GPU speed switch)")
    check_switches: bool = arg(False, "also run each speed switch alone against the plain run and compare losses")
    check_steps: int = arg(3, "steps of each --check-switches run", check=">=1")
    rtol: float = arg(1e-3, "--check-switches: largest relative loss difference of a float32 switch", check=">0")
    amp_rtol: float = arg(5e-2, "--check-switches: the same for --amp (bfloat16)", check=">0")
    seed: int = arg(2, "random seed of every run", check="[0,4294967295]")
    out_dir: str = arg("bench", "where bench.json and bench.png are written")
    keep_runs: bool = arg(False, "keep the methods' run folders, figures included (in --out-dir/runs)")


# =====================================================================================
# Memory saved for backward (CPU)
# =====================================================================================
class SavedBytes:
    """Inside `with SavedBytes() as s:` every tensor autograd saves for backward is counted once per storage
    while some graph holds it; s.peak is the most bytes held at once."""

    def __init__(self):
        self.live, self.now, self.peak = {}, 0, 0

    def _pack(self, t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        return _Held(t, self, key)  # autograd keeps it until the graph is freed

    def _release(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


class _Held:
    """One saved tensor; when autograd drops it (the graph is freed), its storage is released."""

    def __init__(self, tensor, counter, key):
        self.tensor, self.counter, self.key = tensor, counter, key

    def __del__(self):
        self.counter._release(self.key)


# =====================================================================================
# One method: its own search, one short epoch
# =====================================================================================
VARIANTS = {"darts-2nd": ("darts", ["--unrolled"])}  # bench name -> (method file, extra flags)
SWITCHES = ("channels_last", "compile", "amp", "no_torch_deterministic")


def switch_flags(switches, backend):
    """{"channels_last": True, ...} -> the method files' flags."""
    out = []
    for name in SWITCHES:
        if switches.get(name):
            out += [common.flag(name)] + (["--compile-backend", backend] if name == "compile" else [])
    return out


def method_argv(name, mod, args, run_dir, steps, switches):
    """The method file's command line for a bench run: its defaults, except what bench's flags set."""
    fields = {f.name for f in dataclasses.fields(mod.Args)}
    argv = ["--dataset", "fake", "--image-size", args.image_size, "--epochs", 1, "--steps-per-epoch", steps,
            "--no-retrain", "--workers", 0, "--device", args.device, "--seed", args.seed, "--report-freq", 10**9,
            "--out-dir", run_dir.parent, "--run-name", run_dir.name]
    for field in ("batch_size", "layers", "init_channels"):
        if getattr(args, field) and field in fields:
            argv += [common.flag(field), getattr(args, field)]
    if "warmup_epochs" in fields:  # every timed step has its architecture step
        argv += ["--warmup-epochs", 0]
    argv += switch_flags(switches, args.compile_backend) + VARIANTS.get(name, (name, []))[1] + EXTRA.get(name, [])
    return [str(a) for a in argv]


def steps_per_epoch(name, margs, n_images):
    """Steps in one full search epoch over n_images: batches of the weights' part of the split (SNAS: all
    images; iDARTS: of the val half, one step = one alpha step with its --inner-steps weight steps)."""
    portion = getattr(margs, "train_portion", 1.0)
    n_train = math.floor(portion * n_images)
    return math.ceil(((n_images - n_train) if name == "idarts" else n_train) / margs.batch_size)


@contextlib.contextmanager
def patched(obj, name, value):
    """obj.name = value inside the with block."""
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def bigger_fake_set(n):
    """common's fake training set holds 1024 images; WARMUP+STEPS batches of 256 need more. FakeData makes
    image i from seed i on demand, so a longer one costs nothing."""
    original = common.load_dataset

    def load(name, root, train, *a, **k):
        ds, classes, size = original(name, root, train, *a, **k)
        if name == "fake" and train:
            ds.size = max(ds.size, n)
        return ds, classes, size

    return patched(common, "load_dataset", load)


def no_figures(keep):
    """The methods' figures are drawn but not rendered to files (seconds each on CPU) unless --keep-runs."""
    import matplotlib.figure
    return contextlib.nullcontext() if keep else patched(matplotlib.figure.Figure, "savefig", lambda *a, **k: None)


def load_method(name):
    return importlib.import_module(VARIANTS.get(name, (name, []))[0])


def parse_method_args(name, args, run_dir, steps, switches):
    """The method's own Args for this bench run, checked as its main() will (UsageError: one line)."""
    mod = load_method(name)
    argv = method_argv(name, mod, args, run_dir, steps, switches)
    try:
        margs = common.parse_args(mod.Args, argv)
        common.prepare(common.parse_args(mod.Args, argv), mod.__file__)
    except UsageError as e:
        raise UsageError(f"{name}: {e}") from None
    return mod, margs


def run_search(name, args, runs_dir, tag, steps, switches):
    """Run the method's search for one epoch of `steps` steps; returns its history rows, the seconds the
    run took, the CPU bytes saved for backward (None on CUDA / with --compile) and the parsed method args."""
    run_dir = runs_dir / f"{name}-{tag}"
    mod, margs = parse_method_args(name, args, run_dir, steps, switches)
    device = common.get_device(args.device)
    count = device.type == "cpu" and not switches.get("compile")  # dynamo does not trace through the hooks
    saved = SavedBytes() if count else contextlib.nullcontext()
    n_fake = 1024 + 8 * steps * margs.batch_size * getattr(margs, "inner_steps", 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        with bigger_fake_set(n_fake), no_figures(args.keep_runs), saved, contextlib.redirect_stdout(io.StringIO()):
            mod.main(margs)
    finally:
        for handler in common.logging.getLogger(f"nas.{run_dir.resolve()}.0").handlers:
            handler.close()
    rows = [json.loads(line) for line in (run_dir / "search_history.jsonl").read_text().splitlines()]
    cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return rows, time.perf_counter() - t0, saved.peak if count else None, cuda_mb, margs


def step_times(row, warmup):
    """(median, min, max, kind) of one history row's timed steps; without per-step times, the mean."""
    seconds = row.get("step_seconds")
    if not seconds:
        s = row["seconds_per_step"]
        return s, s, s, "mean"
    timed = seconds[warmup:] or seconds[-1:]
    return statistics.median(timed), min(timed), max(timed), "median"


def bench_method(name, args, runs_dir, switches):
    """Time one method; returns its bench.json entry."""
    rows, wall, saved_bytes, cuda_mb, margs = run_search(name, args, runs_dir, "bench", args.warmup + args.steps,
                                                         switches)
    per_epoch = steps_per_epoch(name, margs, args.train_images)
    epochs = next(f.default for f in dataclasses.fields(margs) if f.name == "epochs")  # the method's own
    stats = [step_times(r, args.warmup) for r in rows]  # one per stage (P-DARTS: 3), else one
    epoch_s = [s[0] * per_epoch for s in stats]
    gpu_mb = [r.get("peak_gpu_mb") for r in rows if r.get("peak_gpu_mb") is not None]
    return {"method": name, "batch_size": margs.batch_size, "init_channels": getattr(margs, "init_channels", None),
            "layers": getattr(margs, "layers", None), "image_size": args.image_size,
            "step_s": sum(s[0] for s in stats) / len(stats), "step_min_s": min(s[1] for s in stats),
            "step_max_s": max(s[2] for s in stats), "timing": stats[0][3],
            "stages": [{"step_s": s[0], "step_min_s": s[1], "step_max_s": s[2], "cells": r.get("cells")}
                       for s, r in zip(stats, rows)] if len(rows) > 1 else None,
            "peak_mb": max(gpu_mb) if gpu_mb else cuda_mb if cuda_mb is not None else
            None if saved_bytes is None else saved_bytes / 2**20,
            "memory": "cuda max allocated" if cuda_mb is not None else "saved for backward" if saved_bytes else None,
            "steps_per_epoch": per_epoch, "epoch_s": sum(epoch_s) / len(epoch_s),
            "search_epochs": epochs * len(rows), "search_s": epochs * sum(epoch_s),
            "train_loss": [r["train_loss"] for r in rows], "bench_wall_s": wall}


def check_switches(name, args, runs_dir, device, switches=SWITCHES):
    """Each speed switch alone vs the plain run: the mean training loss of --check-steps steps."""
    plain, *_ = run_search(name, args, runs_dir, "plain", args.check_steps, {})
    out = []
    for switch in switches:
        entry = {"method": name, "switch": common.flag(switch)}
        if switch in ("amp", "no_torch_deterministic") and device.type != "cuda":
            out.append({**entry, "ok": None, "note": "CUDA only"})
            continue
        rows, *_ = run_search(name, args, runs_dir, switch, args.check_steps, {switch: True})
        tol = args.amp_rtol if switch == "amp" else args.rtol
        diff = max(abs(r["train_loss"] - p["train_loss"]) / max(abs(p["train_loss"]), 1e-12)
                   for r, p in zip(rows, plain))
        out.append({**entry, "plain_loss": plain[0]["train_loss"], "loss": rows[0]["train_loss"],
                    "rel_diff": diff, "rtol": tol, "ok": bool(diff <= tol)})
    return out


# =====================================================================================
# Output: table, bench.json, bench.png
# =====================================================================================
def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(results, device):
    """The stdout table, one line per method."""
    mem = "peak MB (CUDA)" if device.type == "cuda" else "saved MB"
    head = ["method", "batch", "C", "cells", "px", "step s", "min-max s", mem, "steps/ep", "epoch h", "epochs",
            "search days", "paper GPU-days"]
    lines = []
    for r in results:
        if "error" in r:
            lines.append([r["method"], f"failed: {r['error']}"])
            continue
        step = fmt(r["step_s"], ".3f") + ("*" if r["timing"] == "mean" else "")
        paper = PAPER_GPU_DAYS.get("darts (2nd order)" if r["method"] == "darts-2nd" else r["method"])
        lines.append([r["method"], str(r["batch_size"]), str(r["init_channels"]), str(r["layers"]),
                      str(r["image_size"]), step, f"{r['step_min_s']:.3f}-{r['step_max_s']:.3f}",
                      fmt(r["peak_mb"], ".0f"), str(r["steps_per_epoch"]), f"{r['epoch_s'] / 3600:.2f}",
                      str(r["search_epochs"]), f"{r['search_s'] / 86400:.2f}", fmt(paper, ".3g")])
    widths = [max(len(row[i]) for row in [head] + [x for x in lines if len(x) == len(head)]) for i in range(len(head))]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) if len(row) == len(head) else "  ".join(row)
            for row in lines]
    return "\n".join(out)


def plot(results, device, path):
    """Left: seconds per step (median, bar = min-max); right: the whole search in days, with the papers'."""
    plt = common.pyplot()
    ok = [r for r in results if "error" not in r]
    names = [r["method"] for r in ok]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.45 * len(ok) + 1.8))
    y = range(len(ok))
    step = [r["step_s"] for r in ok]
    spread = [[s - r["step_min_s"] for s, r in zip(step, ok)], [r["step_max_s"] - s for s, r in zip(step, ok)]]
    a.barh(y, step, xerr=spread, color="C0")
    a.set_yticks(list(y), names)
    a.invert_yaxis()
    a.set_xlabel(f"seconds per search step on {device.type} (median, min-max)")
    b.barh([i - 0.2 for i in y], [r["search_s"] / 86400 for r in ok], height=0.4, color="C1",
           label=f"measured here ({device.type}), extrapolated")
    paper = [PAPER_GPU_DAYS.get("darts (2nd order)" if n == "darts-2nd" else n) for n in names]
    b.barh([i + 0.2 for i, p in zip(y, paper) if p], [p for p in paper if p], height=0.4, color="C2",
           label="paper (GPU-days, their GPUs)")
    b.set_yticks(list(y), names)
    b.invert_yaxis()
    b.set_xscale("log")
    b.set_xlabel("whole search (days)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# =====================================================================================
# main
# =====================================================================================
def selected(text):
    """--methods all | a,b,c -> the list (files that exist; proxylessnas.py only where present)."""
    known = [m for m in METHODS if (ROOT / f"{m}.py").exists()]
    known.insert(1, "darts-2nd")
    if text == "all":
        return known
    names = [m.strip() for m in text.split(",") if m.strip()]
    for m in names:
        if m not in known:
            hint = common.difflib.get_close_matches(m, known, n=1)
            raise UsageError(f"unknown method {m!r} in --methods; choose from all, {', '.join(known)}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if not names:
        raise UsageError("--methods is empty; give all or a comma-separated list")
    return names


def main(args):
    args.resume = ""  # (not a flag) common.check_out_dir asks it: bench.py never resumes
    common.check_args(args)
    device = common.get_device(args.device)
    args.device = str(device)
    if args.amp and device.type != "cuda":
        raise UsageError("--amp needs a CUDA device (bfloat16 autocast); drop --amp on CPU")
    methods = selected(args.methods)
    switches = {name: getattr(args, name) for name in ("channels_last", "compile", "amp")}
    switches["no_torch_deterministic"] = not args.torch_deterministic
    out_dir = Path(args.out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = out_dir / "runs" if args.keep_runs else Path(tmp)
        for name in methods:  # every method's flags are checked before any run
            parse_method_args(name, args, runs_dir / "check", args.warmup + args.steps, switches)
        out_dir.mkdir(parents=True, exist_ok=True)
        results, checks = [], []
        for name in methods:
            t0 = time.perf_counter()
            try:
                results.append(bench_method(name, args, runs_dir, switches))
                if args.check_switches:
                    checks += check_switches(name, args, runs_dir, device)
            except Exception as e:  # a method that fails mid-run: one line, the others still run
                results.append({"method": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(f"bench: {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    text = table(results, device)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                f", {torch.get_num_threads()} threads") + f", torch {torch.__version__}")
    print(text)
    if any(r.get("timing") == "mean" for r in results):
        print("* mean step including the warm-up steps (the method's history has no per-step times)")
    for c in checks:
        verdict = "skipped" if c["ok"] is None else "ok" if c["ok"] else "FAIL"
        detail = c.get("note") or (f"loss {c['loss']:.6f} vs plain {c['plain_loss']:.6f}, "
                                   f"rel diff {c['rel_diff']:.2e} (rtol {c['rtol']:g})")
        print(f"switch {c['method']} {c['switch']}: {verdict}: {detail}")
    common.write_json(out_dir / "bench.json", {
        "command": "python bench.py " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "bench.py" else None,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "args": dataclasses.asdict(args),
        "paper_gpu_days": PAPER_GPU_DAYS, "results": results, "switch_checks": checks})
    if any("error" not in r for r in results):
        plot(results, device, out_dir / "bench.png")
    print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
    failed = any("error" in r for r in results) or any(c["ok"] is False for c in checks)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(common.cli(main, Args))
