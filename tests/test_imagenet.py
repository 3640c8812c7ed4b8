"""The ImageNet mobile setting: NetworkImageNet against the official parameter counts, count_macs against
closed forms and a paper figure, and --dataset imagenet on a small ImageFolder tree written here."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
from conftest import ROOT, TINY, read_jsonl, rows, run_script

# Parameters without the auxiliary head, and of the auxiliary head, of the OFFICIAL NetworkImageNet
# classes, 1000 classes, 14 cells. Measured on CPU (torch 2.14.1) by instantiating each repository's own
# model.py with its own genotypes.py, checked out outside this repository:
#   quark0/darts @ f276dd3 cnn/model.py                 DARTS_V2, and the other cells of GENOTYPES
#   yuhuixu1993/PC-DARTS @ b74702f model.py             PC_DARTS_cifar, PC_DARTS_image
#   chenxin061/pdarts @ b880e87 model.py                PDARTS (its aux head keeps the 768-channel BN)
#   D-X-Y/AutoDL-Projects @ f46486e xautodl/nas_infer_model/DXYs/ImageNet.py, C=50, N=4 (GDAS's
#     configs/archs/NAS-IMAGENET-GDAS_V1.config): 5345075, the same as quark0/darts's model.py at C=50
# (the only local fix needed: utils.count_parameters_in_MB's np.sum(generator) -> sum). With identical
# weights, our network's logits and aux logits equal the official ones to 2e-16 in float64 at 224 px,
# train and eval mode (DARTS_V2, PC_DARTS_image, PDARTS).
# name, C, parameters without the aux head, aux-head parameters, aux head with the 768 BN (pdarts)
OFFICIAL = [
    ("DARTS_V2", 48, 4_718_752, 1_260_776, False),  # quark0/darts README "4.7M model params"
    ("DARTS_V1", 48, 4_510_432, 1_260_776, False),
    ("PC_DARTS", 48, 5_270_560, 1_260_776, False),  # PC-DARTS model.py, CIFAR-10 cell transferred
    ("PC_DARTS_ImageNet", 48, 5_342_464, 1_260_776, False),  # PC-DARTS model.py, PC_DARTS_image
    ("PDARTS", 48, 4_944_352, 1_262_312, True),  # pdarts model.py
    ("GDAS_V1", 50, 5_345_075, 1_264_872, False),  # GDAS's C=50; darts head (AutoDL's keeps the BN: 1_266_408)
    ("SNAS_mild", 48, 3_939_328, 1_260_776, False),  # quark0/darts model.py with the SNAS cell
    ("ENAS", 48, 5_625_952, 1_236_200, False),  # quark0/darts model.py with the ENAS cell (no ENAS ImageNet run)
]
# SNAS's own SNAS/model.py puts an affine BN after every pooling op (snas.py Deviations): its official
# counts are a little higher. SNAS/train_imagenet.py defaults to C=50 and SNAS_moderate.
SNAS_OFFICIAL = [("SNAS_mild", 48, 3_942_208), ("SNAS_mild", 50, 4_238_875), ("SNAS_moderate", 50, 4_637_475)]


@pytest.mark.parametrize("name,C,params,aux,aux_bn", OFFICIAL, ids=[f"{r[0]}-C{r[1]}" for r in OFFICIAL])
def test_parameter_counts_equal_the_official_networks(name, C, params, aux, aux_bn):
    net = common.NetworkImageNet(C, 1000, 14, True, common.GENOTYPES[name], aux_batchnorm=aux_bn)
    total = sum(p.numel() for p in net.parameters())
    assert round(common.count_parameters(net) * 1e6) == params and total - params == aux


@pytest.mark.parametrize("name,C,official", SNAS_OFFICIAL)
def test_snas_counts_within_half_a_percent_of_snas_own_network(name, C, official):
    net = common.NetworkImageNet(C, 1000, 14, False, common.GENOTYPES[name])
    assert abs(common.count_parameters(net) * 1e6 / official - 1) < 0.005


def test_pc_darts_imagenet_genotype_is_the_official_pc_darts_image():
    g = common.GENOTYPES["PC_DARTS_ImageNet"]
    assert g.normal[0] == ("skip_connect", 1) and g.reduce[-1] == ("sep_conv_3x3", 3)
    assert g != common.GENOTYPES["PC_DARTS"] and common.validate_genotype(g) is g
    assert common.parse_genotype("PC_DARTS_ImageNet") is g


def test_forward_shapes_at_224_with_and_without_the_auxiliary_head():
    torch.manual_seed(0)
    net = common.NetworkImageNet(8, 10, 5, True, common.GENOTYPES["DARTS_V2"])  # reductions at cells 1 and 3
    seen = {}
    net.stem0.register_forward_hook(lambda m, i, o: seen.__setitem__("stem0", o.shape[-1]))
    net.stem1.register_forward_hook(lambda m, i, o: seen.__setitem__("stem1", o.shape[-1]))
    net.auxiliary_head.register_forward_hook(lambda m, i, o: seen.__setitem__("aux_in", tuple(i[0].shape)))
    x = torch.randn(2, 3, 224, 224)
    net.train()
    logits, aux = net(x)
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
    # 224 -> 112 -> 56 (stem0) -> 28 (stem1) -> 14 -> 7: the tower reads the 7x7 map of the 2nd reduction cell
    assert seen == {"stem0": 56, "stem1": 28, "aux_in": (2, 4 * 32, 7, 7)}
    net.eval()
    logits, aux = net(x)
    assert logits.shape == (2, 10) and aux is None
    plain = common.NetworkImageNet(8, 10, 5, False, common.GENOTYPES["DARTS_V2"]).train()
    assert plain.auxiliary_head is None and plain(x)[1] is None
    small = common.NetworkImageNet(8, 10, 5, True, common.GENOTYPES["PDARTS"], aux_batchnorm=True).train()
    logits, aux = small(torch.randn(2, 3, 64, 64))  # the tower's input is 2x2 here: pooled adaptively
    assert logits.shape == aux.shape == (2, 10)


def test_auxiliary_head_at_7x7_is_the_official_sequence():
    """official model.py AuxiliaryHeadImageNet: ReLU, AvgPool(5, stride 2), 1x1 conv, BN, ReLU, 2x2 conv,
    (no BN), ReLU, linear; at 7x7 our adaptive pool must be a no-op."""
    torch.manual_seed(0)
    head = common.AuxiliaryHeadImageNet(16, 5).eval()
    x = torch.randn(3, 16, 7, 7)
    f = head.features
    want = nn.functional.avg_pool2d(torch.relu(x), 5, stride=2, count_include_pad=False)  # (3, 16, 2, 2)
    want = torch.relu(f[3](torch.relu(f[1](f[0](want)))))  # (3, 768, 1, 1)
    want = head.classifier(want.flatten(1))
    assert len(f) == 5 and not any(isinstance(m, nn.BatchNorm2d) and m.num_features == 768 for m in f)
    torch.testing.assert_close(head(x), want)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in common.AuxiliaryHeadImageNet(16, 5, batchnorm=True).features) == 2


def test_count_macs_of_single_layers_is_the_closed_form():
    conv = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)  # 32 -> 16 px
    assert common.count_macs(conv, 32) * 1e6 == pytest.approx(16 * 16 * 16 * 3 * 3 * 3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False),  # depthwise: 25 MACs per output
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 10 * 10, 7))
    # conv 20x20x8 outputs x 27, depthwise 20x20x8 x 25, linear 800 x 7; BN, ReLU, pooling count nothing
    assert common.count_macs(net, 20) * 1e6 == pytest.approx(20 * 20 * 8 * 27 + 20 * 20 * 8 * 25 + 800 * 7)
    assert net.training  # count_macs restores the mode
    assert common.count_macs(nn.Sequential(nn.ReLU(), nn.AvgPool2d(2)), 8) == 0  # no parameters, no MACs


@pytest.mark.parametrize("name,C,macs", [("DARTS_V2", 48, 529.91), ("GDAS_V1", 50, 581.01)])
def test_count_macs_of_the_mobile_networks(name, C, macs):
    """Conv + linear MACs at 224 px, auxiliary tower off. GDAS's own counter (AutoDL xautodl/utils/
    flop_benchmark.py: conv and linear only) gives its paper's 581 M; DARTS's 574 M is not reproducible
    this way (quark0/darts issue #46: D-X-Y got 523 M counting conv and fc, and no counter was released)."""
    net = common.NetworkImageNet(C, 1000, 14, True, common.GENOTYPES[name])
    assert common.count_macs(net, 224) == pytest.approx(macs, abs=0.01)


def _image_tree(root, classes=("n01", "n02"), n=3, size=64):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.JPEG")
    return root


def test_imagenet_dataset_reads_the_imagefolder_layout_with_the_official_transforms(tmp_path):
    root = _image_tree(tmp_path / "imagenet")
    train, n_classes, size = common.load_dataset("imagenet", root, True, image_size=32, cutout=16)
    assert (n_classes, size, len(train), train.classes) == (2, 32, 6, ["n01", "n02"])
    x, y = train[0]
    assert x.shape == (3, 32, 32) and y == 0
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Normalize"]
    jitter = train.transform.transforms[2]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4),) * 3 + ((-0.2, 0.2),)
    assert train.transform.transforms[-1].mean == common.IMAGENET_STATS[0]
    val, _, _ = common.load_dataset("imagenet", root, False, image_size=32)
    resize, crop = val.transform.transforms[:2]
    assert (resize.size, crop.size) == (37, (32, 32)) and val[5][0].shape == (3, 32, 32) and val[5][1] == 1
    val224, _, size = common.load_dataset("imagenet", root, False)  # default: the official 256 / 224
    assert size == 224 and val224.transform.transforms[0].size == 256 and val224[0][0].shape == (3, 224, 224)
    assert "imagenet" in common.DATASETS


