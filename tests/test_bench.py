"""bench.py: every method's own search timed at a tiny size on CPU (table, bench.json, bench.png with sane
numbers), the memory counter against a closed form, each speed switch against the plain step, bad inputs."""
import json
import math

import pytest
import torch

import bench
import common

TINY = ["--device", "cpu", "--batch-size", "8", "--image-size", "8", "--layers", "3", "--init-channels", "4",
        "--steps", "1", "--warmup", "0"]


def test_saved_bytes_counts_each_storage_once_while_a_graph_holds_it():
    a = torch.randn(1000, requires_grad=True)
    with bench.SavedBytes() as saved:
        b = a.exp()       # saves its result b            -> 4000 bytes
        c = b.sin()       # saves its input b: same storage, counted once
        d = (c * c).sum()  # saves c (twice, once)          -> 8000 bytes
        assert saved.now == 8000
        d.backward()      # the graph lets go of b and c
    assert (saved.peak, saved.now) == (8000, 0)


def test_bench_runs_every_method_and_writes_table_json_and_figure(tmp_path, capsys):
    assert common.cli(bench.main, bench.Args, [*TINY, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "bench.json").read_text())
    names = [r["method"] for r in data["results"]]
    assert set(names) >= {"darts", "darts-2nd", "pc_darts", "p_darts", "gdas", "snas", "daas", "idarts", "vim_nas",
                          "enas"}
    for r in data["results"]:
        assert "error" not in r, r
        assert any(line.split()[:1] == [r["method"]] for line in out.splitlines())  # its row in the table
        assert 0 < r["step_min_s"] <= r["step_s"] <= r["step_max_s"] < 120
        assert r["peak_mb"] > 0 and r["memory"] == "saved for backward"
        assert r["search_s"] == pytest.approx(r["epoch_s"] * r["search_epochs"], rel=1e-9) or r["stages"]
        assert all(math.isfinite(x) for x in r["train_loss"])
    by = {r["method"]: r for r in data["results"]}
    # steps per epoch from CIFAR-10's 50000 images at batch 8: half for weights, SNAS all, iDARTS the val half
    assert by["darts"]["steps_per_epoch"] == 3125 and by["snas"]["steps_per_epoch"] == 6250
    assert by["enas"]["steps_per_epoch"] == math.ceil(45000 / 8) and by["idarts"]["steps_per_epoch"] == 3125
    assert (by["darts"]["search_epochs"], by["gdas"]["search_epochs"], by["p_darts"]["search_epochs"]) == (50, 250, 75)
    assert [s["cells"] for s in by["p_darts"]["stages"]] == [3, 9, 15]  # --layers 3 + add_layers 0, 6, 12
    # second order costs more than first order on the same supernet
    assert by["darts-2nd"]["step_s"] > by["darts"]["step_s"] and by["darts-2nd"]["peak_mb"] > by["darts"]["peak_mb"]
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_channels_last_keeps_the_loss_of_the_plain_step_and_cuda_switches_are_skipped_on_cpu(tmp_path):
    args = common.parse_args(bench.Args, [*TINY, "--check-steps", "2"])
    checks = bench.check_switches("darts", args, tmp_path, torch.device("cpu"),
                                  ("channels_last", "amp", "no_torch_deterministic"))
    by = {c["switch"]: c for c in checks}
    assert by["--channels-last"]["ok"] and 0 <= by["--channels-last"]["rel_diff"] < 1e-5
    assert by["--channels-last"]["plain_loss"] > 0 and by["--channels-last"]["loss"] > 0
    assert by["--amp"]["ok"] is None and "CUDA only" in by["--amp"]["note"]  # bfloat16 autocast: CUDA only
    assert by["--no-torch-deterministic"]["ok"] is None


@pytest.mark.slow  # dynamo traces the whole supernet (every op of every edge): about 100 s on 2 shared cores
def test_compile_keeps_the_loss_of_the_plain_step(tmp_path):
    args = common.parse_args(bench.Args, [*TINY, "--check-steps", "2", "--compile-backend", "eager"])
    (check,) = bench.check_switches("darts", args, tmp_path, torch.device("cpu"), ("compile",))
    assert check["ok"] and check["rel_diff"] < 1e-5 and check["plain_loss"] > 0


@pytest.mark.parametrize("flags,needle", [
    (["--methods", "dartz"], "unknown method 'dartz' in --methods; choose from all, darts, darts-2nd"),
    (["--methods", ","], "--methods is empty"),
    (["--amp"], "--amp needs a CUDA device"),
    (["--steps", "0"], "--steps must be >=1, got 0"),
    (["--layers", "2"], "--layers must be 0 or >=3, got 2"),
    (["--image-size", "4"], "--image-size must be >=8"),
    (["--compile-backend", "tvm"], "unknown --compile-backend 'tvm'"),
    (["--batch-size", "1"], "darts: --batch-size must be >=2, got 1"),
    pytest.param(["--device", "cuda"], "CUDA is not available; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    (["--rtol", "0"], "--rtol must be >0, got 0.0"),
    (["--out-dir", "{file}"], "is a file, not a folder"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_input_is_one_line_and_exit_2(flags, needle, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    flags = [f.replace("{file}", str(tmp_path / "file")) for f in flags]
    out_dir = ["--out-dir", str(tmp_path / "out")] if "--out-dir" not in flags else []
    with pytest.raises(SystemExit) as e:
        common.cli(bench.main, bench.Args, ["--device", "cpu", *out_dir, *flags] if "--device" not in flags else
                   [*out_dir, *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()
