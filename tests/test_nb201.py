"""common.py NAS-Bench-201 section: the benchmark's own network (exact parameter counts), cell wiring in
closed form, the arch string and its benchmark index, the 200-epoch recipe, and the benchmark lookup
through the official API packages on small files in their real formats (the real files cannot be
downloaded here)."""
import itertools
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import NB201_EDGES, NB201_OPS, NB201_PRIMITIVES, NB201Cell, NB201Network, UsageError

ALL = {op: "|{0}~0|+|{0}~0|{0}~1|+|{0}~0|{0}~1|{0}~2|".format(op) for op in NB201_PRIMITIVES}
README_ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
MIXED = "|nor_conv_1x1~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"

# Parameter counts of the benchmark's evaluation network, C=16, N=5, obtained by instantiating the
# official code: pip install --no-deps --target DIR xautodl==1.0.0 (= D-X-Y/AutoDL-Projects @ f46486e),
# then sum(p.numel() for p in get_cell_based_tiny_net({"name": "infer.tiny", "C": 16, "N": 5,
# "genotype": CellStructure.str2structure(arch), "num_classes": K}).parameters()).
# The range "about 0.07 M to 1.53 M on CIFAR-10" is the all-parameter-free and all-conv3x3 cells.
OFFICIAL_PARAMS = [
    (ALL["none"], 10, 73306), (ALL["none"], 100, 79156), (ALL["none"], 120, 80456),
    (ALL["skip_connect"], 10, 73306), (ALL["avg_pool_3x3"], 10, 73306),
    (ALL["nor_conv_1x1"], 10, 241306),
    (ALL["nor_conv_3x3"], 10, 1531546), (ALL["nor_conv_3x3"], 100, 1537396), (ALL["nor_conv_3x3"], 120, 1538696),
    (README_ARCH, 10, 802426), (README_ARCH, 100, 808276),
    (MIXED, 10, 372346), (MIXED, 120, 379496),
]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,num_classes,official", OFFICIAL_PARAMS)
def test_parameter_counts_equal_the_official_network(arch, num_classes, official):
    assert n_params(NB201Network(arch, num_classes)) == official


def test_parameter_range_is_the_papers():
    """0.07 M (no conv anywhere) to 1.53 M (nor_conv_3x3 on every edge) on CIFAR-10."""
    assert round(n_params(NB201Network(ALL["none"], 10)) / 1e6, 2) == 0.07
    assert round(n_params(NB201Network(ALL["nor_conv_3x3"], 10)) / 1e6, 2) == 1.53


def test_network_forward_and_list_input():
    net = NB201Network(common.parse_nb201_arch(MIXED), 10, C=4, N=1)  # a list of 6 op names
    assert net.arch == MIXED
    for size in (32, 16):  # CIFAR and ImageNet16-120
        logits, aux = net(torch.randn(2, 3, size, size))
        assert logits.shape == (2, 10) and aux is None
    assert len(net.cells) == 3 * 1 + 2


def test_all_none_network_ignores_its_input():
    """Every cell outputs 0, so in eval mode the logits cannot depend on the image."""
    net = NB201Network(ALL["none"], 10, C=4, N=1).eval()
    a, _ = net(torch.randn(2, 3, 16, 16))
    b, _ = net(torch.randn(2, 3, 16, 16))
    assert torch.equal(a, b)


# closed forms of the cell DAG with skip/none only: node i = sum_{j<i} op_(i,j)(node j)
WIRING = [
    (ALL["skip_connect"], 4.0),  # n1 = x, n2 = x + n1 = 2x, n3 = x + n1 + n2 = 4x
    ("|skip_connect~0|+|none~0|skip_connect~1|+|none~0|none~1|skip_connect~2|", 1.0),  # chain 0 -> 1 -> 2 -> 3
    ("|none~0|+|skip_connect~0|none~1|+|none~0|skip_connect~1|none~2|", 0.0),  # n3 = n1 = 0
    ("|skip_connect~0|+|skip_connect~0|none~1|+|skip_connect~0|skip_connect~1|skip_connect~2|", 3.0),
    ("|none~0|+|skip_connect~0|skip_connect~1|+|none~0|none~1|skip_connect~2|", 1.0),  # n2 = x + 0
    ("|skip_connect~0|+|none~0|none~1|+|none~0|skip_connect~1|skip_connect~2|", 1.0),  # n3 = n1 + n2 = x + 0
]


