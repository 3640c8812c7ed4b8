"""darts.py run as a user runs it: the files it writes, the numbers it reaches, its errors."""
import json

import numpy as np
import pytest
import torch

import common
from conftest import TINY, read_jsonl, run_script

SEARCH_FILES = ["args.json", "log.txt", "darts.py", "common.py", "search_history.jsonl", "alphas.jsonl",
                "genotype.json", "checkpoint_search.pt", "alphas.png", "alpha_evolution.png",
                "search_curves.png", "genotype.png"]
RETRAIN_FILES = ["retrain_history.jsonl", "checkpoint_retrain.pt", "retrain_curves.png", "results.json"]


@pytest.mark.slow
def test_second_order_search_and_retrain_on_fake_writes_the_run_folder(run):
    proc, run_dir = run("darts.py", *TINY, "--unrolled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in SEARCH_FILES + RETRAIN_FILES:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["search"]["order"] == "second" and results["search"]["epochs"] == 2
    assert results["retrain"]["retrain_epochs"] == 1 and 0 <= results["retrain"]["test_acc"] <= 100
    alphas = read_jsonl(run_dir / "alphas.jsonl")
    assert len(alphas) == 2
    for cell in ("normal", "reduce"):
        w = np.array(alphas[-1]["softmax"][cell])
        assert w.shape == (14, 8) and np.allclose(w.sum(1), 1)
    # the checkpoint holds the architecture (quark0/darts's weights.pt did not)
    ckpt = torch.load(run_dir / "checkpoint_search.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and {"w_optimizer", "a_optimizer", "scheduler", "rng"} <= set(ckpt)
    assert np.allclose(ckpt["model"]["alphas_normal"].numpy(), alphas[-1]["alpha"]["normal"])
    genotype = common.parse_genotype(str(run_dir / "genotype.json"))
    assert common.genotype_to_dict(genotype) == results["genotype"] == ckpt["genotype"]
    log = (run_dir / "log.txt").read_text()
    assert "search epoch 1 step 8/8" in log and "retrain epoch 0" in log and "test accuracy" in log


@pytest.mark.slow
def test_digits_search_then_retrain_learns(run):
    """Real data: a broken search or retraining pipeline cannot clear 90 % (chance is 10 %)."""
    proc, run_dir = run("darts.py", "--dataset", "digits", "--device", "cpu", "--workers", "0", "--epochs", "3",
                        "--batch-size", "64", "--init-channels", "8", "--layers", "5", "--retrain-epochs", "8",
                        "--retrain-init-channels", "16", "--retrain-layers", "5", "--retrain-batch-size", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["search"]["val_acc"] > 80, results["search"]
    assert results["retrain"]["test_acc"] > 90, results["retrain"]
    history = read_jsonl(run_dir / "retrain_history.jsonl")
    assert [r["epoch"] for r in history] == list(range(8)) and history[-1]["lr"] < history[0]["lr"]


@pytest.mark.slow
def test_known_genotype_is_retrained_without_search(run):
    proc, run_dir = run("darts.py", *TINY, "--genotype", "PC_DARTS")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run_dir / "checkpoint_search.pt").exists()
    results = json.loads((run_dir / "results.json").read_text())
    assert "search" not in results and results["genotype"] == common.genotype_to_dict(common.GENOTYPES["PC_DARTS"])


@pytest.mark.slow
def test_imagefolder_dataset(run, tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.random.randint(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    tmp_path / "img" / split / cls / f"{i}.png")
    proc, run_dir = run("darts.py", *TINY, "--dataset", "imagefolder", "--data", tmp_path / "img", "--epochs", "1",
                        "--no-retrain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "genotype.json").is_file() and not (run_dir / "checkpoint_retrain.pt").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--genotype", "DARTS_V3"], "unknown genotype 'DARTS_V3'"),
    (["--genotype", "Genotype(normal=[("], "malformed genotype literal"),
    (["--dataset", "cifar01"], "unknown --dataset 'cifar01'"),
    (["--dataset", "imagefolder", "--data", "/nonexistent/folder"], "needs /nonexistent/folder/train/"),
    (["--amp"], "--amp needs a CUDA device"),
    (["--genotype", "DARTS", "--no-retrain"], "nothing to do"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--epochs", "0"], ""),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, flags, needle):
    args = [*TINY, "--out-dir", tmp_path / "runs", *flags]
    proc = run_script("darts.py", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and needle in proc.stderr and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_existing_run_folder_is_never_reused(run):
    (proc, run_dir) = run("darts.py", *TINY, "--genotype", "DARTS", "--retrain-epochs", "1", name="same")
    assert proc.returncode == 0
    before = (run_dir / "results.json").read_text()
    proc, _ = run("darts.py", *TINY, "--genotype", "DARTS", name="same")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (run_dir / "results.json").read_text() == before


def test_help_lists_paper_defaults():
    proc = run_script("darts.py", "--help")
    assert proc.returncode == 0
    for text in ("--unrolled", "train_search.py --epochs 50", "--arch-lr", "--genotype", "--retrain-epochs"):
        assert text in proc.stdout


@pytest.mark.slow
def test_amended_darts_search_runs(run):
    proc, run_dir = run("darts.py", *TINY, "--amended", "--epochs", "1", "--no-retrain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["search"]["order"] == "amended" and results["search"]["early_stop"] is None


@pytest.mark.slow
def test_darts_plus_early_stop_retrains_the_cell_of_the_stopping_epoch(run, tmp_path):
    # --stop-skip 0 makes criterion 1 fire as soon as it is checked: at --stop-min-epochs 1
    proc, run_dir = run("darts.py", *TINY, "--epochs", "4", "--early-stop", "--stop-skip", "0",
                        "--stop-min-epochs", "1", "--no-retrain")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = read_jsonl(run_dir / "search_history.jsonl")
    assert [r["epoch"] for r in history] == [0, 1] and history[-1]["early_stop"].startswith("criterion 1")
    assert "DARTS+ early stop at epoch 1, criterion 1" in (run_dir / "log.txt").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["genotype"] == history[-1]["genotype"] and results["search"]["epochs"] == 2
    # a resumed run knows the search had stopped and does not search on
    (run_dir / "results.json").unlink()
    proc = run_script("darts.py", "--resume", run_dir, "--device", "cpu", "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_jsonl(run_dir / "search_history.jsonl")) == 2
    assert json.loads((run_dir / "results.json").read_text())["genotype"] == history[-1]["genotype"]
