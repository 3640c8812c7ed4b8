"""Every method file, every bad input: exit code 2, one line on stderr naming the problem, no traceback,
no new run folder and an existing folder left byte for byte. In-process through common.cli (the entry
point of `python <file>.py`), so the whole table runs in seconds: the checks come before any data or model.
Inputs that can only be found during a run (an unreadable image, Ctrl-C) are in tests/test_runs.py."""
import hashlib
import importlib
import os

import numpy as np
import pytest

import common
from conftest import TINY

METHODS = ["darts", "pc_darts", "p_darts", "gdas", "snas", "daas", "idarts", "enas", "vim_nas", "proxylessnas"]
EDGE_ALL = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 0), ('dil_conv_3x3', 1), "
            "('none', 2), ('skip_connect', 0), ('skip_connect', 1), ('none', 3), ('none', 2), ('skip_connect', 0), "
            "('sep_conv_3x3', 1), ('none', 4), ('none', 3), ('none', 2)], normal_concat=[2, 3, 4, 5], "
            "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('none', 0), ('max_pool_3x3', 1), "
            "('skip_connect', 2), ('none', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('none', 3), "
            "('max_pool_3x3', 0), ('dil_conv_5x5', 2), ('none', 1), ('none', 3), ('none', 4)], "
            "reduce_concat=[2, 3, 4, 5])")  # SNAS_mild_edge_all as a literal

