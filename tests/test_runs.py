"""Runs that survive: SIGKILL + --resume, determinism, bad input, torchrun retraining, the
Hessian-eigenvalue diagnostic."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT, TINY, kill_resume_and_compare, kill_when, rows, run_script


def snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


FLAGS = [*TINY, "--epochs", "3", "--retrain-epochs", "3"]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref = run_script("darts.py", *FLAGS, "--out-dir", tmp_path, "--run-name", "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    kill_resume_and_compare("darts.py", FLAGS, tmp_path, tmp_path / "ref")  # killed in search and in retraining


def test_same_seed_gives_bit_identical_alphas(run):
    flags = [*TINY, "--epochs", "1", "--steps-per-epoch", "4", "--no-retrain"]
    (p1, d1), (p2, d2) = run("darts.py", *flags, name="a"), run("darts.py", *flags, name="b")
    assert p1.returncode == p2.returncode == 0
    a1, a2 = rows(d1 / "alphas.jsonl"), rows(d2 / "alphas.jsonl")
    assert a1 == a2 and a1[0]["alpha"]["normal"] != rows(d1 / "alphas.jsonl")[0]["alpha"]["reduce"]
    p3, d3 = run("darts.py", *flags, "--seed", "3", name="c")
    assert rows(d3 / "alphas.jsonl") != a1  # and the seed matters


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A search killed after its first epoch: a resumable folder for the bad-input cases."""
    out = tmp_path_factory.mktemp("runs")
    proc = subprocess.Popen([sys.executable, str(ROOT / "darts.py"), *FLAGS, "--out-dir", str(out), "--run-name", "r"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, out / "r" / "checkpoint_search.pt")
    return out / "r"


def corrupt(d):
    (d / "checkpoint_search.pt").write_bytes(b"not a checkpoint")


def other_method(d):
    ckpt = torch.load(d / "checkpoint_search.pt", weights_only=False)
    torch.save({**ckpt, "method": "gdas"}, d / "checkpoint_search.pt")


def finished(d):
    (d / "results.json").write_text("{}")


@pytest.mark.parametrize("damage,flags,needle", [
    (None, ["--epochs", "7"], "--resume uses the run's own flags; drop --epochs"),
    (corrupt, [], "it is corrupt"),
    (other_method, [], "belongs to 'gdas', not 'darts'"),
    (finished, [], "the run has finished"),
    (lambda d: (d / "darts.py").rename(d / "gdas.py"), [], "was not made by darts.py"),
])
def test_bad_resume_is_one_line_and_leaves_the_folder_alone(finished_run, tmp_path, damage, flags, needle):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(finished_run, d)
    if damage:
        damage(d)
    before = snapshot(d)
    proc = run_script("darts.py", "--resume", d, "--device", "cpu", *flags)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and needle in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and snapshot(d) == before


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    proc = run_script("darts.py", "--resume", tmp_path)
    assert proc.returncode == 2 and "not a run folder" in proc.stderr and not list(tmp_path.iterdir())


def test_empty_imagefolder_is_one_line(tmp_path):
    (tmp_path / "img" / "train").mkdir(parents=True)
    (tmp_path / "img" / "val").mkdir()
    proc = run_script("darts.py", *TINY, "--dataset", "imagefolder", "--data", tmp_path / "img", "--out-dir",
                      tmp_path / "runs")
    assert proc.returncode == 2 and "holds no images" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_torchrun_retrains_with_two_gloo_processes(tmp_path):
    """DistributedDataParallel on CPU: both ranks end with the same weights, rank 0 alone writes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "darts.py"),
           "--genotype", "DARTS_V2", "--dataset", "digits", "--device", "cpu", "--workers", "0",
           "--retrain-epochs", "2", "--retrain-init-channels", "8", "--retrain-layers", "5",
           "--retrain-batch-size", "64", "--out-dir", str(tmp_path), "--run-name", "ddp"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = {line.split(":")[0]: line.split()[-1] for line in proc.stdout.splitlines() if "final weights checksum" in line}
    assert set(sums) == {"rank 0", "rank 1"} and sums["rank 0"] == sums["rank 1"], proc.stdout[-2000:]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["retrain"]["processes"] == 2 and results["retrain"]["test_acc"] > 50
    assert (tmp_path / "ddp" / "log.txt").read_text().count("new run folder") == 1
    assert len(rows(tmp_path / "ddp" / "retrain_history.jsonl")) == 2


def test_dominant_eigenvalue_matches_closed_form():
    """0.5 x'Ax has Hessian A: power iteration finds its eigenvalue of largest magnitude."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    for eigs in ([5.0, 2.0, 1.0, 0.5, 0.1, -0.3], [1.0, 0.5, -4.0, 0.2, 0.1, 0.0]):
        a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
        x = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True)]
        loss = 0.5 * x[0].flatten() @ a @ x[0].flatten()
        assert common.dominant_eigenvalue(loss, x, iters=200, tol=1e-12) == pytest.approx(max(eigs, key=abs), rel=1e-6)


def test_hessian_eigenvalue_is_logged_and_plotted(run):
    proc, d = run("darts.py", *TINY, "--no-retrain", "--hessian-eigenvalue", "--eigen-batches", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    hist = rows(d / "search_history.jsonl")
    assert all(isinstance(r["hessian_eigenvalue"], float) for r in hist) and len(hist) == 2
    assert (d / "hessian_eigenvalue.png").stat().st_size > 0 and "dominant eigenvalue" in (d / "log.txt").read_text()