def test_imagenet_dataset_missing_or_empty_folders_are_usage_errors(tmp_path):
    with pytest.raises(common.UsageError, match="needs .*/train/ with one sub-folder per class"):
        common.load_dataset("imagenet", tmp_path / "nothing", True)
    (tmp_path / "empty" / "val" / "n01").mkdir(parents=True)
    with pytest.raises(common.UsageError, match="holds no images"):
        common.load_dataset("imagenet", tmp_path / "empty", False)


@pytest.mark.slow
def test_darts_searches_on_an_imagenet_tree_from_the_command_line(run, tmp_path):
    root = _image_tree(tmp_path / "imagenet", n=8)
    flags = [*TINY, "--dataset", "imagenet", "--data", root, "--epochs", "1", "--no-retrain"]
    proc, run_dir = run("darts.py", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "genotype.json").is_file() and "search epoch 0 step 1/1" in (run_dir / "log.txt").read_text()
    bad = run_script("darts.py", *TINY, "--dataset", "imagenet", "--data", tmp_path / "none", "--out-dir",
                     tmp_path / "runs")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --dataset imagenet needs ")
    assert bad.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_retraining_on_imagenet_uses_the_mobile_network_and_train_imagenet_recipe(run, tmp_path):
    """--dataset imagenet: NetworkImageNet, StepLR 0.97, label smoothing 0.1, wd 3e-5, top-5 in the results;
    a typed flag beats the recipe."""
    root = _image_tree(tmp_path / "imagenet", n=4)
    proc, d = run("darts.py", "--genotype", "DARTS_V2", "--dataset", "imagenet", "--data", root, "--image-size", "32",
                  "--device", "cpu", "--workers", "0", "--retrain-epochs", "3", "--retrain-init-channels", "4",
                  "--retrain-layers", "3", "--retrain-batch-size", "4", "--retrain-weight-decay", "1e-4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = json.loads((d / "args.json").read_text())
    assert (args["retrain_schedule"], args["retrain_lr"], args["label_smoothing"], args["auxiliary"],
            args["drop_path_prob"], args["cutout"]) == ("step", 0.1, 0.1, True, 0.0, False)
    assert args["retrain_weight_decay"] == 1e-4  # typed: the recipe's 3e-5 does not override it
    history = read_jsonl(d / "retrain_history.jsonl")
    assert [round(r["lr"], 6) for r in history] == [0.1, 0.097, 0.09409]
    assert all(0 <= r["test_acc"] <= r["test_acc_top5"] == 100 for r in history)  # 2 classes: top-5 is all
    result = json.loads((d / "results.json").read_text())["retrain"]
    net = common.NetworkImageNet(4, 2, 3, True, common.GENOTYPES["DARTS_V2"])
    assert result["params_M"] == pytest.approx(common.count_parameters(net))
    assert result["macs_M"] == pytest.approx(common.count_macs(net, 32)) and result["test_acc_top5"] == 100


def test_help_shows_the_imagenet_recipe_beside_each_default():
    proc = run_script("darts.py", "--help")
    text = " ".join(proc.stdout.split())
    assert "train.py --epochs 600 (--no-retrain skips retraining) [--dataset imagenet: 250]" in text


def _scheduled(schedule, epochs, warmup=0, lr=0.5):
    args = common.BaseArgs(retrain_schedule=schedule, retrain_epochs=epochs, retrain_warmup_epochs=warmup)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr)
    sched = common.retrain_scheduler(opt, args)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_retrain_schedules_are_the_official_rules():
    # PC-DARTS train_imagenet.py: warm-up lr0 (e+1)/5 for e < 5 (batch > 256), else adjust_lr's linear rule
    def official(e, E=250, lr=0.5):
        if e < 5:
            return lr * (e + 1) / 5.0
        return lr * (E - 5 - e) / (E - 5) if E - e > 5 else lr * (E - e) / ((E - 5) * 5)

    assert _scheduled("linear", 250, 5) == pytest.approx([official(e) for e in range(250)], rel=1e-12)
    assert _scheduled("step", 20, lr=0.1) == pytest.approx([0.1 * 0.97 ** e for e in range(20)], rel=1e-12)
    cosine = _scheduled("cosine", 10, lr=0.025)  # train.py's CosineAnnealingLR, unchanged
    assert cosine == pytest.approx([0.0125 * (1 + math.cos(math.pi * e / 10)) for e in range(10)], rel=1e-9)