@pytest.mark.parametrize("arch,factor", WIRING)
def test_cell_wiring_follows_the_benchmark_edge_order(arch, factor):
    cell = NB201Cell(common.parse_nb201_arch(arch), 3, 3)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(cell(x), factor * x)


def test_ops_keep_shape_and_follow_the_bn_settings():
    x = torch.randn(2, 8, 6, 6)
    for name in NB201_PRIMITIVES:
        op = NB201_OPS[name](8, 8, 1, False, False)
        assert op(x).shape == x.shape, name
        for m in op.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert not m.affine and not m.track_running_stats
            if isinstance(m, nn.Conv2d):
                assert m.bias is not None  # official bias=not affine
    conv = NB201_OPS["nor_conv_3x3"](8, 8, 1, True, True)
    assert conv[1].bias is None and conv[2].affine and conv[2].track_running_stats
    with pytest.raises(ValueError):
        NB201_OPS["skip_connect"](8, 8, 2, True, True)


def test_resnet_block_halves_and_doubles():
    block = common.NB201ResNetBlock(8, 16)
    assert block(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)
    # parameters: two 3x3 convs + their BNs + the 1x1 shortcut conv
    assert n_params(block) == 8 * 16 * 9 + 16 * 16 * 9 + 2 * 2 * 16 + 8 * 16
    # with the residual branch's last BN zeroed, out = shortcut = Conv1x1(AvgPool2x2(x))
    nn.init.zeros_(block.conv_b[2].weight)
    nn.init.zeros_(block.conv_b[2].bias)
    x = torch.randn(2, 8, 8, 8)
    shortcut = F.conv2d(F.avg_pool2d(x, 2), block.downsample[1].weight)
    assert torch.allclose(block(x), shortcut, atol=1e-6)


# --- a DARTS-style search supernet built from the common pieces, as a method file builds its own
class DartsMixedOp(nn.Module):
    def __init__(self, C, track_running_stats):
        super().__init__()
        self.ops = nn.ModuleList(NB201_OPS[name](C, C, 1, False, track_running_stats) for name in NB201_PRIMITIVES)

    def forward(self, x, w):  # w: (n_ops,)
        return sum(wk * op(x) for wk, op in zip(w, self.ops))


class SearchCell(nn.Module):
    def __init__(self, C, track_running_stats):
        super().__init__()
        self.edges = nn.ModuleList(DartsMixedOp(C, track_running_stats) for _ in NB201_EDGES)

    def forward(self, x, weights):  # weights: (6, n_ops)
        nodes = [x]
        for i in range(1, common.NB201_NODES):
            nodes.append(sum(self.edges[e](nodes[j], weights[e]) for e, (to, j) in enumerate(NB201_EDGES) if to == i))
        return nodes[-1]


class Supernet(nn.Module):
    def __init__(self, C, N, num_classes, track_running_stats):
        super().__init__()
        self.stem = common.nb201_stem(C)
        self.cells = nn.ModuleList(SearchCell(c_in, track_running_stats) if kind == "cell"
                                   else common.NB201ResNetBlock(c_in, c_out) for kind, c_in, c_out in common.nb201_layout(C, N))
        self.lastact = common.nb201_lastact(4 * C)
        self.classifier = nn.Linear(4 * C, num_classes)
        self.alphas = nn.Parameter(1e-3 * torch.randn(len(NB201_EDGES), len(NB201_PRIMITIVES)))

    def forward(self, x):
        w = F.softmax(self.alphas, dim=-1)
        h = self.stem(x)
        for cell in self.cells:
            h = cell(h, w) if isinstance(cell, SearchCell) else cell(h)
        return self.classifier(F.adaptive_avg_pool2d(self.lastact(h), 1).flatten(1))


