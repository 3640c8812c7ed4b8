"""reproduce.py: the DARTS evaluation protocol end to end on CPU, its test-set-free selection, skip and resume,
the submitit path, the random-cell samplers and the bad-input table."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, read_jsonl

import common
import reproduce

RUNS = ["search-s0", "search-s1", "select-s0", "select-s1", "select-random-c0", "select-random-c1"]
COLUMNS = ["group", "cell", "select_val_acc", "selected", "params_M", "search_gpu_hours", "genotype",
           "test_error_seed0", "test_error_seed1", "test_error_mean", "test_error_std", "finals_done"]


def write_digits_folder(root, corrupt_val):
    """scikit-learn's digits as an ImageFolder (60 train / 20 val images per class, 8x8 PNG). corrupt_val: the
    val/ (test) files are not images, so any run that reads one test image stops with 'cannot read image'."""
    from PIL import Image
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    for split, per_class, offset in (("train", 60, 0), ("val", 20, 60)):
        for c in range(10):
            folder = Path(root, split, str(c))
            folder.mkdir(parents=True, exist_ok=True)
            for i, k in enumerate(np.flatnonzero(y == c)[offset:offset + per_class]):
                path = folder / f"{i}.png"
                if split == "val" and corrupt_val:
                    path.write_bytes(b"this is not an image")
                else:
                    Image.fromarray((x[k].reshape(8, 8) * 15).astype(np.uint8)).save(path)


def tiny(data):  # --device auto (the default): CPU here, and --gpus is allowed
    return ["--workers", "0", "--dataset", "imagefolder", "--data", str(data), "--image-size", "8",
            "--epochs", "2", "--batch-size", "32", "--steps-per-epoch", "3", "--init-channels", "4", "--layers", "3",
            "--retrain-epochs", "1", "--retrain-init-channels", "4", "--retrain-layers", "3",
            "--retrain-batch-size", "32"]


def reproduce_cmd(data, out, *extra):
    return [sys.executable, str(ROOT / "reproduce.py"), "darts", *tiny(data), "--search-seeds", "2", "--random-cells",
            "2", "--final-seeds", "2", "--select-epochs", "1", "--out", str(out), *extra]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def results_mtimes(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in Path(out).glob("*/results.json")}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_protocol_end_to_end(tmp_path):
    """The whole protocol (2 searches, 2 random cells, 2 final seeds) in four commands:
    1. killed (SIGKILL, reproduce.py and its runs) during the first search, then 2. given again: the search is
       resumed with darts.py --resume, all selection runs finish, and every final run fails, because the test
       split (val/) holds no readable image. That is the guard of test-set-free selection: a selection run that
       read one test image (reproduce.py forgetting --retrain-val-portion, common.retrain_data evaluating on the
       test set, any new code path) would have died exactly as the final runs did;
    3. the test images repaired, the same command through submitit's LocalExecutor (--slurm local): finished runs
       skipped, the failed final runs resumed; 4. the same command again: nothing runs, nothing is rewritten."""
    data, out = tmp_path / "digits", tmp_path / "out"
    write_digits_folder(data, corrupt_val=True)
    cmd = reproduce_cmd(data, out)
    two_slots = cmd + ["--gpus", "0,1"]  # two jobs at a time (each with its CUDA_VISIBLE_DEVICES; CPU here)

    # 1. SIGKILL during the first search (after its first epoch is checkpointed)
    proc = subprocess.Popen(two_slots, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t0 = time.time()
    while not (out / "search-s0" / "checkpoint_search.pt").exists():
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "search-s0" / "args.json").exists() and not (out / "search-s0" / "results.json").exists()

    # 2. the same command: the killed search resumes; selection succeeds; the finals cannot read the test split
    done = subprocess.run(two_slots, cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "resume search-s0" in log and "resuming" in (out / "search-s0" / "log.txt").read_text()
    assert [r["epoch"] for r in read_jsonl(out / "search-s0" / "search_history.jsonl")] == [0, 1]
    for name in RUNS[2:]:
        assert (out / name / "results.json").exists(), f"{name} failed; did it read the test split? " + \
            (out / "logs" / f"{name}.txt").read_text()[-800:]
        retrain = json.loads((out / name / "results.json").read_text())["retrain"]
        assert "val_acc" in retrain and "test_acc" not in retrain, name
        assert all("val_acc" in r and "test_acc" not in r for r in read_jsonl(out / name / "retrain_history.jsonl"))
    finals = sorted(p.name for p in out.glob("final-*"))
    assert len(finals) == 4  # two seeds of the chosen cell of each group
    for name in finals:  # the trap works: the test split cannot be read
        assert not (out / name / "results.json").exists()
        assert "cannot read image" in (out / name / "log.txt").read_text(), name
    rows = read_csv(out / "results.csv")
    assert [r["cell"] for r in rows] == ["s0", "s1", "random-c0", "random-c1"]
    for group in ("darts", "random"):  # the chosen cell: the best val accuracy, the lower index on a tie
        group_rows = [r for r in rows if r["group"] == group]
        accs = [float(r["select_val_acc"]) for r in group_rows]
        assert [int(r["selected"]) for r in group_rows] == [int(i == int(np.argmax(accs))) for i in range(2)]
        best = group_rows[int(np.argmax(accs))]["cell"]
        assert {f"final-{best}-seed0", f"final-{best}-seed1"} <= set(finals)
    for r in rows:
        select = "select-" + r["cell"]
        val_acc = json.loads((out / select / "results.json").read_text())["retrain"]["val_acc"]
        assert float(r["select_val_acc"]) == val_acc
        assert r["test_error_seed0"] == r["test_error_mean"] == ""
    before = results_mtimes(out)
    assert sorted(before) == sorted(RUNS)

    # 3. test images repaired; the same command through submitit's LocalExecutor
    write_digits_folder(data, corrupt_val=False)
    done = subprocess.run(cmd + ["--slurm", "local"], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {k: v for k, v in results_mtimes(out).items() if k in before} == before  # finished runs skipped
    for name in finals:
        assert "resuming" in (out / name / "log.txt").read_text(), name
    assert list((out / "submitit").glob("*_result.pkl")), "the final runs did not go through submitit"
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == COLUMNS and len(rows) == 4
    for r in rows:
        if r["selected"] == "1":
            errors = [100 - json.loads((out / f"final-{r['cell']}-seed{k}" / "results.json").read_text())["retrain"]
                      ["test_acc"] for k in range(2)]
            assert [float(r[f"test_error_seed{k}"]) for k in range(2)] == pytest.approx(errors)
            assert float(r["test_error_mean"]) == pytest.approx(np.mean(errors))
            assert float(r["test_error_std"]) == pytest.approx(np.std(errors, ddof=1))
            assert float(r["params_M"]) > 0
        else:
            assert r["test_error_seed0"] == r["test_error_mean"] == ""
        search = out / f"search-{r['cell']}" / "results.json"
        gpu_hours = json.loads(search.read_text())["search"]["seconds"] / 3600 if search.exists() else 0.0
        assert float(r["search_gpu_hours"]) == pytest.approx(gpu_hours)
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (out / "results.md").read_text()
    assert "| group | cell |" in md and "**darts**" in md and "**random**" in md

    # 4. the same command once more: nothing starts, nothing is rewritten
    done_runs = results_mtimes(out)
    assert len(done_runs) == 10
    folders = sorted(p.name for p in out.iterdir())
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert results_mtimes(out) == done_runs and sorted(p.name for p in out.iterdir()) == folders
    assert done.stdout.count("skip ") == 10 and " start " not in done.stdout and " resume " not in done.stdout


def test_select_best_reads_only_val_acc(tmp_path):
    """The best cell by val accuracy, ties to the lower seed, None while one is missing; a selection result that
    holds a test accuracy stops the protocol instead of being used."""
    opts = SimpleNamespace(out=tmp_path, method="darts", search_seeds=3, random_cells=0)

    def write(name, retrain):
        (tmp_path / name).mkdir(exist_ok=True)
        common.write_json(tmp_path / name / "results.json", {"retrain": retrain})

    write("select-s0", {"val_acc": 90.0})
    write("select-s1", {"val_acc": 95.0})
    assert reproduce.select_best(opts, "darts") is None  # select-s2 has not finished
    write("select-s2", {"val_acc": 95.0})
    assert reproduce.select_best(opts, "darts")[2] == "s1"  # tie with s2: the lower seed
    write("select-s0", {"val_acc": 99.0, "test_acc": 10.0})
    with pytest.raises(RuntimeError, match="test accuracy"):
        reproduce.select_best(opts, "darts")
    write("select-s0", {"test_acc": 99.0})
    with pytest.raises(RuntimeError, match="no val_acc"):
        reproduce.select_best(opts, "darts")


def test_local_backend_one_job_per_gpu(tmp_path):
    """--gpus 3,5: never more than two jobs at once, each with its own CUDA_VISIBLE_DEVICES."""
    backend, logs, started, ended = reproduce.Local([3, 5]), [], 0, []
    job = ("import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], time.time()); time.sleep(0.3); "
           "print(time.time())")
    while len(ended) < 4:
        while started < 4 and backend.has_room():
            logs.append(tmp_path / f"job{started}.txt")
            backend.start(f"job{started}", [sys.executable, "-c", job], logs[-1])
            started += 1
        assert len(backend.procs) <= 2
        time.sleep(0.05)
        ended += backend.poll()
    assert sorted(rc for _, rc in ended) == [0, 0, 0, 0]
    spans = [(gpu, float(t0), float(t1)) for gpu, t0, t1 in (p.read_text().split() for p in logs)]
    for gpu in ("3", "5"):  # the jobs of one GPU never overlap
        mine = sorted((a, b) for g, a, b in spans if g == gpu)
        assert len(mine) == 2 and mine[0][1] <= mine[1][0]


def test_random_darts_cells_are_uniform_and_seeded():
    """Two distinct inputs per node among the earlier states, a non-'none' op each, valid for NetworkCIFAR; the
    same cell for the same index; ops and input pairs uniform (a sampler favouring early states or pools fails)."""
    cells = [reproduce.sample_darts(reproduce.random.Random(i), None) for i in range(3000)]
    assert cells[7] == reproduce.sample_darts(reproduce.random.Random(7), None) and cells[7] != cells[8]
    ops, pairs = Counter(), Counter()
    for c in cells[:50]:
        common.validate_genotype(common.Genotype(**c))
    for c in cells:
        assert c["normal_concat"] == c["reduce_concat"] == [2, 3, 4, 5]
        for cell in (c["normal"], c["reduce"]):
            for node in range(4):
                (op_a, a), (op_b, b) = cell[2 * node:2 * node + 2]
                assert 0 <= a < b < node + 2
                ops.update([op_a, op_b])
                if node == 3:
                    pairs[(a, b)] += 1
    assert "none" not in ops and len(ops) == 7
    assert max(abs(n / sum(ops.values()) - 1 / 7) for n in ops.values()) < 0.01
    assert len(pairs) == 10 and max(abs(n / sum(pairs.values()) - 0.1) for n in pairs.values()) < 0.02


def test_random_cells_of_other_spaces(tmp_path):
    """SNAS (edge_all, 'none' allowed on every edge) and ENAS (5 nodes, 5 ops, loose ends): the written
    genotype.json is what the method file's --genotype reads."""
    import enas

    for method in ("snas", "enas"):
        args = SimpleNamespace(nodes=5)
        for i in range(20):
            d = reproduce.SAMPLERS[reproduce.METHODS[method]](reproduce.random.Random(i), args)
            common.write_json(tmp_path / "g.json", d)
            g = common.parse_genotype(str(tmp_path / "g.json"))
            if method == "enas":
                assert len(g.normal) == len(g.reduce) == 10
                assert {op for op, _ in g.normal + g.reduce} <= set(enas.ENAS_OPS)
                used = {j for _, j in g.normal}
                assert g.normal_concat == [k for k in range(2, 7) if k not in used]


