import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker and per child process
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# tiny supernet and retrain network on `fake` data: shapes only, seconds on CPU
TINY = ["--device", "cpu", "--workers", "0", "--dataset", "fake", "--image-size", "16", "--epochs", "2",
        "--batch-size", "16", "--steps-per-epoch", "8", "--init-channels", "4", "--layers", "3", "--retrain-epochs", "1",
        "--retrain-init-channels", "4", "--retrain-layers", "3", "--retrain-batch-size", "32"]


def run_script(script, *args, timeout=600):
    """Run a method file as a user would; returns the CompletedProcess (never raises)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run(tmp_path):
    def _run(script, *args, name="run", timeout=600):
        proc = run_script(script, "--out-dir", tmp_path, "--run-name", name, *args, timeout=timeout)
        return proc, tmp_path / name
    return _run


VOLATILE = {"seconds", "seconds_per_step", "step_seconds", "peak_gpu_mb"}  # wall-clock fields differ between runs
RUN_FILES = ("search_history.jsonl", "alphas.jsonl", "retrain_history.jsonl")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def rows(path, volatile=VOLATILE):
    """A jsonl file's rows without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in volatile} for r in read_jsonl(path)]


def kill_when(proc, path, timeout=300):
    """SIGKILL the run as soon as `path` appears (an epoch has been checkpointed)."""
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def kill_resume_and_compare(script, flags, out_dir, ref_dir, kill_in_retrain=True, files=RUN_FILES,
                            volatile=VOLATILE):
    """Start `script` with `flags`, SIGKILL it once its first search epoch is checkpointed, `--resume` it
    (killed again once retraining has checkpointed, if kill_in_retrain), let it finish, and assert that its
    `files` and results.json equal those of the uninterrupted run in ref_dir. Returns the resumed run's folder."""
    run_dir = Path(out_dir) / "killed"
    cmd = [sys.executable, str(ROOT / script), *map(str, flags), "--out-dir", str(out_dir), "--run-name", "killed"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, run_dir / "checkpoint_search.pt")  # killed during the search
    assert not (run_dir / "results.json").exists()
    resume = [sys.executable, str(ROOT / script), "--resume", str(run_dir), "--device", "cpu", "--workers", "0"]
    if kill_in_retrain:
        proc = subprocess.Popen(resume, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(proc, run_dir / "checkpoint_retrain.pt")  # killed again, during retraining
    done = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in (run_dir / "log.txt").read_text()
    for name in files:
        assert rows(run_dir / name, volatile) == rows(Path(ref_dir) / name, volatile), name
    got, want = (json.loads((d / "results.json").read_text()) for d in (run_dir, Path(ref_dir)))
    for r in (got, want):
        r["search"] = {k: v for k, v in r["search"].items() if k not in volatile}
    assert got == want
    return run_dir


@pytest.fixture(scope="session")
def nb201_benchmark(tmp_path_factory):
    """A NATS-Bench topology folder in the API's real format (meta.pickle.pbz2 + one file per arch, read with
    fast_mode) that covers all 15625 cells, so a search's derived cells can be looked up: 16 distinct
    records, cell k's file links to record k % 16. Returns (folder, expected), expected(arch) = the dict
    common.nb201_lookup must give for it."""
    nats = pytest.importorskip("nats_bench", reason="pip install nats_bench==1.8 (requirements.txt)")
    import common
    from test_nb201 import arch_results, expected as expected_k

    folder = tmp_path_factory.mktemp("NATS-tss-test-simple")
    meta = common.nb201_all_archs()
    nats.pickle_save({"meta_archs": meta}, str(folder / "meta.pickle"))
    for k in range(16):
        nats.pickle_save({"200": arch_results(nats, k, k, meta[k], 200).state_dict()}, str(folder / f"{k:06d}.pickle"))
    for index in range(16, len(meta)):
        os.symlink(f"{index % 16:06d}.pickle.pbz2", folder / f"{index:06d}.pickle.pbz2")
    return folder, lambda arch: expected_k(common.nb201_index(arch) % 16)