@pytest.mark.parametrize("track_running_stats,buffers", [(False, 550), (True, 14170)])
def test_search_supernet_from_common_pieces_matches_the_official_one(track_running_stats, buffers):
    """xautodl 1.0.0 TinyNetworkDarts(C=16, N=5, max_nodes=4, 10 classes, NAS_BENCH_201, affine=False,
    track_running_stats): 1692826 weights (get_weights()) + 30 arch parameters; 550 / 14170 buffer
    elements with track_running_stats False / True (counted as in OFFICIAL_PARAMS' comment)."""
    net = Supernet(16, 5, 10, track_running_stats)
    assert sum(p.numel() for n, p in net.named_parameters() if n != "alphas") == 1692826
    assert net.alphas.numel() == 30
    assert sum(b.numel() for b in net.buffers()) == buffers
    small = Supernet(4, 1, 10, track_running_stats)
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 10)


# --- arch strings
def test_arch_string_round_trip_over_the_whole_space():
    archs = common.nb201_all_archs()
    for arch in archs:
        assert common.nb201_arch_str(common.parse_nb201_arch(arch)) == arch
    for ops in itertools.islice(itertools.product(NB201_PRIMITIVES, repeat=6), 0, None, 97):
        assert common.parse_nb201_arch(common.nb201_arch_str(ops)) == list(ops)
    assert common.nb201_arch_str(["nor_conv_3x3", "none", "avg_pool_3x3", "skip_connect", "nor_conv_3x3",
                                  "nor_conv_1x1"]) == \
        "|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"


def test_edges_within_a_node_may_come_in_any_order():
    """...and surrounding whitespace is ignored; the result is the canonical string."""
    arch = "  |nor_conv_3x3~0|+|avg_pool_3x3~1|nor_conv_3x3~0|+|skip_connect~2|nor_conv_3x3~1|skip_connect~0|\n"
    assert common.nb201_arch_str(common.parse_nb201_arch(arch)) == README_ARCH


BAD_ARCHS = [
    ("", "3 nodes"),
    ("|none~0|", "3 nodes"),
    ("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|+|none~0|", "3 nodes"),
    ("none~0+|none~0|none~1|+|none~0|none~1|none~2|", "must look like"),
    ("|none~0|+|none~0|+|none~0|none~1|none~2|", "no edge from node(s) [1]"),
    ("|none~1|+|none~0|none~1|+|none~0|none~1|none~2|", "cannot read node 1"),
    ("|none~0|+|none~0|none~0|+|none~0|none~1|none~2|", "reads node 0 twice"),
    ("|none0|+|none~0|none~1|+|none~0|none~1|none~2|", "expected 'op~j'"),
    ("|none~x|+|none~0|none~1|+|none~0|none~1|none~2|", "expected 'op~j'"),
    ("|nor_conv3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|", "did you mean 'nor_conv_3x3'"),
    ("|sep_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|", "unknown op 'sep_conv_3x3'"),
    ("||+|none~0|none~1|+|none~0|none~1|none~2|", "expected 'op~j'"),
]


@pytest.mark.parametrize("text,message", BAD_ARCHS)
def test_bad_arch_strings_are_rejected_in_one_line(text, message):
    with pytest.raises(UsageError) as e:
        common.parse_nb201_arch(text)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("ops,message", [(["none"] * 5, "6 edges"), (["none"] * 5 + ["conv"], "unknown NB-201 op"),
                                         (["none"] * 7, "6 edges")])
def test_bad_op_lists_are_rejected(ops, message):
    with pytest.raises(UsageError, match=message):
        common.nb201_arch_str(ops)
    with pytest.raises(UsageError, match=message):
        NB201Network(ops, 10)


