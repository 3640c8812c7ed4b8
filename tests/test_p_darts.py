"""p_darts.py: op pruning between stages, the skip-connect limit, the skip-dropout schedule and the
stage networks against hand-worked answers; then the script end to end (fake data, digits), killed
in the middle of stage 2 and again between stages 2 and 3 and resumed, and its flag checks."""
import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import p_darts
from common import PRIMITIVES, UsageError
from conftest import ROOT, VOLATILE, read_jsonl, run_script

# 3 stages of 2 epochs (alpha on from epoch 1), 3 / 4 / 5 cells, on 8x8 fake images: seconds on CPU
FAKE = ["--device", "cpu", "--workers", "0", "--dataset", "fake", "--image-size", "8", "--epochs", "2",
        "--warmup-epochs", "1", "--batch-size", "8", "--steps-per-epoch", "2", "--init-channels", "4",
        "--layers", "3", "--add-layers", "0,1,2", "--retrain-epochs", "1", "--retrain-init-channels", "4",
        "--retrain-layers", "3", "--retrain-batch-size", "16", "--report-freq", "1"]
FILES = ["args.json", "log.txt", "p_darts.py", "common.py", "search_history.jsonl", "alphas.jsonl", "genotype.json",
         "checkpoint_search.pt", "alphas.png", "alpha_evolution.png", "search_curves.png", "genotype.png",
         "retrain_history.jsonl", "checkpoint_retrain.pt", "retrain_curves.png", "results.json"]
IDX = {p: i for i, p in enumerate(PRIMITIVES)}


def drop_seconds(obj):
    """Everything but wall-clock fields, recursively."""
    if isinstance(obj, dict):
        return {k: drop_seconds(v) for k, v in obj.items() if k not in VOLATILE}
    return [drop_seconds(v) for v in obj] if isinstance(obj, list) else obj


def cell_weights(spec):
    """(14, 8) weights over PRIMITIVES from {edge: {op: weight}}, NaN for ops not listed (pruned)."""
    w = torch.full((14, 8), float("nan"))
    for e, ops in spec.items():
        for op, v in ops.items():
            w[e, IDX[op]] = v
    return w


