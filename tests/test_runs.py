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


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref = run_script("darts.py", *FLAGS, "--out-dir", tmp_path, "--run-name", "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    kill_resume_and_compare("darts.py", FLAGS, tmp_path, tmp_path / "ref")  # killed in search and in retraining


@pytest.mark.slow
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
    (None, ["--batch-size", "64"], "drop --batch-size"),  # 64 is the default: compared with what was typed
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_hessian_eigenvalue_is_logged_and_plotted(run):
    proc, d = run("darts.py", *TINY, "--no-retrain", "--hessian-eigenvalue", "--eigen-batches", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    hist = rows(d / "search_history.jsonl")
    assert all(isinstance(r["hessian_eigenvalue"], float) for r in hist) and len(hist) == 2
    assert (d / "hessian_eigenvalue.png").stat().st_size > 0 and "dominant eigenvalue" in (d / "log.txt").read_text()


def wait_for(path, text, proc, timeout=300):
    import time

    t0 = time.time()
    while not (path.exists() and text in path.read_text()):
        assert proc.poll() is None, "the run ended first"
        assert time.time() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.slow
def test_ctrl_c_in_epoch_0_names_the_folder_and_the_resume_command(tmp_path):
    import signal

    run_dir = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, str(ROOT / "darts.py"), *FLAGS, "--no-retrain", "--out-dir", str(tmp_path),
                             "--run-name", "r"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(run_dir / "log.txt", "search epoch 0 step", proc)  # inside epoch 0: no checkpoint yet
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and not (run_dir / "checkpoint_search.pt").exists()
    line = f"python darts.py --resume {run_dir}"
    assert err.count("\n") == 1 and "interrupted" in err and "no epoch had finished" in err and line in err, err
    assert line in (run_dir / "log.txt").read_text()
    done = run_script("darts.py", "--resume", run_dir, "--device", "cpu", "--workers", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(rows(run_dir / "search_history.jsonl")) == 3 and (run_dir / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_mid_run_names_the_file_and_the_run_resumes(tmp_path, workers):
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(np.full((16, 16, 3), 20 * i, dtype=np.uint8)).save(tmp_path / "img" / split / cls / f"{i}.png")
    bad = tmp_path / "img" / "train" / "dog" / "3.png"
    bad.write_bytes(b"not a png")
    flags = [*TINY, "--dataset", "imagefolder", "--data", tmp_path / "img", "--epochs", "1", "--no-retrain",
             "--workers", workers, "--out-dir", tmp_path / "runs", "--run-name", "r"]
    proc = run_script("darts.py", *flags)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: cannot read image {bad}") and "Traceback" not in proc.stderr
    log = (tmp_path / "runs" / "r" / "log.txt").read_text()
    assert f"cannot read image {bad}" in log and "--resume" in log
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(bad, format="PNG")  # the user fixes it
    done = run_script("darts.py", "--resume", tmp_path / "runs" / "r", "--device", "cpu", "--workers", "0")
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_unexpected_error_goes_into_log_txt_with_its_traceback(tmp_path):
    import darts

    def main(args):
        args, _ = common.prepare(args, darts.__file__)
        common.start_run(args, darts.__file__)
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        common.cli(main, darts.Args, ["--out-dir", str(tmp_path), "--run-name", "r", "--device", "cpu"])
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "Traceback" in log and "RuntimeError: a bug" in log and f"--resume {tmp_path / 'r'}" in log


@pytest.mark.slow
def test_a_last_training_batch_of_one_image_is_dropped(run):
    """digits: 1297 training images, batch 16 -> 81 batches and 1 image left, which BatchNorm cannot train on."""
    proc, d = run("darts.py", "--genotype", "DARTS_V2", "--dataset", "digits", "--device", "cpu", "--workers", "0",
                  "--retrain-epochs", "1", "--retrain-batch-size", "16", "--retrain-init-channels", "4",
                  "--retrain-layers", "3", "--report-freq", "1000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "retrain epoch 0 step 81/81" in (d / "log.txt").read_text()


@pytest.mark.parametrize("size", [9, 13, 30, pytest.param(64, marks=pytest.mark.slow)])
def test_any_image_size_from_8_up_searches_and_retrains(run, size):
    proc, d = run("darts.py", *TINY, "--image-size", size, "--epochs", "1", "--steps-per-epoch", "2",
                  "--retrain-epochs", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((d / "results.json").read_text())["retrain"]["test_acc"] is not None


@pytest.mark.parametrize("size", [8, 9, 17, 28, 30, 41, 64])
def test_auxiliary_head_adapts_to_the_image_size(size):
    net = common.NetworkCIFAR(4, 10, 5, True, common.GENOTYPES["DARTS_V2"]).train()
    logits, aux = net(torch.randn(2, 3, size, size))
    assert logits.shape == aux.shape == (2, 10)


def test_factorized_reduce_is_the_official_op_at_even_sizes_and_halves_odd_ones():
    torch.manual_seed(0)
    op = common.FactorizedReduce(4, 6).eval()
    x = torch.randn(2, 4, 8, 8)
    relu = torch.relu(x)
    want = op.bn(torch.cat([op.conv_1(relu), op.conv_2(relu[:, :, 1:, 1:])], 1))  # the official forward
    assert torch.equal(op(x), want)
    assert op(torch.randn(2, 4, 9, 9)).shape == (2, 6, 5, 5) and op(torch.randn(2, 4, 7, 10)).shape == (2, 6, 4, 5)