# --- the benchmark index
def test_benchmark_index_anchors_from_the_official_code():
    """exps/NAS-Bench-201/main.py generate_meta_info asserts these three positions of its list."""
    before = random.getstate()
    archs = common.nb201_all_archs()
    assert random.getstate() == before  # the global RNG is untouched
    assert len(archs) == len(set(archs)) == common.NB201_NUM_ARCHS == 15625
    assert archs[0] == "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|"
    assert archs[9] == "|avg_pool_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|nor_conv_3x3~2|"
    assert archs[123] == "|avg_pool_3x3~0|+|avg_pool_3x3~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|"
    assert common.nb201_index(archs[123]) == 123
    assert common.nb201_index(common.parse_nb201_arch(archs[9])) == 9
    assert sorted(archs) == sorted(common.nb201_arch_str(o) for o in itertools.product(NB201_PRIMITIVES, repeat=6))


def test_derive_takes_the_argmax_per_edge_including_none():
    w = torch.full((6, 5), 0.1)
    for e, k in enumerate([3, 0, 4, 1, 3, 0]):  # 'none' wins edges 2<-0 and 3<-2
        w[e, k] = 0.6
    arch = common.nb201_derive(w)
    assert arch == "|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|none~2|"
    assert common.nb201_record(arch) == {"space": "nb201", "arch": arch, "nb201_index": common.nb201_index(arch)}
    with pytest.raises(ValueError):
        common.nb201_derive(torch.zeros(14, 8))


def test_200_epoch_recipe():
    """200E.config: SGD lr 0.1, momentum 0.9, Nesterov, wd 5e-4, cosine to 0 per epoch (the official
    CosineAnnealingLR: lr_e = 0.1 * (1 + cos(pi e / 200)) / 2 at the start of epoch e)."""
    assert common.NB201_RETRAIN["batch_size"] == 256 and common.NB201_RETRAIN["epochs"] == 200
    opt, sched = common.nb201_optimizer([nn.Parameter(torch.zeros(1))])
    group = opt.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for e in (0, 1, 50, 100, 199):
        assert lrs[e] == pytest.approx(0.1 * (1 + np.cos(np.pi * e / 200)) / 2, abs=1e-12)


# --- the benchmark lookup, on files in the APIs' real formats
DATASETS = {  # dataset -> evaluation sets stored by the benchmark (api_utils.py get_metrics docstring)
    "cifar10-valid": ["x-valid", "ori-test"], "cifar10": ["ori-test"],
    "cifar100": ["x-valid", "x-test", "ori-test"], "ImageNet16-120": ["x-valid", "x-test", "ori-test"]}
SEEDS = [777, 888]


def final_acc(k, dataset, setname, seed, epochs):
    """A distinct final accuracy per (arch, dataset, set, seed, hp)."""
    return 40.0 + 10 * k + list(DATASETS).index(dataset) + 0.25 * ["train", "x-valid", "x-test", "ori-test"].index(
        setname) + 0.01 * SEEDS.index(seed) + (0.5 if epochs == 200 else 0.0)


def arch_results(pkg, k, index, arch, epochs):
    """One ArchResults made with the package's own classes, as exps/NAS-Bench-201/statistics.py builds
    them; accuracies rise over the epochs, so only the last epoch gives final_acc."""
    res = pkg.ArchResults(index, arch)
    for dataset, sets in DATASETS.items():
        for seed in SEEDS:
            ramp = [e / (epochs - 1) for e in range(epochs)]
            train = {e: r * final_acc(k, dataset, "train", seed, epochs) for e, r in enumerate(ramp)}
            rc = pkg.ResultsCount(dataset, None, train, {e: 1.0 - r for e, r in enumerate(ramp)},
                                  np.float64(0.8), np.float64(100.0),  # numpy scalars, as the real file has
                                  {"channel": 16, "num_cells": 5, "arch_str": arch, "class_num": 10},
                                  seed, epochs, [0.01])
            accs = {f"{s}@{e}": r * final_acc(k, dataset, s, seed, epochs) for s in sets for e, r in enumerate(ramp)}
            rc.update_eval(accs, {key: 0.5 for key in accs}, {key: 1.0 for key in accs})
            res.update(dataset, seed, rc)
    return res


EVALUATED = [README_ARCH, ALL["nor_conv_3x3"], MIXED]