BAD = [  # (argv after the method-less defaults, expected part of the one line)
    ([], "the first argument is the method"),
    (["--search-seeds", "2"], "the first argument is the method"),
    (["dartz"], "did you mean 'darts'"),
    (["darts", "--seed", "3"], "--seed is set by reproduce.py"),
    (["darts", "--out-dir", "x"], "--out-dir is set by reproduce.py"),
    (["darts", "--run-name", "x"], "--run-name is set by reproduce.py"),
    (["darts", "--genotype", "DARTS_V2"], "--genotype is set by reproduce.py"),
    (["darts", "--no-retrain"], "--no-retrain is set by reproduce.py"),
    (["darts", "--resume", "x"], "--resume is set by reproduce.py"),
    (["darts", "--resu", "x"], "--resume is set by reproduce.py"),  # an abbreviation argparse would accept
    (["darts", "--retrain-val-portion", "0.2"], "--retrain-val-portion is set by reproduce.py"),
    (["darts", "--search-seeds", "-1"], "--search-seeds must be >= 0"),
    (["darts", "--search-seeds", "0"], "no cell to evaluate"),
    (["darts", "--select-epochs", "0"], "--select-epochs must be >= 1"),
    (["darts", "--select-epochs", "abc"], "invalid int value"),
    (["darts", "--final-seeds", "0"], "--final-seeds must be >= 1"),
    (["darts", "--random-cells", "-2"], "--random-cells must be >= 0"),
    (["darts", "--select-val-portion", "1"], "--select-val-portion must be in (0, 1)"),
    (["darts", "--select-val-portion", "0"], "--select-val-portion must be in (0, 1)"),
    (["darts", "--gpus", "a,b"], "--gpus takes GPU ids"),
    (["darts", "--gpus", "0,0"], "ids must be distinct"),
    (["darts", "--gpus", "0", "--slurm", "gpu"], "pick one"),
    (["darts", "--gpus", "0"], "--device cpu keeps it off"),
    (["darts", "--slurm", "gpu"], "no sbatch"),
    (["darts", "--slurm-time", "0"], "--slurm-time must be >= 1"),
    (["darts", "--epochs", "0"], "--epochs must be >=1"),
    (["darts", "--bogus-flag", "1"], "darts.py: unrecognized arguments: --bogus-flag"),
    (["darts", "--dataset", "imagefolder", "--data", "/nonexistent"], "needs /nonexistent/train/"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) or "empty" for a, _ in BAD])
