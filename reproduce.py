"""reproduce.py: a NAS paper's evaluation protocol in one command, with a random-architecture control.

A NAS result means little from one search and one retraining. DARTS (Liu, Simonyan, Yang, ICLR 2019,
arXiv:1806.09055 v2) evaluates a method in three steps (PC-DARTS and P-DARTS say they follow it):
    1. search S times with different seeds (Sec. 3.2: "we run DARTS four times with different random seeds");
    2. retrain every searched cell from scratch for a short period and measure it on held-out training data
       (Sec. 3.2: "pick the best cell based on its validation performance obtained by training from scratch for
       a short period (100 epochs on CIFAR-10 ...)"; "the test set is never used for architecture search or
       architecture selection");
    3. retrain the chosen cell F times at full settings and report the mean and standard deviation of the test
       error (A.2.1: "the mean and standard deviation of 10 independent runs").
The control: cells sampled uniformly from the method's search space, selected and retrained with the same
protocol and seeds (DARTS Table 1, "Random search baseline": "best architecture among 24 samples according to
the validation error after 100 training epochs"; Li & Talwalkar, UAI 2019; Yang et al., ICLR 2020).

    python reproduce.py darts --unrolled --search-seeds 4 --select-epochs 100 --final-seeds 10 --random-cells 24

Every flag reproduce.py does not know goes unchanged to every run of the method file. Each run is the method
file itself in a subprocess (one job per GPU with --gpus, a Slurm job with --slurm), in one folder:
    search-s{s}/            METHOD.py --seed s --no-retrain
    cells/random-c{i}.json  random cell i, sampled with random.Random(i)
    select-s{s}/, select-random-c{i}/
                            METHOD.py --seed 0 --genotype <cell> --retrain-epochs E --retrain-val-portion P
    final-s{best}-seed{k}/, final-random-c{best}-seed{k}/
                            METHOD.py --seed k --genotype <best cell>
    results.csv, results.md, results.png, log.txt, logs/<run>.txt (each run's output), reproduce.json
Give the same command again (with --out) and finished runs (results.json) are skipped, runs with args.json but
no results.json are continued with METHOD.py --resume, and the rest start.

Decisions, each ours unless cited:
    - --select-val-portion 0.5: the part of the training set held out for selection. DARTS measures the
      "validation performance" (Sec. 3.2) of its validation set, which is half of the CIFAR-10 training data
      (A.1.1: "we hold out half of the CIFAR-10 training data as the validation set").
    - Selection runs train the full-size network (only --retrain-epochs changes; Sec. 3.2 names no other change,
      and Table 1's caption puts the selection at 1 GPU-day for 4 x 100 epochs against 1.5 for one 600-epoch
      final run, consistent with the same network), every candidate with --seed 0, so all candidates see the same
      initialisation stream and data order.
    - Final runs use seeds 0..F-1, the same for the method's cell and the random cell.
    - Ties in selection go to the lower search seed / cell index. The selection reads only val_acc from the
      selection runs' results.json and stops if one of them holds a test accuracy.
    - Test error = 100 - the final run's test accuracy (its last epoch, common.py C4); std is the sample
      standard deviation (n - 1), which the papers do not specify.
    - Search GPU-hours = the search run's results.json "seconds" (the sum of its epoch times) / 3600, one device.
"""

import argparse
import csv
import difflib
import importlib
import json
import logging
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common
from common import UsageError

ROOT = Path(__file__).resolve().parent

# =====================================================================================
# Methods, their search spaces and the random-cell samplers
# =====================================================================================
# method file -> the search space its cells come from (the key of SAMPLERS). A new method file joins with one
# entry here, with its sampler in SAMPLERS below.
METHODS = {"darts": "darts", "pc_darts": "darts", "p_darts": "darts", "gdas": "darts", "daas": "darts",
           "idarts": "darts", "vim_nas": "darts", "snas": "edge_all", "enas": "enas", "proxylessnas": "proxylessnas"}