# (flags, what the line must say); "{tmp}" is the test's temporary folder
CASES = [
    (["--layers", "1"], "--layers must be >=3, got 1"),
    (["--layers", "2"], "--layers must be >=3, got 2"),
    (["--retrain-layers", "2"], "--retrain-layers must be >=3"),
    (["--image-size", "7"], "--image-size must be 0 or >=8, got 7"),
    (["--image-size", "-5"], "--image-size must be 0 or >=8, got -5"),
    (["--retrain-epochs", "0"], "--retrain-epochs must be >=1"),
    (["--steps-per-epoch", "-1"], "--steps-per-epoch must be >=0"),
    (["--lr", "-1"], "--lr must be >0, got -1.0"),
    (["--lr", "0"], "--lr must be >0"),
    (["--retrain-lr", "-0.1"], "--retrain-lr must be >0"),
    (["--seed", "-1"], "--seed must be [0, 4294967295], got -1"),
    (["--seed", str(2**32)], "--seed must be [0, 4294967295]"),
    (["--workers", "-1"], "--workers must be >=0"),
    (["--report-freq", "0"], "--report-freq must be >=1"),
    (["--batch-size", "1"], "--batch-size must be >=2"),
    (["--retrain-batch-size", "1"], "--retrain-batch-size must be >=2"),
    (["--epochs", "0"], "--epochs must be >=1"),
    (["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
    (["--init-channels", "0"], "--init-channels must be >=1"),
    (["--grad-clip", "-1"], "--grad-clip must be >=0"),
    (["--retrain-grad-clip", "-1"], "--retrain-grad-clip must be >=0"),
    (["--weight-decay", "-1"], "--weight-decay must be >=0"),
    (["--momentum", "1"], "--momentum must be [0, 1)"),
    (["--drop-path-prob", "1"], "--drop-path-prob must be [0, 1)"),
    (["--retrain-val-portion", "1"], "--retrain-val-portion must be [0, 1)"),
    (["--auxiliary-weight", "-1"], "--auxiliary-weight must be >=0"),
    (["--lr-min", "1"], "--lr-min 1.0 is above --lr"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--dataset", "cifar01"], "unknown --dataset 'cifar01'"),
    (["--dataset", "imagefolder", "--data", "/nonexistent/folder"], "needs /nonexistent/folder/train/"),
    (["--device", "cuda:0"], "CUDA is not available"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--amp"], "--amp needs a CUDA device"),
    (["--genotype", "DARTS_V3"], "unknown genotype 'DARTS_V3'"),
    (["--genotype", "Genotype(normal=[("], "malformed genotype literal"),
    (["--genotype", "DARTS", "--no-retrain"], "nothing to do"),
    (["--out-dir", "{tmp}/a_file"], "is a file, not a folder"),
    (["--out-dir", "{tmp}/a_file/runs"], "cannot be made"),
    (["--out-dir", "{readonly}/runs"], "cannot be written"),
    (["--dataset", "imagefolder", "--data", "{tmp}/mismatch"], "different classes"),
    (["--dataset", "imagefolder", "--data", "{tmp}/oneclass"], "needs at least 2"),
    (["--dataset", "imagefolder", "--data", "{tmp}/empty"], "holds no images"),
    (["--compile-backend", "tvm"], "unknown --compile-backend 'tvm'"),
    (["--genotype", "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"], "needs --space nb201"),
]
NB201_CASES = [  # the NAS-Bench-201 space, in the files that have one (not NO_NB201)
    (["--space", "nb202"], "unknown --space 'nb202'"),
    (["--nb201-benchmark", "{tmp}/missing.pth"], "--nb201-benchmark looks up NAS-Bench-201 cells: it needs "
                                                  "--space nb201"),
    (["--space", "nb201", "--nb201-benchmark", "{tmp}/missing.pth"], "missing.pth: no such file or directory"),
    (["--space", "nb201", "--genotype", "DARTS_V2"], "--space nb201 needs one"),
]
NO_NB201 = ["p_darts", "daas", "proxylessnas"]  # no NAS-Bench-201 space (README, NAS-Bench-201)
CASES += NB201_CASES
NOT_FOR = {  # cases that do not apply to a method (it has no such flag, or reads that input correctly)
    ("snas", "edge_all"),  # snas.py converts an edge_all cell explicitly
    # proxylessnas.py: --layers counts blocks per stage (>= 1, its own test); a DARTS cell is no genotype there
    ("proxylessnas", "--layers must be >=3, got 1"), ("proxylessnas", "--layers must be >=3, got 2"),
    ("proxylessnas", "edge_all"),
    ("proxylessnas", "needs --space nb201"),  # an arch string is an unknown genotype name there (its own test)
    *((m, needle) for m in NO_NB201 for _, needle in NB201_CASES),
}
CASES.append((["--genotype", EDGE_ALL], "edge_all"))
VALID = {  # flags that make TINY's 2-epoch search a valid run of a method (a longer warm-up is a usage error)
    "pc_darts": ["--warmup-epochs", "1"],
    "p_darts": ["--warmup-epochs", "1"],
    "daas": ["--warmup-epochs", "1"],
    "proxylessnas": ["--warmup-epochs", "0"],
}


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def image_tree(root, splits):
    from PIL import Image

    for split, classes in splits.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(root / split / cls / f"{i}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "a_file").write_text("not a folder")
    image_tree(tmp / "mismatch", {"train": ["cat", "dog"], "val": ["cat", "cow"]})
    image_tree(tmp / "oneclass", {"train": ["cat"], "val": ["cat"]})
    (tmp / "empty" / "train").mkdir(parents=True)
    (tmp / "empty" / "val").mkdir()
    (tmp / "runs" / "earlier-run").mkdir(parents=True)  # a folder that must not change
    (tmp / "runs" / "earlier-run" / "results.json").write_text("{}")
    readonly = tmp / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    return tmp, (readonly if os.geteuid() != 0 else "/proc")  # root writes anywhere except /proc


def call(method, argv, capsys):
    mod = importlib.import_module(method)
    with pytest.raises(SystemExit) as exit_info:
        common.cli(mod.main, mod.Args, argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flags,needle", CASES, ids=[" ".join(f)[:40] for f, _ in CASES])
@pytest.mark.parametrize("method", METHODS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, capsys, method, flags, needle):
    if (method, needle) in NOT_FOR:
        pytest.skip(f"{method} reads this input")
    tmp, readonly = world
    flags = [f.format(tmp=tmp, readonly=readonly) for f in flags]
    argv = [*TINY, *VALID.get(method, []), "--out-dir", str(tmp / "runs"), *flags]
    before = snapshot(tmp)
    code, err = call(method, argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert snapshot(tmp) == before  # no new run folder, the earlier one untouched


@pytest.mark.parametrize("method", METHODS)
def test_help_names_every_flag_with_its_source(method, capsys):
    mod = importlib.import_module(method)
    with pytest.raises(SystemExit) as exit_info:
        common.cli(mod.main, mod.Args, ["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--genotype", "--resume", "--retrain-epochs", "--retrain-val-portion", "--layers", "--lr"):
        assert flag in out, flag