def test_bad_input(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--out", str(out)] + (["--device", "cpu"] if argv[:1] == ["darts"] else []) \
        + (["--dataset", "digits"] if argv[:1] == ["darts"] and "--dataset" not in argv else [])
    assert reproduce.main(argv + flags) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_bad_out_folders(tmp_path, capsys, monkeypatch):
    """A file as --out, a folder of another protocol, a folder whose runs are still running, a space without a
    sampler: one line, exit 2, the folder untouched."""
    base = ["darts", "--dataset", "digits", "--device", "cpu", "--search-seeds", "1", "--final-seeds", "1"]
    (tmp_path / "file").write_text("x")
    assert reproduce.main(base + ["--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    common.write_json(other / "reproduce.json", {"method": "darts", "method_flags": ["--dataset", "digits", "--device",
                                                 "cpu"], "search_seeds": 1, "select_epochs": 100,
                                                 "select_val_portion": 0.5, "select_seed": 0, "final_seeds": 3,
                                                 "random_cells": 0})
    listing = sorted(p.name for p in other.iterdir())
    assert reproduce.main(base + ["--out", str(other)]) == 2
    assert "holds another protocol (final_seeds 3 there, 1 here)" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        common.write_json(busy / ".jobs.json", {"select-s0": ["pid", sleeper.pid]})
        assert reproduce.main(base + ["--out", str(busy)]) == 2
        assert f"select-s0 (pid {sleeper.pid}) of an earlier reproduce.py is still running" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    monkeypatch.delitem(reproduce.SAMPLERS, "darts")
    assert reproduce.main(base + ["--random-cells", "2", "--out", str(tmp_path / "new")]) == 2
    assert "no sampler for darts's search space 'darts'" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == listing and not (tmp_path / "new").exists()