def sample_darts(rng, args):
    """The DARTS space (Sec. 2.1, App. C): each of the 4 intermediate nodes reads two distinct earlier states
    (one of the C(k, 2) pairs of its k = 2..5 states, uniformly) through one of the 7 non-zero ops each
    (uniformly): every one of the prod_k C(k, 2) * 7^2 ~ 1e9 cells of App. C per cell type is equally likely."""
    ops = [p for p in common.PRIMITIVES if p != "none"]

    def cell():
        return [(rng.choice(ops), j) for node in range(4) for j in sorted(rng.sample(range(node + 2), 2))]

    normal, reduce = cell(), cell()
    return common.genotype_to_dict(common.Genotype(normal, [2, 3, 4, 5], reduce, [2, 3, 4, 5]))


def sample_edge_all(rng, args):
    """SNAS's child networks ("edge_all", snas.py's derivation): each of the 14 edges keeps one of the 8 ops,
    'none' included, uniformly; written in the two-inputs-per-node form that snas.py writes (edge_all_to_cell)."""
    import snas  # only for its converter

    def cell():
        return [(rng.choice(common.PRIMITIVES), j) for node in range(4) for j in range(node + 2)]

    return common.genotype_to_dict(snas.edge_all_to_cell(common.Genotype(cell(), [2, 3, 4, 5], cell(), [2, 3, 4, 5])))


def sample_enas(rng, args):
    """The ENAS micro space (melodyguan/enas README: "index_1 and index_2 can be any previous index", 5 ops):
    each of --nodes nodes reads two earlier states, drawn independently (the same one twice allowed), through
    one of the 5 ops each; the nodes no node reads are the output, as enas.py derives its cells."""
    import enas  # only for its op list and arc_to_genotype

    def arc():  # [index_1, op_1, index_2, op_2] per node
        return [x for i in range(args.nodes) for _ in range(2) for x in (rng.randrange(i + 2),
                                                                          rng.randrange(len(enas.ENAS_OPS)))]

    return common.genotype_to_dict(enas.arc_to_genotype((arc(), arc())))


def sample_nb201(rng, args):
    """The NAS-Bench-201 space (--space nb201 of a method file): each of the cell's 6 edges one of the
    benchmark's 5 ops, 'none' included, uniformly, so each of the 15625 cells is equally likely; written as
    genotype.json writes an arch string (the arch and its benchmark index)."""
    return common.genotype_to_dict(common.nb201_arch_str(rng.choice(common.NB201_PRIMITIVES)
                                                         for _ in common.NB201_EDGES))


def space_of(method, args):
    """The key of SAMPLERS for this method run with these flags: its NAS-Bench-201 space under --space nb201."""
    return "nb201" if getattr(args, "space", "darts") == "nb201" else METHODS[method]


def sample_proxylessnas(rng, args):
    """ProxylessNAS's space on the run's backbone (--init-channels, --layers): each searchable layer one of its
    candidates uniformly, 'zero' included where the layer allows it (proxylessnas.py layer_plan)."""
    import proxylessnas  # only for its space

    space = proxylessnas.search_space(args)
    return {**space, "ops": [rng.choice(c) for c in proxylessnas.choices(proxylessnas.layer_plan(space))]}


SAMPLERS = {"darts": sample_darts, "edge_all": sample_edge_all, "enas": sample_enas, "nb201": sample_nb201,
            "proxylessnas": sample_proxylessnas}
# sampler(rng, method_args) -> the JSON object of a genotype.json that METHOD.py --genotype reads