def expected(k):
    def mean(dataset, setname):
        return float(np.mean([final_acc(k, dataset, setname, s, 200) for s in SEEDS]))
    return {"cifar10_valid": mean("cifar10-valid", "x-valid"), "cifar10_test": mean("cifar10", "ori-test"),
            "cifar100_valid": mean("cifar100", "x-valid"), "cifar100_test": mean("cifar100", "x-test"),
            "imagenet16_120_valid": mean("ImageNet16-120", "x-valid"),
            "imagenet16_120_test": mean("ImageNet16-120", "x-test")}


def check_lookups(path):
    for k, arch in enumerate(EVALUATED):
        got = common.nb201_lookup(path, arch)
        assert got == pytest.approx(expected(k), abs=1e-9)
        assert all(type(v) is float for v in got.values())
    assert common.nb201_api(path).query_index_by_arch(README_ARCH) == common.nb201_index(README_ARCH)
    with pytest.raises(UsageError, match="no 200-epoch"):
        common.nb201_lookup(path, ALL["none"])  # in meta_archs, never trained in this small file
    with pytest.raises(UsageError, match="unknown op"):
        common.nb201_lookup(path, README_ARCH.replace("avg_pool", "max_pool"))


def test_lookup_nas_bench_201_file(tmp_path):
    api_pkg = pytest.importorskip("nas_201_api", reason="pip install nas-bench-201==2.1 (requirements.txt)")
    meta = common.nb201_all_archs()
    arch2infos = {}
    for k, arch in enumerate(EVALUATED):
        index = meta.index(arch)
        # 'less' = the 12-epoch runs, 'full' = the 200-epoch runs (api_201.py lines 87-88)
        arch2infos[index] = {"less": arch_results(api_pkg, k, index, arch, 12).state_dict(),
                             "full": arch_results(api_pkg, k, index, arch, 200).state_dict()}
    path = tmp_path / "NAS-Bench-201-tiny.pth"
    torch.save({"meta_archs": meta, "arch2infos": arch2infos, "evaluated_indexes": sorted(arch2infos)}, path)
    with pytest.raises(Exception):  # what the 2020 API's plain torch.load meets under torch >= 2.6
        torch.load(path, weights_only=True)
    before = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    check_lookups(path)
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == before
    assert common.nb201_api(str(path)) is common.nb201_api(path)  # loaded once per process


def test_lookup_nats_bench_topology_file_and_folder(tmp_path):
    nats = pytest.importorskip("nats_bench", reason="pip install nats_bench==1.8 (requirements.txt)")
    meta = common.nb201_all_archs()
    infos = {}
    for k, arch in enumerate(EVALUATED):
        index = meta.index(arch)
        infos[index] = {"12": arch_results(nats, k, index, arch, 12).state_dict(),
                        "200": arch_results(nats, k, index, arch, 200).state_dict()}
    # one file (NATS-tss-v1_0-3ffb9.pickle.pbz2; pickle_save appends .pbz2)
    nats.pickle_save({"meta_archs": meta, "arch2infos": infos, "evaluated_indexes": sorted(infos)},
                     str(tmp_path / "NATS-tss-tiny.pickle"))
    check_lookups(tmp_path / "NATS-tss-tiny.pickle.pbz2")
    # a folder of one file per arch (NATS-tss-v1_0-3ffb9-simple, read with fast_mode=True)
    folder = tmp_path / "NATS-tss-tiny-simple"
    folder.mkdir()
    nats.pickle_save({"meta_archs": meta}, str(folder / "meta.pickle"))
    for index, hp2res in infos.items():
        nats.pickle_save(hp2res, str(folder / f"{index:06d}.pickle"))
    check_lookups(folder)


def test_lookup_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="no such file"):
        common.nb201_lookup(tmp_path / "missing.pth", README_ARCH)
    (tmp_path / "bench.pth").write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "nas_201_api", None)  # as if not installed
    with pytest.raises(UsageError, match=r"pip install nas-bench-201==2\.1"):
        common.nb201_api(tmp_path / "bench.pth")