# ----------------------------------------------------------------------------------------
# (P1) op pruning between stages
# ----------------------------------------------------------------------------------------
def test_prune_keeps_the_top_k_ops_of_each_edge_by_softmax_weight():
    all8 = list(PRIMITIVES)
    w = torch.tensor([
        [0.30, 0.02, 0.05, 0.20, 0.15, 0.10, 0.08, 0.10],  # 'none' is strongest: it survives stages 1-2
        [0.01, 0.04, 0.10, 0.10, 0.30, 0.20, 0.15, 0.10],  # 3-way tie at the cut: the earliest op goes
    ])
    kept = p_darts.prune_ops([all8, all8], w, keep=5)
    assert kept[0] == ["none", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_5x5"]
    assert kept[1] == ["skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    # the same from softmax(alpha): the ranking is alpha's, so pruning on alpha or softmax agrees
    alpha = torch.log(w) + 3.0
    assert p_darts.prune_ops([all8, all8], torch.softmax(alpha, 1), keep=5) == kept
    # stage 2 -> 3 on 5 ops: keep 3, columns follow the edge's own op list
    ops5 = [kept[0], kept[0]]
    w5 = torch.tensor([[0.40, 0.10, 0.20, 0.25, 0.05], [0.05, 0.50, 0.30, 0.10, 0.05]])
    assert p_darts.prune_ops(ops5, w5, keep=3) == [["none", "sep_conv_3x3", "sep_conv_5x5"],
                                                   ["skip_connect", "sep_conv_3x3", "sep_conv_5x5"]]
    # after the last stage 'none' is dropped first, even as the strongest (get_min_k_no_zero)
    ops3 = [["none", "skip_connect", "sep_conv_3x3"], ["max_pool_3x3", "sep_conv_3x3", "dil_conv_3x3"]]
    w3 = torch.tensor([[0.7, 0.1, 0.2], [0.3, 0.3, 0.4]])
    assert p_darts.prune_ops(ops3, w3, keep=1, drop_none=True) == [["sep_conv_3x3"], ["dil_conv_3x3"]]
    assert p_darts.prune_ops(ops3, w3, keep=1) == [["none"], ["dil_conv_3x3"]]


def test_dense_puts_each_stage_weight_under_its_op_and_nan_under_pruned_ones():
    ops = [["none", "skip_connect", "dil_conv_5x5"]] * 14
    w = torch.softmax(torch.randn(14, 3), 1)
    d = p_darts.dense(w, ops)
    assert d.shape == (14, 8) and torch.isnan(d).sum() == 14 * 5
    assert torch.equal(d[:, [IDX["none"], IDX["skip_connect"], IDX["dil_conv_5x5"]]], w)


# ----------------------------------------------------------------------------------------
# (P3)-(P4) derivation and the skip-connect limit
# ----------------------------------------------------------------------------------------
S3, S5, D3, D5 = "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"
SK, AVG, MAX, NONE = "skip_connect", "avg_pool_3x3", "max_pool_3x3", "none"
# stage-3 weights (3 ops per edge) whose derived normal cell has 4 skip-connects (edges 0, 1, 2, 5)
FOUR_SKIPS = cell_weights({
    0: {SK: .60, S3: .30, NONE: .10}, 1: {SK: .50, D3: .40, MAX: .10},                      # node 2
    2: {SK: .70, S5: .20, AVG: .10}, 3: {S3: .55, SK: .25, NONE: .20}, 4: {D5: .45, MAX: .35, AVG: .20},  # node 3
    5: {SK: .45, S3: .15, NONE: .40}, 6: {SK: .44, AVG: .30, NONE: .26},                    # node 4
    7: {D3: .60, S5: .25, NONE: .15}, 8: {AVG: .28, S3: .25, NONE: .47},
    9: {S3: .65, SK: .20, NONE: .15}, 10: {D5: .62, S5: .20, NONE: .18}, 11: {MAX: .40, AVG: .35, NONE: .25},
    12: {S5: .50, SK: .30, NONE: .20}, 13: {AVG: .45, D3: .35, NONE: .20}})                 # node 5


def test_skip_limit_removes_the_weakest_skip_and_derives_again_until_m_are_left():
    """Hand-worked, the official way (delete_min_sk_prob, keep_1_on, keep_2_branches in a loop):
    1. weakest skip is edge 5 (0.45): node 4 now prefers edge 6, whose best op is *another* skip (0.44),
       so the cell still has 4 (the paper's "this may bring up other skip-connects");
    2. edge 6's skip (0.44) goes: edge 6 falls back to avg_pool (0.30 > edge 8's 0.28);
    3. edge 1's skip (0.50) goes: node 2 keeps both its edges, edge 1 falls back to dil_conv_3x3."""
    unlimited = p_darts.derive_genotype(FOUR_SKIPS, FOUR_SKIPS, max_skip=8)
    assert unlimited.normal == [(SK, 0), (SK, 1), (SK, 0), (S3, 1), (SK, 0), (D3, 2), (S3, 0), (D5, 1)]
    g = p_darts.derive_genotype(FOUR_SKIPS, FOUR_SKIPS, max_skip=2)
    assert g.normal == [(SK, 0), (D3, 1), (SK, 0), (S3, 1), (AVG, 1), (D3, 2), (S3, 0), (D5, 1)]
    assert sum(op == SK for op, _ in g.normal) == 2
    assert g.reduce == unlimited.reduce  # the limit applies to the normal cell only
    assert p_darts.derive_genotype(FOUR_SKIPS, FOUR_SKIPS, max_skip=3).normal == \
        [(SK, 0), (SK, 1), (SK, 0), (S3, 1), (AVG, 1), (D3, 2), (S3, 0), (D5, 1)]
    # M = 0: the last skip (edge 2) falls back to sep_conv_5x5 (0.20) and loses its place to edge 4 (0.45)
    assert p_darts.derive_genotype(FOUR_SKIPS, FOUR_SKIPS, max_skip=0).normal == \
        [(S3, 0), (D3, 1), (S3, 1), (D5, 2), (AVG, 1), (D3, 2), (S3, 0), (D5, 1)]


def test_derivation_rules_none_pruned_ties_and_order():
    w = cell_weights({e: {NONE: .9, S3: .05, MAX: .05} for e in range(14)})
    w[3, IDX[S3]] = w[4, IDX[S3]] = 0.07  # node 3: tie between edges 3 and 4 goes to the later edge ...
    w[2, IDX[S3]] = 0.08                 # ... after edge 2, the strongest
    w[0, IDX[MAX]] = 0.06                # node 2: 'none' (0.9) never wins; max_pool beats sep_conv on edge 0,
    #                                      and on edge 1 the tie max_pool / sep_conv (0.05) goes to the later op
    g = p_darts.derive_genotype(w, w, max_skip=2)
    assert g.normal[:4] == [(MAX, 0), (S3, 1), (S3, 0), (S3, 2)]  # inputs listed in index order
    assert all(op != NONE for op, _ in g.normal + g.reduce)
    assert all(op in (S3, MAX) for op, _ in g.normal)  # NaN (pruned) ops never win
    assert g.normal_concat == g.reduce_concat == [2, 3, 4, 5]


# ----------------------------------------------------------------------------------------
# (P2) skip-connect dropout and the stage networks
# ----------------------------------------------------------------------------------------
def test_skip_dropout_rate_schedule_closed_form():
    """train_search.py: p0 (E - e - 1) / E while only weights train, p0 exp(-0.2 (e - 10)) after."""
    p = [p_darts.skip_dropout_rate(0.7, e, 25, 10) for e in range(25)]
    assert p[0] == pytest.approx(0.7 * 24 / 25) and p[9] == pytest.approx(0.42)
    assert p[10] == pytest.approx(0.7)  # jumps back to p0 when the alpha updates start
    assert p[24] == pytest.approx(0.7 * math.exp(-2.8)) and p[24] == pytest.approx(0.0426, abs=1e-4)
    assert all(a > b for a, b in zip(p[:9], p[1:10])) and all(a > b for a, b in zip(p[10:-1], p[11:]))
    assert [p_darts.skip_dropout_rate(p0, 0, 25, 10) for p0 in (0.1, 0.4, 0.7)] == \
        pytest.approx([0.096, 0.384, 0.672])


def kind(op):
    """What an op module is, in PRIMITIVES words (search versions: pools carry a BN)."""
    if isinstance(op, nn.Sequential) and isinstance(op[0], nn.Identity):
        return "skip_connect+dropout"
    if isinstance(op, nn.Sequential) and isinstance(op[0], (nn.MaxPool2d, nn.AvgPool2d)):
        return "max_pool_3x3" if isinstance(op[0], nn.MaxPool2d) else "avg_pool_3x3"
    if isinstance(op, (nn.Identity, common.FactorizedReduce)):
        return "skip_connect"
    if isinstance(op, common.Zero):
        return "none"
    if isinstance(op, common.SepConv):
        return f"sep_conv_{op[0][1].kernel_size[0]}x{op[0][1].kernel_size[0]}"
    return f"dil_conv_{op[1].kernel_size[0]}x{op[1].kernel_size[0]}"


def test_stage_network_has_the_configured_cells_and_only_the_surviving_ops():
    torch.manual_seed(0)
    ops8 = [list(PRIMITIVES)] * 14
    ops = {c: p_darts.prune_ops(ops8, torch.softmax(torch.randn(14, 8), 1), 5) for c in p_darts.CELLS}
    net = p_darts.Network(4, 10, 11, ops["normal"], ops["reduce"], p=0.4)  # stage 2: 11 cells, 5 ops
    assert len(net.cells) == 11 and [i for i, c in enumerate(net.cells) if c.reduction] == [3, 7]
    assert net.alphas_normal.shape == net.alphas_reduce.shape == (14, 5)
    for cell in net.cells:
        for (_, source), edge, names in zip(common.edge_names(14), cell.edges,
                                            ops["reduce" if cell.reduction else "normal"]):
            stride2 = cell.reduction and source < 2  # only these keep FactorizedReduce, without dropout
            want = [n + "+dropout" if n == "skip_connect" and not stride2 else n for n in names]
            assert [kind(op) for op in edge.ops] == want
    n_dropout = sum(isinstance(m, nn.Dropout) for m in net.modules())
    skip_edges = {c: [e for e, names in enumerate(ops[c]) if SK in names] for c in p_darts.CELLS}
    stride1_reduce = [e for e in skip_edges["reduce"] if common.edge_names(14)[e][1] >= 2]
    assert n_dropout == 9 * len(skip_edges["normal"]) + 2 * len(stride1_reduce) > 0
    net.set_skip_dropout(0.123)
    assert {m.p for m in net.modules() if isinstance(m, nn.Dropout)} == {0.123}
    assert not any(isinstance(m, nn.Dropout) for m in p_darts.Network(4, 10, 5, ops8, ops8, p=0.0).modules())
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_stage1_supernet_size_matches_the_official_log():
    """1.276 M for stage 1 (C=16, 5 cells, 8 ops): the official log quoted in chenxin061/pdarts#10
    ("param size = 1.276..MB" from train_search.py line 128); its count_parameters_in_MB counts alpha too."""
    ops8 = [list(PRIMITIVES)] * 14
    net = p_darts.Network(16, 10, 5, ops8, ops8, p=0.1)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 3) == 1.276


def test_alpha_gradient_is_clipped():
    """One step of search_epoch with SGD(lr=1) on alpha: the alpha change is the clipped gradient."""
    torch.manual_seed(0)
    ops = [list(PRIMITIVES)] * 14
    net = p_darts.Network(4, 10, 3, ops, ops, p=0.1)
    before = torch.cat([a.detach().flatten().clone() for a in net.arch_parameters()])
    batch = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))]
    args = p_darts.Args(arch_grad_clip=1e-4, steps_per_epoch=1, report_freq=100)
    w_opt = torch.optim.SGD(net.weight_parameters(), 0.0)
    a_opt = torch.optim.SGD(net.arch_parameters(), 1.0)
    log = common.logging.getLogger("test_p_darts")
    p_darts.search_epoch(net, batch, iter(batch), w_opt, a_opt, torch.device("cpu"), args, log, 0, True)
    after = torch.cat([a.detach().flatten() for a in net.arch_parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-4, rel=1e-3)


@pytest.mark.parametrize("flags,needle", [
    (dict(dropout_rate="0.1,0.4"), "--dropout-rate has 2 values but --add-layers has 3"),
    (dict(num_to_keep="5,2,1"), "at least 3"),
    (dict(num_to_keep="5,3,2"), "the last keeps 1"),
    (dict(add_layers="0,x,12"), "comma-separated numbers"),
    (dict(add_layers="0,-3,6"), "--add-layers 0,-3,6: each stage adds >= 0 cells"),
    (dict(add_width="0,0,-1"), "--add-width 0,0,-1: each stage adds >= 0 channels"),
    (dict(dropout_rate="0.1,0.4,1"), "rates must be in [0, 1)"),
    (dict(epochs=8), "--warmup-epochs 10 must be < --epochs 8"),
])
def test_inconsistent_stage_flags_are_usage_errors(flags, needle):
    with pytest.raises(UsageError) as e:
        p_darts.stage_settings(p_darts.Args(**flags))
    assert needle in str(e.value)


@pytest.mark.parametrize("flags,needle", [
    (["--dropout-rate", "0.1,0.4"], "--dropout-rate has 2 values but --add-layers has 3: give one value per stage"),
    (["--add-layers", "0,,12"], "--add-layers takes comma-separated numbers, one per stage; got '0,,12'"),
    (["--add-layers", "0,-1,2"], "--add-layers 0,-1,2: each stage adds >= 0 cells"),
    (["--num-to-keep", "5,3,2"], "the last keeps 1"),
    (["--dropout-rate", "0.1,nan,0.7"], "rates must be in [0, 1)"),
    (["--warmup-epochs", "2"], "--warmup-epochs 2 must be < --epochs 2"),
    (["--arch-start-epoch", "3"], "--warmup-epochs 3 must be < --epochs 2"),  # the old name still works
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >=0, got -1"),
    (["--max-skip", "9"], "--max-skip must be [0, 8], got 9"),
    (["--eval-last", "-1"], "--eval-last must be >=0"),
    (["--arch-grad-clip", "-1"], "--arch-grad-clip must be >=0"),
    (["--dropout-decay", "-0.5"], "--dropout-decay must be >=0"),
    (["--arch-learning-rate", "0"], "--arch-lr must be >0, got 0.0"),
    (["--train-portion", "0"], "--train-portion must be (0, 1), got 0.0"),
    (["--layers", "2", "--add-layers", "1,7,13"], "--layers must be >=3, got 2"),
])
def test_own_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, flags, needle):
    """p_darts.py's own flags and per-stage lists, in-process through common.cli like test_bad_input.py."""
    with pytest.raises(SystemExit) as exit_info:
        common.cli(p_darts.main, p_darts.Args, [*FAKE, "--out-dir", str(tmp_path / "runs"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_arch_start_epoch_is_an_alias_of_warmup_epochs_also_in_old_run_folders(tmp_path):
    assert common.parse_args(p_darts.Args, ["--arch-start-epoch", "3"]).warmup_epochs == 3
    run = tmp_path / "old-run"  # a run folder written before the rename: args.json has arch_start_epoch
    run.mkdir()
    saved = {k: v for k, v in vars(p_darts.Args()).items() if k != "warmup_epochs"}
    (run / "args.json").write_text(json.dumps({**saved, "arch_start_epoch": 7}))
    (run / "p_darts.py").write_text("")
    args = common.resume_args(common.parse_args(p_darts.Args, ["--resume", str(run)]), ROOT / "p_darts.py")
    assert args.warmup_epochs == 7 and not hasattr(args, "arch_start_epoch")


def test_val_half_is_evaluated_in_the_official_epochs():
    """train_search.py line 164: `if epochs - epoch < 5: infer(...)`, i.e. the last 4 of 25 epochs."""
    official = [e for e in range(25) if 25 - e < 5]
    assert official == [21, 22, 23, 24]
    assert [e for e in range(25) if p_darts.evaluates(e, 25, p_darts.Args().eval_last)] == official
    assert [e for e in range(25) if p_darts.evaluates(e, 25, 0)] == list(range(25))  # ours: every epoch


@pytest.mark.parametrize("size", [8, 9, 13, 30, 64])
def test_stage_supernets_run_forward_and_backward_at_any_image_size(size):
    torch.manual_seed(0)
    ops8 = [list(PRIMITIVES)] * 14
    ops3 = [["none", "skip_connect", "sep_conv_3x3"]] * 14
    for ops, cells in ((ops8, 3), (ops3, 5)):
        net = p_darts.Network(4, 10, cells, ops, ops, p=0.3)
        logits = net(torch.randn(2, 3, size, size))
        assert logits.shape == (2, 10)
        grads = torch.autograd.grad(nn.functional.cross_entropy(logits, torch.tensor([1, 2])), net.arch_parameters())
        assert all(g.abs().sum() > 0 for g in grads)


def test_default_stages_are_the_papers():
    assert p_darts.stage_settings(p_darts.Args()) == [
        {"cells": 5, "channels": 16, "keep": 5, "dropout": 0.1},
        {"cells": 11, "channels": 16, "keep": 3, "dropout": 0.4},
        {"cells": 17, "channels": 16, "keep": 1, "dropout": 0.7}]


# ----------------------------------------------------------------------------------------
# The script end to end
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pdarts")
    proc = run_script("p_darts.py", *FAKE, "--out-dir", out, "--run-name", "ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "ref"


@pytest.mark.slow
def test_three_stages_on_fake_write_the_run_folder(ref_run):
    for name in FILES:
        assert (ref_run / name).is_file() and (ref_run / name).stat().st_size > 0, name
    hist = read_jsonl(ref_run / "search_history.jsonl")
    assert [(r["epoch"], r["stage"], r["stage_epoch"], r["cells"]) for r in hist] == \
        [(0, 1, 0, 3), (1, 1, 1, 3), (2, 2, 0, 4), (3, 2, 1, 4), (4, 3, 0, 5), (5, 3, 1, 5)]
    assert [r["arch_update"] for r in hist] == [False, True] * 3
    assert [r["skip_dropout"] for r in hist] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.35, 0.7])
    assert [r["lr"] for r in hist][::2] == [0.025] * 3  # a new cosine schedule per stage
    # (P1) the op set shrinks 8 -> 5 -> 3, and each stage keeps the top ops of the previous one's alpha
    rows = read_jsonl(ref_run / "alphas.jsonl")
    assert [np.array(r["softmax"]["normal"]).shape for r in rows] == [(14, 8)] * 2 + [(14, 5)] * 2 + [(14, 3)] * 2
    for prev, nxt, keep in ((rows[1], rows[2], 5), (rows[3], rows[4], 3)):
        for c in p_darts.CELLS:
            assert nxt["ops"][c] == p_darts.prune_ops(prev["ops"][c], torch.tensor(prev["softmax"][c]), keep)
            assert all(set(a) <= set(b) for a, b in zip(nxt["ops"][c], prev["ops"][c]))
            full = np.array(nxt["softmax_full"][c], dtype=float)
            assert [[PRIMITIVES[i] for i in np.flatnonzero(~np.isnan(r))] for r in full] == nxt["ops"][c]
    results = json.loads((ref_run / "results.json").read_text())
    search = results["search"]
    assert [(s["cells"], s["ops_per_edge"], s["skip_dropout_p0"]) for s in search["stages"]] == \
        [(3, 8, 0.1), (4, 5, 0.4), (5, 3, 0.7)]
    assert all(len(ops) == 1 and ops != ["none"] for c in p_darts.CELLS for ops in search["final_ops"][c])
    # (P3)-(P4): the result is the rule applied to the last stage's logged alpha, with at most 2 skips
    last = {c: p_darts.dense(torch.tensor(rows[-1]["softmax"][c]), rows[-1]["ops"][c]) for c in p_darts.CELLS}
    want = p_darts.derive_genotype(last["normal"], last["reduce"], max_skip=2)
    assert results["genotype"] == common.genotype_to_dict(want) == hist[-1]["genotype"]
    assert sum(op == SK for op, _ in want.normal) <= 2
    assert sorted(search["genotypes_by_max_skip"], key=int) == [str(m) for m in range(9)]
    assert all(sum(op == SK for op, _ in g["normal"]) <= int(m) for m, g in search["genotypes_by_max_skip"].items())
    ckpt = torch.load(ref_run / "checkpoint_search.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["stage"], ckpt["stage_epoch"], len(ckpt["stage_ops"])) == (5, 2, 1, 3)
    assert np.allclose(ckpt["model"]["alphas_normal"].numpy(), rows[-1]["alpha"]["normal"])
    assert ckpt["stage_ops"][2]["normal"] == rows[-1]["ops"]["normal"]
    log = (ref_run / "log.txt").read_text()
    for text in ("stage 1/3: 3 cells", "after stage 1, normal cell:", "stage 3/3: 5 cells, C=4, 3 ops per edge",
                 "after stage 3 (final)", "at most 2 skip-connects", "retrain epoch 0", "test accuracy"):
        assert text in log, text


def kill_at(proc, log, needle, timeout=300):
    """SIGKILL the run as soon as its log.txt contains `needle`."""
    t0 = time.time()
    while not (log.exists() and needle in log.read_text()):
        assert proc.poll() is None, f"the run finished before {needle!r}"
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_in_stage_2_and_between_stages_then_resumed_equals_uninterrupted(ref_run, tmp_path):
    run_dir = tmp_path / "killed"
    quiet = dict(cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, str(ROOT / "p_darts.py"), *FAKE, "--out-dir", str(tmp_path),
                             "--run-name", "killed"], **quiet)
    # in stage 2 (epoch 3 is running): the checkpoint holds stage 2's network after its epoch 0
    kill_at(proc, run_dir / "log.txt", "search epoch 3 step 1/2")
    resume = [sys.executable, str(ROOT / "p_darts.py"), "--resume", str(run_dir), "--device", "cpu", "--workers", "0"]
    proc = subprocess.Popen(resume, **quiet)
    # between stages: stage 3's network is built, the checkpoint is still the end of stage 2
    kill_at(proc, run_dir / "log.txt", "stage 3/3:")
    done = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    log = (run_dir / "log.txt").read_text()
    assert "resuming the search at epoch 3 (stage 2)" in log and "resuming the search at epoch 4 (stage 3)" in log
    for name in ("search_history.jsonl", "alphas.jsonl", "retrain_history.jsonl"):
        assert drop_seconds(read_jsonl(run_dir / name)) == drop_seconds(read_jsonl(ref_run / name)), name
    got, want = (json.loads((d / "results.json").read_text()) for d in (run_dir, ref_run))
    assert drop_seconds(got) == drop_seconds(want)


@pytest.mark.slow  # about 24 s on 2 shared CPU cores
def test_digits_search_then_retrain_learns(tmp_path):
    """Real data, 3 tiny stages and a short retrain: a broken pipeline cannot clear 90 % (chance 10 %).
    Cutout and the auxiliary tower are off to learn in 3 epochs; test_e2e.py covers the recipe."""
    proc = run_script("p_darts.py", "--dataset", "digits", "--device", "cpu", "--workers", "0", "--epochs", "1",
                      "--warmup-epochs", "0", "--batch-size", "130", "--train-portion", "0.2", "--init-channels",
                      "4", "--layers", "3", "--add-layers", "0,1,2", "--retrain-epochs", "3",
                      "--retrain-init-channels", "8", "--retrain-layers", "5", "--retrain-batch-size", "64",
                      "--no-cutout", "--no-auxiliary", "--out-dir", tmp_path, "--run-name", "digits")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "digits" / "results.json").read_text())
    assert [s["ops_per_edge"] for s in results["search"]["stages"]] == [8, 5, 3]
    assert results["retrain"]["test_acc"] > 90, results["retrain"]