PUBLISHED = {  # CIFAR-10 test error (%) as published: (label, mean, std or None, source); drawn on results.png
    "darts": [("DARTS 2nd order", 2.76, 0.09, "DARTS arXiv:1806.09055v2 Table 1; quark0/darts README (10 runs)"),
              ("DARTS 1st order", 3.00, 0.14, "DARTS arXiv:1806.09055v2 Table 1")],
    "pc_darts": [("PC-DARTS", 2.57, 0.07, "yuhuixu1993/PC-DARTS README table (2.57); the author in PC-DARTS "
                  "issue #47: 97.43 +- 0.07 accuracy, best of 4 searches retrained 4 times")],
    "snas": [("SNAS", 2.85, None, "as listed in the yuhuixu1993/PC-DARTS README table")],
    "enas": [("ENAS + cutout", 2.89, None, "as listed in DARTS Table 1"),
             ("ENAS, best of 8 searches, DARTS protocol", 2.91, None, "DARTS Table 1 (footnote *)")],
    "random": [("DARTS's random baseline, best of 24", 3.29, 0.15, "DARTS arXiv:1806.09055v2 Table 1")],
}
# Not drawn (no number we could check in a paper or official README): p_darts, gdas, daas, idarts, vim_nas.

CONTROLLED = {"seed", "out_dir", "run_name", "genotype", "no_retrain", "resume", "retrain_val_portion"}
SELECT_SEED = 0


# =====================================================================================
# Command line: every check before anything is written
# =====================================================================================
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = _Parser(prog="reproduce.py", usage="python reproduce.py METHOD [options] [method flags ...]",
                description=__doc__.split("\n\n")[0], allow_abbrev=False,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                epilog=f"METHOD: {', '.join(METHODS)}. Every other flag goes unchanged to every run of METHOD.py "
                       "(python METHOD.py --help lists them), e.g. python reproduce.py darts --unrolled "
                       "--search-seeds 4 --select-epochs 100 --final-seeds 10 --random-cells 24")
    p.add_argument("--search-seeds", type=int, default=4, help="searches, seeds 0..S-1 (DARTS Sec. 3.2: four)")
    p.add_argument("--select-epochs", type=int, default=100,
                   help="retraining epochs of each selection run (DARTS Sec. 3.2: 100 on CIFAR-10)")
    p.add_argument("--final-seeds", type=int, default=10,
                   help="retrainings of the chosen cell, seeds 0..F-1 (DARTS A.2.1: 10 independent runs)")
    p.add_argument("--random-cells", type=int, default=0,
                   help="random cells of the method's space as a control (DARTS Table 1 baseline: 24)")
    p.add_argument("--select-val-portion", type=float, default=0.5,
                   help="part of the training set held out for selection (DARTS A.1.1: half)")
    p.add_argument("--out", default="", help="the protocol's folder; default runs/reproduce-METHOD-<time>; "
                   "give it again to skip finished runs and resume killed ones")
    p.add_argument("--gpus", default="", help="comma list of GPU ids: one job per GPU at a time "
                   "(CUDA_VISIBLE_DEVICES); default: one job at a time on what the method file picks")
    p.add_argument("--slurm", default="", help="submit every run as a Slurm job to this partition through "
                   "submitit (one GPU each); 'local' runs the jobs with submitit's LocalExecutor (tests, no Slurm)")
    p.add_argument("--slurm-time", type=int, default=4320,
                   help="Slurm time limit per job in minutes (DARTS A.2.1: a 600-epoch retraining takes 1.5 "
                   "GPU-days); a job that hits it is resumed by the next identical command")
    p.add_argument("--slurm-cpus", type=int, default=4, help="CPUs per Slurm job (the method files' default "
                   "--workers 2 plus the main process)")
    return p