def _torchrun(*flags, out, name):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", str(ROOT / "darts.py"), *map(str, flags)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_torchrun_retrains_imagenet_at_224_px_and_resumes(tmp_path):
    """Two gloo processes (the c10d rendezvous of a multi-node launch) on 224-px images: both end with the same
    weights, rank 0 alone writes, and a run killed after its first epoch resumes under torchrun to the
    uninterrupted run's history and weights."""
    root = _image_tree(tmp_path / "imagenet", n=4, size=224)
    flags = ["--genotype", "DARTS_V2", "--dataset", "imagenet", "--data", root, "--device", "cpu", "--workers", "0",
             "--retrain-epochs", "2", "--retrain-init-channels", "4", "--retrain-layers", "3",
             "--retrain-batch-size", "4", "--out-dir", tmp_path]
    ref = _torchrun(*flags, "--run-name", "ref", out=tmp_path, name="ref")
    out, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err[-3000:]
    sums = dict(line.split(": final weights checksum ") for line in out.splitlines() if "checksum" in line)
    assert set(sums) == {"rank 0", "rank 1"} and len(set(sums.values())) == 1, out[-2000:]
    assert (tmp_path / "ref" / "log.txt").read_text().count("new run folder") == 1
    result = json.loads((tmp_path / "ref" / "results.json").read_text())["retrain"]
    assert result["processes"] == 2 and result["image_size"] == 224 and "test_acc_top5" in result
    killed = _torchrun(*flags, "--run-name", "killed", out=tmp_path, name="killed")
    ckpt = tmp_path / "killed" / "checkpoint_retrain.pt"
    t0 = time.time()
    while not ckpt.exists():
        assert killed.poll() is None and time.time() - t0 < 600
        time.sleep(0.05)
    killed.send_signal(signal.SIGTERM)  # torchrun passes it to both workers
    killed.communicate(timeout=120)
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = _torchrun("--resume", tmp_path / "killed", "--device", "cpu", "--workers", "0", out=tmp_path, name="")
    out2, err2 = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err2[-3000:]
    assert [line for line in out2.splitlines() if "checksum" in line] and \
        dict(line.split(": final weights checksum ") for line in out2.splitlines() if "checksum" in line) == sums
    assert rows(tmp_path / "killed" / "retrain_history.jsonl") == rows(tmp_path / "ref" / "retrain_history.jsonl")