def test_bad_stage_flags_are_one_line_and_touch_nothing(tmp_path):
    """The script's side of test_inconsistent_stage_flags_are_usage_errors (one subprocess: imports cost)."""
    proc = run_script("p_darts.py", *FAKE, "--out-dir", tmp_path / "runs", "--dropout-rate", "0.1,0.4")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == "error: --dropout-rate has 2 values but --add-layers has 3: give one value per stage\n"
    assert not (tmp_path / "runs").exists()


def test_imagenet_recipe_is_train_imagenet_py_and_typed_flags_win(capsys):
    """--dataset imagenet: chenxin061/pdarts train_imagenet.py lines 24-40 for untyped flags, in --help too."""
    recipe = common.recipes(p_darts.Args)["--dataset imagenet"]
    assert {k: recipe[k] for k in ("retrain_batch_size", "retrain_lr", "retrain_weight_decay", "retrain_epochs",
                                   "label_smoothing", "retrain_schedule", "aux_batchnorm", "retrain_layers")} == {
        "retrain_batch_size": 256, "retrain_lr": 0.1, "retrain_weight_decay": 3e-5, "retrain_epochs": 250,
        "label_smoothing": 0.1, "retrain_schedule": "linear", "aux_batchnorm": True, "retrain_layers": 14}
    args = common.parse_args(p_darts.Args, ["--dataset", "imagenet", "--retrain-lr", "0.05"])
    common.apply_recipes(args)
    assert (args.retrain_batch_size, args.retrain_schedule, args.retrain_lr) == (256, "linear", 0.05)
    cifar = common.parse_args(p_darts.Args, [])
    common.apply_recipes(cifar)
    assert (cifar.retrain_batch_size, cifar.retrain_schedule) == (128, "cosine")  # train_cifar.py unchanged
    with pytest.raises(SystemExit):
        common.parse_args(p_darts.Args, ["--help"])
    assert "[--dataset imagenet: linear]" in " ".join(capsys.readouterr().out.split())