def test_slurm_submission(tmp_path, monkeypatch):
    """--slurm PARTITION: the sbatch file submitit writes asks for the partition, one GPU, the time limit and
    the CPUs, under the run's name (a fake sbatch/srun on PATH stands in for the cluster)."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    backend = reproduce.Submitit("gpu", tmp_path / "submitit", 4320, 6)
    assert backend.start("final-s1-seed3", ["python", "darts.py", "--seed", "3"], tmp_path / "log.txt") == \
        ("slurm", "4242")
    script = next((tmp_path / "submitit").glob("*.sh")).read_text()
    for line in ("--partition=gpu", "--gpus-per-node=1", "--time=4320", "--cpus-per-task=6",
                 "--job-name=final-s1-seed3"):
        assert f"#SBATCH {line}" in script


def test_random_nb201_cells_are_uniform_and_read_by_the_method_files(tmp_path):
    """--space nb201: each of the 6 edges one of the 5 ops ('none' included) uniformly, independent of the
    other edges; the written genotype.json is the arch string the method files' --genotype reads."""
    args = SimpleNamespace(space="nb201")
    assert reproduce.space_of("darts", args) == "nb201" and reproduce.space_of("darts", SimpleNamespace()) == "darts"
    cells = [reproduce.SAMPLERS["nb201"](reproduce.random.Random(i), args) for i in range(3000)]
    assert cells[5] == reproduce.sample_nb201(reproduce.random.Random(5), args)
    ops = [common.parse_nb201_arch(c["arch"]) for c in cells]
    assert all(c["nb201_index"] == common.nb201_index(c["arch"]) for c in cells[:50])
    for edge in range(6):
        counts = Counter(o[edge] for o in ops)
        assert set(counts) == set(common.NB201_PRIMITIVES)
        assert max(abs(n / len(ops) - 0.2) for n in counts.values()) < 0.03
    assert len({c["arch"] for c in cells}) > 2500  # not a few cells repeated
    common.write_json(tmp_path / "g.json", cells[0])
    assert common.parse_genotype(str(tmp_path / "g.json")) == cells[0]["arch"]