def parse(argv):
    """Returns (opts, method_args, method_flags); raises UsageError (one line) on any bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        build_parser().print_help()
        sys.exit(0)
    if not argv or argv[0].startswith("-"):
        raise UsageError(f"the first argument is the method, one of {', '.join(METHODS)}")
    method, (opts, flags) = argv[0], build_parser().parse_known_args(argv[1:])
    if method.endswith(".py"):
        method = method[:-3]
    if method not in METHODS:
        hint = difflib.get_close_matches(method, list(METHODS), n=1)
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if not (ROOT / f"{method}.py").is_file():
        raise UsageError(f"{method}.py is not in {ROOT}")
    opts.method = method
    for name, lo in (("search_seeds", 0), ("select_epochs", 1), ("final_seeds", 1), ("random_cells", 0),
                     ("slurm_time", 1), ("slurm_cpus", 1)):
        if getattr(opts, name) < lo:
            raise UsageError(f"{common.flag(name)} must be >= {lo}, got {getattr(opts, name)}")
    if opts.search_seeds == 0 and opts.random_cells == 0:
        raise UsageError("--search-seeds 0 and --random-cells 0: there is no cell to evaluate")
    if not 0 < opts.select_val_portion < 1:
        raise UsageError(f"--select-val-portion must be in (0, 1), got {opts.select_val_portion}")
    opts.gpu_list = parse_gpus(opts.gpus)
    if opts.gpus and opts.slurm:
        raise UsageError("--gpus runs jobs on this machine, --slurm on a cluster; pick one")
    if opts.slurm:
        try:
            import submitit  # noqa: F401  (only when --slurm is used)
        except ImportError:
            raise UsageError("--slurm needs submitit: pip install -r requirements.txt") from None
        if opts.slurm != "local" and not shutil.which("sbatch"):
            raise UsageError(f"--slurm {opts.slurm}: no sbatch on this machine's PATH (run from a Slurm login node)")
    opts.out = Path(opts.out or f"runs/reproduce-{method}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    args = method_args(method, flags, opts.out)
    opts.space = space_of(method, args)  # the key of SAMPLERS, from the parsed method flags
    if opts.gpu_list and args.device == "cpu":
        raise UsageError("--gpus gives each job a GPU, but --device cpu keeps it off; drop one of them")
    check_out(opts, flags)
    if opts.random_cells and opts.space not in SAMPLERS:
        raise UsageError(f"--random-cells: no sampler for {method}'s search space {opts.space!r} yet")
    if opts.random_cells:
        SAMPLERS[opts.space](random.Random(0), args)  # fails here, not after the searches
    return opts, args, flags


def parse_gpus(text):
    if not text:
        return []
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"--gpus takes GPU ids separated by commas (0,1,2,3), got {text!r}") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise UsageError(f"--gpus {text}: ids must be distinct and >= 0")
    return ids


def method_args(method, flags, out):
    """The method file's own parser and checks on the flags passed through (so a bad one stops here, not in
    the first run); the flags reproduce.py sets per run are refused, however they were spelled."""
    module = importlib.import_module(method)
    try:
        args = common.parse_args(module.Args, flags)
    except UsageError as e:
        raise UsageError(f"{method}.py: {e}") from None
    given = sorted(args.typed & CONTROLLED)
    if given:
        raise UsageError(f"{common.flag(given[0])} is set by reproduce.py for each run; drop it")
    args.out_dir = str(out)  # the runs go there: it must be a folder we can write in
    try:
        common.check_args(args)
    except UsageError as e:
        raise UsageError(str(e).replace("--out-dir", "--out")) from None
    common.check_data(args)  # data folder, classes, download: before anything is written
    return args


def protocol(opts, flags):
    """What the folder holds: a second command with the same protocol continues it, another one is refused."""
    return {"method": opts.method, "method_flags": flags, "search_seeds": opts.search_seeds,
            "select_epochs": opts.select_epochs, "select_val_portion": opts.select_val_portion,
            "select_seed": SELECT_SEED, "final_seeds": opts.final_seeds, "random_cells": opts.random_cells}


def check_out(opts, flags):
    out = opts.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    saved = out / "reproduce.json"
    if saved.exists():
        old, new = json.loads(saved.read_text()), protocol(opts, flags)
        for key in new:
            if old.get(key) != new[key]:
                raise UsageError(f"--out {out} holds another protocol ({key} {old.get(key)!r} there, {new[key]!r} "
                                 "here); give the same command or another --out")
    for what, alive in still_running(out):
        raise UsageError(f"--out {out}: {what} of an earlier reproduce.py is still running; wait for it or stop it")


# =====================================================================================
# The protocol as runs: what can run now, given what the folder holds
# =====================================================================================
def cells(opts):
    """(group, index, cell name, genotype.json, selection run) of every candidate cell."""
    out = opts.out
    rows = [(opts.method, s, f"s{s}", out / f"search-s{s}" / "genotype.json", f"select-s{s}")
            for s in range(opts.search_seeds)]
    return rows + [("random", i, f"random-c{i}", out / "cells" / f"random-c{i}.json", f"select-random-c{i}")
                   for i in range(opts.random_cells)]


def read_results(run_dir):
    path = Path(run_dir) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def select_val_acc(run_dir):
    """The selection accuracy of one selection run: held-out training images only."""
    res = read_results(run_dir)
    if res is None:
        return None
    retrain = res.get("retrain", {})
    if "test_acc" in retrain or "val_acc" not in retrain:
        raise RuntimeError(f"{run_dir}/results.json has no val_acc or holds a test accuracy: a selection run "
                           "must be evaluated on held-out training images only")
    return retrain["val_acc"]


def select_best(opts, group):
    """The group's cell with the highest selection accuracy (ties: the lower seed / index), or None while a
    selection run of the group has not finished."""
    rows = [c for c in cells(opts) if c[0] == group]
    accs = [select_val_acc(opts.out / c[4]) for c in rows]
    if not rows or any(a is None for a in accs):
        return None
    return max(zip(rows, accs), key=lambda ra: (ra[1], -ra[0][1]))[0]


def plan(opts, flags):
    """Every run whose inputs exist now, as (name, argv): all searches; a selection run once its search has
    finished (genotype.json is rewritten every search epoch) or its random cell is written; the final runs of a
    group once all its selection runs have finished."""
    py, script, out = sys.executable, str(ROOT / f"{opts.method}.py"), str(opts.out)
    base = [py, script, *flags]
    jobs = [(f"search-s{s}", base + ["--seed", str(s), "--no-retrain", "--out-dir", out, "--run-name", f"search-s{s}"])
            for s in range(opts.search_seeds)]
    for group, _, _, genotype, select in cells(opts):
        if genotype.is_file() and (group == "random" or (genotype.parent / "results.json").is_file()):
            jobs.append((select, base + ["--seed", str(SELECT_SEED), "--genotype", str(genotype), "--retrain-epochs",
                                         str(opts.select_epochs), "--retrain-val-portion", str(opts.select_val_portion),
                                         "--out-dir", out, "--run-name", select]))
    for group in dict.fromkeys(c[0] for c in cells(opts)):
        best = select_best(opts, group)
        if best is not None:
            for k in range(opts.final_seeds):
                name = f"final-{best[2]}-seed{k}"
                jobs.append((name, base + ["--seed", str(k), "--genotype", str(best[3]), "--out-dir", out,
                                           "--run-name", name]))
    return jobs


def write_random_cells(opts, args):
    (opts.out / "cells").mkdir(exist_ok=True)
    for _, i, _, path, _ in cells(opts):
        if path.parent.name == "cells" and not path.exists():
            common.write_json(path, SAMPLERS[opts.space](random.Random(i), args))


# =====================================================================================
# Running the jobs: subprocesses (one per GPU) or submitit (Slurm, or its LocalExecutor)
# =====================================================================================
class Local:
    """One job per slot at a time; a slot is a GPU id (CUDA_VISIBLE_DEVICES) or None (the environment as is)."""

    def __init__(self, gpus):
        self.free, self.procs = list(gpus) or [None], {}

    def start(self, name, cmd, log_path):
        slot = self.free.pop(0)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        with open(log_path, "a") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        self.procs[name] = (proc, slot)
        return ("pid", proc.pid)

    def has_room(self):
        return bool(self.free)

    def poll(self):
        """The (name, exit code) of every job that has ended."""
        ended = [(n, p.returncode) for n, (p, _) in self.procs.items() if p.poll() is not None]
        for n, _ in ended:
            self.free.append(self.procs.pop(n)[1])
        return ended

    def stop(self):
        """Ctrl-C / SIGTERM: every run ends as a method file ends on Ctrl-C (its folder resumable). Ctrl-C in a
        terminal has already reached the runs too, so each gets a few seconds before its own SIGINT."""
        for proc, _ in self.procs.values():
            for sig, wait in ((None, 5), (signal.SIGINT, 60), (signal.SIGKILL, None)):
                if sig is not None:
                    proc.send_signal(sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    pass


class Submitit:
    """Every job submitted at once to Slurm (one GPU each), or to submitit.LocalExecutor with --slurm local."""

    def __init__(self, partition, folder, minutes, cpus):
        import submitit

        self.local = partition == "local"
        if self.local:
            self.executor = submitit.LocalExecutor(folder=folder)
            self.executor.update_parameters(timeout_min=minutes)
        else:
            self.executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
            self.executor.update_parameters(slurm_partition=partition, timeout_min=minutes, gpus_per_node=1,
                                            cpus_per_task=cpus, tasks_per_node=1, nodes=1)
        self.helpers, self.jobs = submitit.helpers, {}

    def start(self, name, cmd, log_path):
        if not self.local:
            self.executor.update_parameters(name=name)
        # submitit's own CommandFunction runs the method file; its output goes to the run's log, not the pickle
        # (the job's own environment, so Slurm's CUDA_VISIBLE_DEVICES and SLURM_* stay as the job has them)
        shell = ["/bin/sh", "-c", 'PYTHONUNBUFFERED=1 exec "$@" >> "$0" 2>&1', str(log_path), *cmd]
        job = self.executor.submit(self.helpers.CommandFunction(shell, verbose=False))
        self.jobs[name] = job
        return ("local" if self.local else "slurm", job.job_id)

    def has_room(self):
        return True

    def poll(self):
        ended = []
        for name, job in list(self.jobs.items()):
            if job.done():
                try:
                    job.result()
                    rc = 0
                except Exception:  # submitit raises the job's failure; its output is in the run's log
                    rc = 1
                ended.append((name, rc))
                del self.jobs[name]
        return ended

    def stop(self):
        pass  # queued and running jobs go on; an identical command waits for them (still_running)


def still_running(out):
    """Jobs of an earlier reproduce.py on this folder that are still alive: (what, id) pairs."""
    lock = out / ".jobs.json"
    if not lock.is_file():
        return []
    alive = []
    for name, (kind, job_id) in json.loads(lock.read_text()).items():
        if kind in ("pid", "local", "reproduce") and _pid_alive(int(job_id)):
            alive.append((f"{name} (pid {job_id})", job_id))
        elif kind == "slurm" and _slurm_alive(out, job_id):
            alive.append((f"{name} (Slurm job {job_id})", job_id))
    return alive


def _pid_alive(pid):
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process nobody has reaped yet is a zombie: not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _slurm_alive(out, job_id):
    import submitit

    state = submitit.SlurmJob(folder=out / "submitit", job_id=job_id).state
    return state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")


def run_all(opts, flags, backend, log):
    """Start every run that can run, as slots allow, until none is left. Returns the names of failed runs."""
    jobs_file, live = opts.out / ".jobs.json", {"reproduce": ("reproduce", os.getpid())}
    common.write_json(jobs_file, live)
    failed, running, seen = [], set(), set()
    while True:
        for name, cmd in plan(opts, flags):
            run_dir = opts.out / name
            if name in running or name in failed:
                continue
            if (run_dir / "results.json").is_file():
                if name not in seen:
                    log.info("skip %s: finished (results.json)", name)
                seen.add(name)
                continue
            if not backend.has_room():
                break
            if (run_dir / "args.json").is_file():
                cmd = [cmd[0], cmd[1], "--resume", str(run_dir)]
                log.info("resume %s: %s", name, " ".join(cmd[1:]))
            elif run_dir.exists() and not any(run_dir.iterdir()):
                run_dir.rmdir()  # killed between mkdir and args.json: nothing to keep
                log.info("start %s (its empty folder removed): %s", name, " ".join(cmd[1:]))
            elif run_dir.exists():
                log.error("%s exists without args.json, so it is not a run folder; move it away", run_dir)
                failed.append(name)
                continue
            else:
                log.info("start %s: %s", name, " ".join(cmd[1:]))
            seen.add(name)
            live[name] = backend.start(name, cmd, opts.out / "logs" / f"{name}.txt")
            running.add(name)
            common.write_json(jobs_file, live)
        if not running:
            break
        time.sleep(0.2)
        for name, rc in backend.poll():
            running.discard(name)
            live.pop(name, None)
            common.write_json(jobs_file, live)
            if rc == 0 and (opts.out / name / "results.json").is_file():
                log.info("done %s", name)
            else:
                tail = (opts.out / "logs" / f"{name}.txt").read_text().strip().splitlines()[-1:] or [""]
                log.error("FAILED %s (exit %s): %s  [all output: %s]", name, rc, tail[0],
                          opts.out / "logs" / f"{name}.txt")
                failed.append(name)
    jobs_file.unlink()
    return failed


# =====================================================================================
# Results: results.csv, results.md, results.png
# =====================================================================================
def collect(opts):
    """One row per cell: selection accuracy, and for the chosen cell of each group every final test error."""
    rows = []
    for group, index, cell, genotype, select in cells(opts):
        best = select_best(opts, group)
        search = (read_results(opts.out / f"search-s{index}") or {}).get("search", {}) if group != "random" else {}
        selected = read_results(opts.out / select) or {}
        row = {"group": group, "cell": cell, "select_val_acc": select_val_acc(opts.out / select),
               "selected": int(best is not None and best[2] == cell),
               "params_M": selected.get("retrain", {}).get("params_M"),
               "search_gpu_hours": search["seconds"] / 3600 if "seconds" in search else (0.0 if group == "random"
                                                                                          else None),
               "genotype": str(genotype.relative_to(opts.out))}
        errors = []
        for k in range(opts.final_seeds):
            res = read_results(opts.out / f"final-{cell}-seed{k}") if row["selected"] else None
            err = 100.0 - res["retrain"]["test_acc"] if res else None
            row[f"test_error_seed{k}"] = err
            errors += [err] if err is not None else []
        row["test_error_mean"] = statistics.mean(errors) if errors else None
        row["test_error_std"] = statistics.stdev(errors) if len(errors) > 1 else None
        row["finals_done"] = len(errors)
        rows.append(row)
    return rows


def fmt(v, digits=2):
    return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_results(opts, flags, rows):
    out, keys = opts.out, list(rows[0])
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    cmd = shlex.join(["python", "reproduce.py", opts.method, *flags, "--search-seeds", str(opts.search_seeds),
                      "--select-epochs", str(opts.select_epochs), "--final-seeds", str(opts.final_seeds),
                      "--random-cells", str(opts.random_cells), "--select-val-portion", str(opts.select_val_portion),
                      "--out", str(out)])
    lines = [f"# {opts.method}: the DARTS evaluation protocol", "", f"`{cmd}`", "",
             f"{opts.search_seeds} searches and {opts.random_cells} random cells, each retrained "
             f"{opts.select_epochs} epochs on {opts.select_val_portion:g} of the training set held out; the best "
             f"cell of each group (by val accuracy, never test) retrained with seeds 0..{opts.final_seeds - 1}.", ""]
    for r in rows:
        if r["selected"] and r["test_error_mean"] is not None:
            std = f" +- {r['test_error_std']:.2f}" if r["test_error_std"] is not None else ""
            lines.append(f"- **{r['group']}**: cell {r['cell']} (val acc {r['select_val_acc']:.2f} %), test error "
                         f"**{r['test_error_mean']:.2f}{std} %** over {r['finals_done']} seeds, "
                         f"{fmt(r['params_M'], 3)} M params")
    lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    refs = PUBLISHED.get(opts.method, []) + (PUBLISHED["random"] if opts.space == "darts" else [])
    if refs:
        lines += ["", "Published CIFAR-10 test errors (drawn on results.png when --dataset cifar10):", ""]
        lines += [f"- {label}: {mean}" + (f" +- {std}" if std else "") + f" % ({src})"
                  for label, mean, std, src in refs]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_results(opts, rows, refs, out / "results.png")


def plot_results(opts, rows, refs, path):
    """Test error of every final seed (dots, numbered by seed), the method's chosen cell beside the random one,
    mean +- std beside each; the published CIFAR-10 numbers as lines (only when the dataset is CIFAR-10)."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    chosen = [r for r in rows if r["selected"]]
    for x, (r, color) in enumerate(zip(chosen, ("tab:blue", "tab:orange"))):
        errors = [(k, r[f"test_error_seed{k}"]) for k in range(opts.final_seeds)
                  if r[f"test_error_seed{k}"] is not None]
        offsets = np.linspace(-0.15, 0.15, opts.final_seeds) if opts.final_seeds > 1 else [0.0]
        ax.scatter([x + offsets[k] for k, _ in errors], [e for _, e in errors], color=color, zorder=3)
        for k, e in errors:
            ax.annotate(str(k), (x + offsets[k], e), textcoords="offset points", xytext=(4, 3), fontsize=6)
        if r["test_error_mean"] is not None:
            ax.errorbar(x + 0.28, r["test_error_mean"], yerr=r["test_error_std"] or 0, fmt="s", color=color,
                        capsize=4, label=f"{r['group']}: {r['test_error_mean']:.2f}"
                        + (f" +- {r['test_error_std']:.2f}" if r["test_error_std"] is not None else "") + " %")
    dataset = json.loads((opts.out / "reproduce.json").read_text()).get("dataset", "")
    if dataset == "cifar10":
        for (label, mean, std, _), color in zip(refs, ("tab:green", "tab:red", "tab:purple", "tab:gray")):
            ax.axhline(mean, color=color, ls="--", lw=1,
                       label=f"published: {label} {mean}" + (f" +- {std}" if std else ""))
            if std:
                ax.axhspan(mean - std, mean + std, color=color, alpha=0.1)
        ax.set_title(f"{opts.method} on CIFAR-10: test error of the chosen cells (sources in results.md)", fontsize=9)
    else:
        ax.set_title(f"{opts.method} on {dataset}: test error of the chosen cells (the published numbers are "
                     "CIFAR-10's: not drawn)", fontsize=9)
    ax.set_xticks(range(len(chosen)), [f"{r['group']}\ncell {r['cell']}" for r in chosen])
    ax.set_xlim(-0.5, len(chosen) - 0.5 + 0.1)
    ax.set_ylabel("test error (%), one dot per final seed")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# =====================================================================================
# main
# =====================================================================================
def _interrupt(signum, frame):  # SIGTERM (kill, Slurm's scancel of reproduce.py itself) ends like Ctrl-C
    raise KeyboardInterrupt


def main(argv=None):
    try:
        opts, args, flags = parse(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = opts.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    common.write_json(out / "reproduce.json", {**protocol(opts, flags), "dataset": args.dataset})
    log = logging.getLogger(f"reproduce.{out}")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.handlers.clear()
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(out / "log.txt")):
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.info("reproduce.py %s in %s", " ".join(sys.argv[1:] if argv is None else argv), out)
    log.info("the same command with --out %s skips what has finished and resumes what was killed", out)
    write_random_cells(opts, args)
    backend = Submitit(opts.slurm, out / "submitit", opts.slurm_time, opts.slurm_cpus) if opts.slurm \
        else Local(opts.gpu_list)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        failed = run_all(opts, flags, backend, log)
        rows = collect(opts)
    except KeyboardInterrupt:
        backend.stop()
        log.error("interrupted; give the same command (with --out %s) to continue", out)
        return 130
    except RuntimeError as e:  # a selection run that read the test set: no result is reported
        backend.stop()
        log.error("error: %s", e)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_results(opts, flags, rows)
    if failed:
        log.error("%d runs failed (%s); fix the cause and give the same command with --out %s to continue",
                  len(failed), ", ".join(failed), out)
        return 1
    log.info("done: %s", out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
