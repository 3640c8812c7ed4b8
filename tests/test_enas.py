"""enas.py: the run as a user runs it, and its formulas against hand computations and autograd."""
import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import enas
from conftest import TINY, kill_resume_and_compare, read_jsonl, run_script

FAST = ["--controller-train-steps", "2", "--controller-num-aggregate", "3", "--derive-samples", "3",
        "--stat-samples", "16"]
SEARCH_FILES = ["args.json", "log.txt", "enas.py", "common.py", "search_history.jsonl", "alphas.jsonl",
                "genotype.json", "checkpoint_search.pt", "alphas.png", "alpha_evolution.png", "search_curves.png",
                "controller_reward.png", "controller_entropy.png", "genotype.png"]
RETRAIN_FILES = ["retrain_history.jsonl", "checkpoint_retrain.pt", "retrain_curves.png", "results.json"]
# scripts/cifar10_micro_final.sh lines 5-6: fixed_arc (normal, then reduce), decoded by hand with
# micro_child.py's op ids (0 sep 3x3, 1 sep 5x5, 2 avg pool, 3 max pool, 4 identity)
OFFICIAL_ARC = "0 2 0 0 0 4 0 1 0 4 1 1 1 0 0 1 0 2 1 1 1 0 1 0 0 3 0 2 1 1 3 1 1 0 0 4 0 3 1 1"
OFFICIAL_GENOTYPE = common.Genotype(
    normal=[("avg_pool_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_5x5", 0),
            ("skip_connect", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0),
            ("avg_pool_3x3", 0), ("sep_conv_5x5", 1)], normal_concat=[2, 3, 4, 5, 6],
    reduce=[("sep_conv_3x3", 1), ("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("avg_pool_3x3", 0),
            ("sep_conv_5x5", 1), ("sep_conv_5x5", 3), ("sep_conv_3x3", 1), ("skip_connect", 0),
            ("max_pool_3x3", 0), ("sep_conv_5x5", 1)], reduce_concat=[2, 4, 5, 6])


# ----------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------
FLAGS = [*TINY, *FAST, "--epochs", "2", "--steps-per-epoch", "4", "--retrain-epochs", "1"]


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    """One uninterrupted run on fake data: its folder is checked file by file, and the SIGKILL test
    compares a killed-and-resumed run against it."""
    out = tmp_path_factory.mktemp("enas_runs")
    proc = run_script("enas.py", *FLAGS, "--out-dir", out, "--run-name", "ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "ref"


@pytest.mark.slow
def test_search_and_retrain_on_fake_writes_the_run_folder(ref_run):
    run_dir = ref_run
    for name in SEARCH_FILES + RETRAIN_FILES:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["search"]["epochs"] == 2 and results["retrain"]["retrain_epochs"] == 1
    history = read_jsonl(run_dir / "search_history.jsonl")
    assert [r["epoch"] for r in history] == [0, 1] and len(history[-1]["sampled_val_acc"]) == 3
    # SGDR (CosineAnnealingWarmRestarts, T0 10): epoch e runs at lr_min + (lr - lr_min)(1 + cos(pi e / 10)) / 2
    assert history[1]["lr"] == pytest.approx(0.0005 + 0.5 * (0.05 - 0.0005) * (1 + math.cos(math.pi / 10)))
    alphas = read_jsonl(run_dir / "alphas.jsonl")
    assert len(alphas) == 2 and alphas[-1]["samples"] == 16
    for cell in ("normal", "reduce"):
        op, inp, edge_op = (np.array(alphas[-1][k][cell]) for k in ("op", "input", "edge_op"))
        assert op.shape == (5, 2, 5) and np.allclose(op.sum(-1), 1, atol=1e-5)
        assert inp.shape == (5, 2, 6) and np.allclose(inp.sum(-1), 1, atol=1e-5)
        assert all((inp[i, :, i + 2:] == 0).all() for i in range(5))  # node i reads states 0 .. i+1 only
        assert edge_op.shape == (20, 5)
        blocks = np.split(edge_op.sum(1), np.cumsum([i + 2 for i in range(5)])[:-1])
        assert np.allclose([b.sum() for b in blocks], 2, atol=1e-5)  # two inputs per node
    ckpt = torch.load(run_dir / "checkpoint_search.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and {"model", "controller", "c_optimizer", "w_optimizer", "scheduler", "rng"} <= set(ckpt)
    assert ckpt["baseline"] == history[-1]["baseline"] != 0.0
    assert ckpt["c_optimizer"]["state"]  # Adam moments of the controller are saved
    genotype = common.parse_genotype(str(run_dir / "genotype.json"))
    assert genotype == enas.arc_to_genotype(ckpt["arc"])
    assert common.genotype_to_dict(genotype) == results["genotype"] == ckpt["genotype"] == history[-1]["genotype"]
    log = (run_dir / "log.txt").read_text()
    assert "search epoch 1 step 4/4" in log and "controller epoch 1 step 2/2" in log and "test accuracy" in log


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(ref_run):
    # killed during the search
    run_dir = kill_resume_and_compare("enas.py", FLAGS, ref_run.parent, ref_run, kill_in_retrain=False)
    assert "resuming the search at epoch" in (run_dir / "log.txt").read_text()


@pytest.mark.slow
def test_digits_search_then_retrain_learns(run):
    """Real data: a broken search or retraining pipeline cannot clear 90 % (chance is 10 %). The shared
    network itself learns slowly under one sampled cell per step (the official search ends near 68 %
    on CIFAR-10, melodyguan/enas#7), so the bar is on the retrained cell;
    test_child_training_learns_when_the_policy_is_near_greedy checks the weight step on its own."""
    proc, run_dir = run("enas.py", "--dataset", "digits", "--device", "cpu", "--workers", "0", "--epochs", "1",
                        "--batch-size", "64", "--init-channels", "4", "--layers", "3",
                        *FAST, "--retrain-epochs", "4", "--retrain-init-channels", "8", "--retrain-layers", "3",
                        "--retrain-batch-size", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["retrain"]["test_acc"] > 90, results["retrain"]
    genotype = common.parse_genotype(str(run_dir / "genotype.json"))
    assert results["retrain"]["params_M"] == pytest.approx(common.count_parameters(
        common.NetworkCIFAR(8, 10, 3, True, genotype)))


def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path):
    proc = run_script("enas.py", *TINY, "--genotype", "0 2 0 0", "--out-dir", tmp_path / "runs")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "needs 40 numbers" in proc.stderr and not (tmp_path / "runs").exists()


BAD = [  # enas.py's own flags and cross-flag checks (tests/test_bad_input.py has the ones every file shares)
    (["--bl-dec", "1"], "--bl-dec must be [0, 1), got 1.0"),
    (["--controller-num-aggregate", "0"], "--controller-num-aggregate must be >=1"),
    (["--controller-train-steps", "-1"], "--controller-train-steps must be >=0"),
    (["--op-tanh-reduce", "0"], "--op-tanh-reduce must be >0"),
    (["--tanh-constant", "-1"], "--tanh-constant must be >=0"),
    (["--controller-temperature", "-1"], "--controller-temperature must be >=0"),
    (["--temperature", "-1"], "--controller-temperature must be >=0"),  # the old spelling still works
    (["--arch-lr", "0"], "--arch-lr must be >0"),
    (["--controller-lr", "-1"], "--arch-lr must be >0"),
    (["--entropy-weight", "-1"], "--entropy-weight must be >=0"),
    (["--dropout", "1"], "--dropout must be [0, 1)"),
    (["--train-portion", "1"], "--train-portion must be (0, 1)"),
    (["--nodes", "0"], "--nodes must be >=1"),
    (["--lstm-size", "0"], "--lstm-size must be >=1"),
    (["--lr-t0", "0"], "--lr-t0 must be >=1"),
    (["--lr-t-mul", "0"], "--lr-t-mul must be >=1"),
    (["--derive-samples", "0"], "--derive-samples must be >=1"),
    (["--stat-samples", "0"], "--stat-samples must be >=1"),
    (["--batch-size", "1"], "--batch-size must be >=2"),
    (["--grad-clip", "-0.5"], "--grad-clip must be >=0"),
    (["--retrain-batch-size", "1"], "--retrain-batch-size must be >=2"),  # fields enas.py redefines keep checks
    (["--retrain-layers", "2"], "--retrain-layers must be >=3"),
    (["--retrain-epochs", "0"], "--retrain-epochs must be >=1"),
    (["--retrain-lr", "0"], "--retrain-lr must be >0"),
    (["--retrain-weight-decay", "-1"], "--retrain-weight-decay must be >=0"),
    (["--train-aux-head", "--no-search-auxiliary"], "--no-search-auxiliary removes"),
    (["--genotype", OFFICIAL_ARC.replace("0 2 0 0", "0 7 0 0", 1)], "ops are 0..4"),
    (["--genotype", OFFICIAL_ARC.replace("0 2 0 0", "2 2 0 0", 1)], "node 2 can read states 0..1"),
    (["--genotype", OFFICIAL_ARC, "--nodes", "4"], "needs 32 numbers"),
    (["--genotype", OFFICIAL_ARC, "--no-retrain"], "nothing to do"),
]


@pytest.mark.parametrize("flags,needle", BAD, ids=[" ".join(f)[:40] for f, _ in BAD])
def test_own_bad_flags_are_one_line_exit_2_before_any_folder(tmp_path, capsys, flags, needle):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        common.cli(enas.main, enas.Args, [*TINY, "--out-dir", str(out), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_renamed_flags_keep_their_old_spellings():
    """Unified names (--arch-lr, --controller-temperature); the official script's names still parse."""
    a = common.parse_args(enas.Args, ["--controller-lr", "0.01", "--temperature", "5"])
    assert a.arch_lr == 0.01 and a.controller_temperature == 5.0
    assert common.parse_args(enas.Args, []).arch_lr == 0.0035


def test_a_run_folder_with_the_old_flag_names_still_resumes(tmp_path):
    """args.json of a run made before the renaming has controller_lr and temperature."""
    import dataclasses
    import shutil

    saved = dataclasses.asdict(enas.Args(arch_lr=0.01, controller_temperature=5.0))
    saved["controller_lr"], saved["temperature"] = saved.pop("arch_lr"), saved.pop("controller_temperature")
    (tmp_path / "args.json").write_text(json.dumps(saved))
    shutil.copy(enas.__file__, tmp_path / "enas.py")
    args = common.resume_args(common.parse_args(enas.Args, ["--resume", str(tmp_path)]), enas.__file__)
    assert args.arch_lr == 0.01 and args.controller_temperature == 5.0


# ----------------------------------------------------------------------------------------
# the controller: sampling, Eq. (5)-(7)
# ----------------------------------------------------------------------------------------
def by_hand(ctrl, arc, C, op_C, T):
    """log pi(arc) and H, Eq. (6), by stepping the LSTM one decision at a time for one arc (lists
    of ints), with the gates, the attention of Eq. (7) and the logit shaping of Eq. (5) written out."""
    H = ctrl.g_emb.shape[1]
    W1, W2, v = ctrl.w_attn1.weight, ctrl.w_attn2.weight, ctrl.v_attn.weight

    def lstm(x, h, c):  # torch.nn.LSTMCell gate order i, f, g, o
        i, f, g, o = (x @ ctrl.lstm.weight_ih.T + h @ ctrl.lstm.weight_hh.T).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def shape(l, const):
        l = l / T if T else l
        return const * torch.tanh(l) if const else l

    def term(logits, a):
        p = torch.softmax(logits, -1)[0]
        return torch.log(p[a]), -(p * torch.log(p)).sum()

    h = c = torch.zeros(1, H)
    log_p, ent = 0.0, 0.0
    for normal, cell_arc in zip((True, False), arc):
        x, anchors, keys = ctrl.g_emb, [], []
        for _ in range(2):
            h, c = lstm(x, h, c)
            anchors.append(torch.zeros(1, H))
            keys.append(h @ W1.T)
        for i in range(len(cell_arc) // 4):
            for s in range(2):
                h, c = lstm(x, h, c)
                logits = torch.cat([torch.tanh(k + h @ W2.T) @ v.T for k in keys], dim=1)  # (1, i+2)
                lp, e = term(shape(logits, C), cell_arc[4 * i + 2 * s])
                log_p, ent, x = log_p + lp, ent + e, anchors[cell_arc[4 * i + 2 * s]]
            for s in range(2):
                h, c = lstm(x, h, c)
                logits = shape(h @ ctrl.w_soft.weight.T + ctrl.w_soft.bias, op_C)
                if normal:
                    logits = logits + torch.tensor([0.25, 0.25, -0.25, -0.25, -0.25])
                lp, e = term(logits, cell_arc[4 * i + 2 * s + 1])
                log_p, ent, x = log_p + lp, ent + e, ctrl.w_emb.weight[cell_arc[4 * i + 2 * s + 1]][None]
            h, c = lstm(x, h, c)
            anchors.append(h)
            keys.append(h @ W1.T)
            x = ctrl.g_emb
    return log_p, ent


@pytest.mark.parametrize("C,reduce,T", [(1.10, 2.5, 0.0), (2.5, 1.0, 5.0), (0.0, 2.5, 0.0)])
def test_log_prob_and_entropy_equal_the_hand_computed_sums(C, reduce, T):
    torch.manual_seed(0)
    ctrl = enas.Controller(nodes=3, lstm_size=16, tanh_constant=C, op_tanh_reduce=reduce, temperature=T).double()
    torch.set_default_dtype(torch.float64)
    try:
        arcs, log_prob, entropy, probs = ctrl(5)
        for b in range(5):
            lp, ent = by_hand(ctrl, enas.arc_at(arcs, b), C, C / reduce, T)
            assert log_prob[b].item() == pytest.approx(lp.item(), abs=1e-10)
            assert entropy[b].item() == pytest.approx(ent.item(), abs=1e-10)
        # teacher forcing the sampled arcs gives the same numbers (what the notebook uses)
        _, lp2, ent2, _ = ctrl(5, arcs)
        assert torch.allclose(lp2, log_prob) and torch.allclose(ent2, entropy)
        assert len(probs[0]) == 12 and probs[0][4].shape == (5, 3) and probs[0][5].shape == (5, 5)
    finally:
        torch.set_default_dtype(torch.float32)


def test_sampled_arcs_are_valid_and_cover_the_space():
    torch.manual_seed(1)
    (normal, reduce), log_prob, entropy, _ = enas.Controller(nodes=5)(400)
    for arc in (normal, reduce):
        assert arc.shape == (400, 20) and arc.dtype == torch.long
        for i in range(5):
            for s in range(2):
                idx, op = arc[:, 4 * i + 2 * s], arc[:, 4 * i + 2 * s + 1]
                assert idx.min() >= 0 and idx.max() <= i + 1  # node i+2 reads only earlier states
                assert set(idx.tolist()) == set(range(i + 2)) and set(op.tolist()) == set(range(5))
    assert (log_prob < 0).all() and (entropy > 0).all() and not entropy.requires_grad


def test_logit_shaping_is_C_tanh_of_l_over_T_in_the_official_order():
    """Eq. (5): micro_controller.py divides by T first, then squashes: C * tanh(l / T)."""
    l = torch.tensor([-3.0, 0.5, 3.0])
    assert torch.allclose(enas.shape_logits(l, 2.5, 5.0), 2.5 * torch.tanh(l / 5.0))
    assert not torch.allclose(enas.shape_logits(l, 2.5, 5.0), torch.tanh(2.5 * l) / 5.0)  # the other order
    assert torch.equal(enas.shape_logits(l, 0.0, 0.0), l) and torch.allclose(enas.shape_logits(l, 1.1, 0.0),
                                                                              1.1 * torch.tanh(l))
    # op logits of the normal cell live in C/2.5 * (-1, 1) + [0.25, 0.25, -0.25, -0.25, -0.25], so no op
    # probability can leave the band that the extreme logit vectors give (notebooks/enas.ipynb sec. 2)
    ctrl = enas.Controller()
    with torch.no_grad():
        ctrl.w_soft.weight.mul_(1e3)  # push the pre-tanh logits far out
    p = torch.stack(ctrl(64)[3][0][1::2]).flatten(0, 1)  # (decisions * B, 5) op softmaxes, normal cell
    bias, c = torch.tensor([0.25, 0.25, -0.25, -0.25, -0.25]), 1.10 / 2.5
    lo, hi = bias - c, bias + c
    p_max = max(torch.softmax(torch.where(torch.arange(5) == k, hi, lo), 0)[k] for k in range(5))
    p_min = min(torch.softmax(torch.where(torch.arange(5) == k, lo, hi), 0)[k] for k in range(5))
    assert p.max() <= p_max + 1e-6 and p.min() >= p_min - 1e-6 and p_max < 0.47 and p_min > 0.07


# ----------------------------------------------------------------------------------------
# the REINFORCE update: Eq. (2)-(4)
# ----------------------------------------------------------------------------------------
def test_reinforce_loss_gradient_is_minus_advantage_times_grad_log_prob():
    torch.manual_seed(2)
    ctrl = enas.Controller(nodes=2, lstm_size=8)
    params = list(ctrl.parameters())
    _, log_prob, _, _ = ctrl(4)
    adv = torch.tensor([0.3, -0.1, 0.5, 0.0])
    got = torch.autograd.grad(enas.reinforce_loss(log_prob, adv), params, retain_graph=True)
    per_sample = [torch.autograd.grad(log_prob[i], params, retain_graph=True) for i in range(4)]
    for k, g in enumerate(got):  # mean over the aggregated samples of -(R - b) grad log pi
        want = -sum(adv[i] * per_sample[i][k] for i in range(4)) / 4
        assert torch.allclose(g, want, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in got)


def test_moving_average_baseline_matches_its_closed_form():
    """Eq. (3) applied n times: b_n = d^n b_0 + (1 - d) sum_k d^(n-k) R_k."""
    d, b0, rewards = 0.9, 0.2, [0.5, 0.7, 0.1, 0.9, 0.4]
    b = b0
    for r in rewards:
        b = enas.update_baseline(b, r, d)
    n = len(rewards)
    assert b == pytest.approx(d**n * b0 + (1 - d) * sum(d ** (n - k) * r for k, r in enumerate(rewards, 1)))
    assert enas.update_baseline(0.0, 1.0, 0.99) == pytest.approx(0.01)  # official first step from b = 0


# ----------------------------------------------------------------------------------------
# cells, genotypes, the shared network
# ----------------------------------------------------------------------------------------
def test_loose_ends_are_the_nodes_nobody_reads():
    #            node 2     node 3     node 4     node 5     node 6
    arc = [0, 0, 1, 1, 2, 4, 0, 2, 3, 3, 1, 0, 3, 1, 2, 0, 0, 1, 1, 2]
    assert enas.loose_ends(arc) == [4, 5, 6]  # 2 and 3 feed later nodes; unused inputs are never loose ends
    assert enas.loose_ends([0, 0, 1, 0, 2, 0, 2, 0]) == [3]
    assert enas.loose_ends([0, 0, 0, 0, 1, 0, 1, 0]) == [2, 3]  # input 1 unused by node 2, input 0 by node 3


def test_official_fixed_arc_becomes_the_card_genotype():
    arc = enas.parse_arc(OFFICIAL_ARC)
    g = enas.arc_to_genotype(arc)
    assert g == OFFICIAL_GENOTYPE
    assert common.validate_genotype(g) is g  # a Genotype common.NetworkCIFAR accepts
    net = common.NetworkCIFAR(4, 10, 3, False, g)
    assert net(torch.randn(2, 3, 16, 16))[0].shape == (2, 10)


def test_reference_numbers_macro_layout_and_parameters():
    """What the official final network fixes and we reuse: 15 + 2 cells with the reductions at cells
    5 and 11, and 6 + 2 in search at 2 and 5 (micro_child.py pool_layers = [L//3, 2*(L//3)+1]).
    Our retraining network on the published cells at C 36, 17 cells (pinned here; the paper's
    4.6 M is not reproduced by this network, notebooks/enas.ipynb sec. 6)."""
    for num_layers in (6, 15):
        assert list(common.reduction_layers(num_layers + 2)) == [num_layers // 3, 2 * (num_layers // 3) + 1]
    params = {name: common.count_parameters(common.NetworkCIFAR(36, 10, 17, True, g)) for name, g in
              (("ENAS", common.GENOTYPES["ENAS"]), ("fixed_arc", OFFICIAL_GENOTYPE))}
    assert params["ENAS"] == pytest.approx(3.271, abs=0.001) and params["fixed_arc"] == pytest.approx(3.729, abs=0.001)


def test_one_forward_trains_only_the_sampled_ops_and_bn_uses_batch_statistics():
    torch.manual_seed(3)
    model = enas.Network(4, 10, 3, nodes=2, auxiliary=True, dropout=0.0)
    arc = ([0, 0, 1, 4, 2, 1, 0, 3], [1, 1, 0, 2, 0, 0, 2, 4])
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    logits, aux = model(x, arc)
    (F.cross_entropy(logits, y) + F.cross_entropy(aux, y)).backward()
    for c, cell in enumerate(model.cells):
        cell_arc = arc[1] if cell.reduction else arc[0]
        chosen = {(i, s, cell_arc[4 * i + 2 * s], cell_arc[4 * i + 2 * s + 1]) for i in range(2) for s in range(2)}
        for i in range(2):
            for s in range(2):
                for j in range(i + 2):
                    for k in range(5):
                        grads = [p.grad for p in cell.ops[i][s][j][k].parameters()]
                        if (i, s, j, k) in chosen:
                            assert all(g is not None for g in grads)
                        else:
                            assert all(g is None for g in grads), (c, i, s, j, k)
        assert cell.final_conv.grad[0].abs().sum() == 0 and cell.final_conv.grad[1].abs().sum() > 0  # loose: node 3
    assert list(model.buffers()) == []  # no running statistics anywhere
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x, arc)[0], logits, atol=1e-5)  # eval mode = the same batch statistics


def test_child_training_learns_when_the_policy_is_near_greedy():
    """Eq. (1) on real data: with T = 1e-4 the controller samples (almost) one cell, so the shared
    weights see a fixed network and must fit digits quickly; a broken weight step cannot."""
    common.seed_everything(0)
    args = enas.Args(dataset="digits", workers=0, batch_size=64, report_freq=1000)
    train_set, _, _ = common.load_dataset("digits", "", True)
    train_data, _ = common.search_loaders(train_set, 64, 0.9, torch.Generator().manual_seed(0), 0)
    model = enas.Network(4, 10, 3, nodes=2, auxiliary=False, dropout=0.0)
    ctrl = enas.Controller(nodes=2, tanh_constant=0.0, temperature=1e-4)
    opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9, nesterov=True)
    log = logging.getLogger("test_enas")
    accs = [enas.train_child_epoch(model, ctrl, train_data, opt, torch.device("cpu"), args, log, e)["train_acc"]
            for e in range(2)]
    assert accs[-1] > 35, accs


# ----------------------------------------------------------------------------------------
# fidelity to the official TF1 code: the controller's Adam, the child's SGD step, the data each pass reads
# ----------------------------------------------------------------------------------------
def tf1_adam_replay(theta, grads, lr, beta1, beta2, eps):
    """tf.train.AdamOptimizer._apply_dense as TF1 computes it, in numpy float64: the accumulators
    beta1_power, beta2_power start at beta and are multiplied after every update;
    lr_t = lr sqrt(1 - beta2_power) / (1 - beta1_power), m += (g - m)(1 - beta1), v += (g^2 - v)(1 - beta2),
    theta -= lr_t m / (sqrt(v) + eps). Returns theta after each step."""
    theta, m, v = theta.copy(), np.zeros_like(theta), np.zeros_like(theta)
    b1_power, b2_power, out = beta1, beta2, []
    for g in grads:
        lr_t = lr * np.sqrt(1 - b2_power) / (1 - b1_power)
        m += (g - m) * (1 - beta1)
        v += (g * g - v) * (1 - beta2)
        theta = theta - lr_t * m / (np.sqrt(v) + eps)
        b1_power, b2_power = b1_power * beta1, b2_power * beta2
        out.append(theta.copy())
    return out


@pytest.mark.parametrize("beta1", [0.0, 0.9])  # 0.0: the official controller (utils.py line 218)
def test_tf_adam_equals_a_closed_form_replay_of_tf1_and_resumes_exactly(beta1):
    rng = np.random.RandomState(0)
    theta0 = rng.randn(3, 4)
    scales = np.array([1e-6, 1e-3, 1e-1, 10.0])  # gradients from far below to far above epsilon = 1e-3
    grads = [rng.randn(3, 4) * scales for _ in range(8)]
    want = tf1_adam_replay(theta0, grads, 0.0035, beta1, 0.999, 1e-3)
    p = torch.nn.Parameter(torch.tensor(theta0))
    opt = enas.TFAdam([p], 0.0035, betas=(beta1, 0.999), eps=1e-3)
    for t, g in enumerate(grads):
        if t == 4:  # resume halfway through from a state dict, as --resume does
            saved = opt.state_dict()
            opt = enas.TFAdam([p], 0.0035, betas=(beta1, 0.999), eps=1e-3)
            opt.load_state_dict(saved)
        p.grad = torch.tensor(g)
        opt.step()
        np.testing.assert_allclose(p.detach().numpy(), want[t], rtol=0, atol=1e-15)
    # torch.optim.Adam(eps=1e-3) is not this update: it adds epsilon after the bias correction, i.e. uses
    # s eps with s = sqrt(1 - 0.999^t). On step 1 sqrt(v) = s |g|, so its step is (s |g| + eps) / (s |g| + s eps)
    # times TF's: 1 / s = 32x for |g| << eps, still 2x at |g| = eps / s = 0.03, 1x only for |g| >> 0.03
    q = torch.nn.Parameter(torch.tensor(theta0))
    torch_adam = torch.optim.Adam([q], 0.0035, betas=(beta1, 0.999), eps=1e-3)
    q.grad = torch.tensor(grads[0])
    torch_adam.step()
    ratio = (q.detach().numpy() - theta0) / (want[0] - theta0)  # (3, 4), columns by gradient scale
    g, s = np.abs(grads[0]), np.sqrt(1 - 0.999)
    np.testing.assert_allclose(ratio, (s * g + 1e-3) / (s * g + s * 1e-3), rtol=1e-9)
    assert ratio[:, 0] == pytest.approx(1 / s, rel=0.01) and ratio[:, 3] == pytest.approx(1.0, abs=0.05)


class FixedArc:
    """A stand-in controller that always samples one arc."""

    def __init__(self, arc):
        self.arc = tuple(torch.tensor([a]) for a in arc)

    def __call__(self, batch):
        return self.arc, None, None, None


@pytest.mark.parametrize("train_aux_head", [False, True])
def test_child_step_decays_unused_ops_and_leaves_the_aux_head_as_official(train_aux_head):
    """Deviation 4: an op the cell does not use gets a zero gradient, so its weights take the official SGD
    step on the L2 term alone: first Nesterov step w - lr (1 + mu) wd w. Deviation 14: the auxiliary head
    keeps its initial weights (official) unless --train-aux-head."""
    torch.manual_seed(4)
    torch.set_default_dtype(torch.float64)
    try:
        model = enas.Network(4, 10, 3, nodes=2, auxiliary=True, dropout=0.0)
        args = enas.Args(lr=0.05, momentum=0.9, weight_decay=0.1, train_aux_head=train_aux_head, report_freq=100)
        opt = enas.child_optimizer(model, args)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        arc = ([0, 0, 1, 4, 2, 1, 0, 3], [1, 1, 0, 2, 0, 0, 2, 4])
        data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))]
        enas.train_child_epoch(model, FixedArc(arc), data, opt, torch.device("cpu"), args,
                               logging.getLogger("test_enas"), 0)
    finally:
        torch.set_default_dtype(torch.float32)
    after = dict(model.named_parameters())
    unused = "cells.0.ops.0.0.1.0.0.1.weight"  # node 0, slot 0, input 1, sep_conv_3x3: the arc takes input 0
    assert after[unused].shape == before[unused].shape
    torch.testing.assert_close(after[unused].detach(), before[unused] * (1 - 0.05 * 1.9 * 0.1), rtol=0, atol=1e-14)
    used = "cells.0.ops.0.0.0.0.0.1.weight"  # node 0, slot 0, input 0, sep_conv_3x3: in the arc
    assert not torch.allclose(after[used], before[used] * (1 - 0.05 * 1.9 * 0.1))
    aux = [n for n in before if n.startswith("auxiliary_head.")]
    moved = [n for n in aux if not torch.equal(after[n].detach(), before[n])]
    assert aux and (moved == aux if train_aux_head else moved == [])
    assert all(p.grad is None for n, p in after.items() if n in aux) != train_aux_head
    # the frozen head still passes the aux loss down: the cells below it got a gradient from it
    assert all(after[n].grad is not None for n in after if n.startswith("stem."))


def test_search_reads_only_held_out_training_images_for_reward_and_derivation(monkeypatch, tmp_path):
    """ENAS's 'best of sampled cells' (and every reward) is chosen on the val split of the training set,
    never on the test set: images whose pixels are their index in the training set show which ones each
    forward pass reads; the test split is never loaded."""
    n, split = 40, 36  # --train-portion 0.9: images 36..39 are the val split
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()
    calls = []

    def load_dataset(name, root, train, image_size=0, cutout=0, augment=None):
        calls.append(train)
        return torch.utils.data.TensorDataset(x, torch.arange(n) % 10), 10, 8

    seen = []
    forward = enas.Network.forward

    def spy(self, inp, arc):
        seen.append((self.training, set(inp[:, 0, 0, 0].round().long().tolist())))
        return forward(self, inp, arc)

    derived = []
    derive = enas.derive

    def spy_derive(model, controller, xv, yv, k, amp=False):
        derived.append(set(xv[:, 0, 0, 0].round().long().tolist()))
        return derive(model, controller, xv, yv, k, amp)

    monkeypatch.setattr(common, "load_dataset", load_dataset)
    monkeypatch.setattr(enas.Network, "forward", spy)
    monkeypatch.setattr(enas, "derive", spy_derive)
    args = enas.Args(device="cpu", workers=0, epochs=2, batch_size=4, init_channels=4, layers=3, nodes=2,
                     steps_per_epoch=3, controller_train_steps=2, controller_num_aggregate=2, derive_samples=3,
                     stat_samples=4, report_freq=100)
    genotype, summary = enas.search(args, torch.device("cpu"), tmp_path, logging.getLogger("test_enas"))
    assert calls == [True]  # the training split only
    train_seen = set().union(*(s for training, s in seen if training))
    eval_seen = set().union(*(s for training, s in seen if not training))
    assert train_seen and train_seen <= set(range(split))
    assert eval_seen == set(range(split, n))  # reward, derivation and val accuracy: the held-out images
    assert len(derived) == 2 and all(d <= set(range(split, n)) for d in derived)
    assert summary["epochs"] == 2 and genotype == common.parse_genotype(str(tmp_path / "genotype.json"))


@pytest.mark.parametrize("size", [8, 9, 13, 30, 64])
def test_shared_network_runs_at_any_image_size_from_8(size):
    torch.manual_seed(5)
    model = enas.Network(4, 10, 3, nodes=2, auxiliary=True, dropout=0.1)
    arcs, _, _, _ = enas.Controller(nodes=2)(1)
    logits, aux = model(torch.randn(2, 3, size, size), enas.arc_at(arcs, 0))
    assert logits.shape == aux.shape == (2, 10)
    (logits.sum() + aux.sum()).backward()
    assert model.stem[0].weight.grad is not None


# ----------------------------------------------------------------------------------------
# --space nb201: AutoDL-Projects' ENAS on the NAS-Bench-201 cell (Deviation 15)
# ----------------------------------------------------------------------------------------
NB201_TINY = ["--device", "cpu", "--workers", "0", "--dataset", "fake", "--image-size", "8", "--batch-size", "8",
              "--epochs", "2", "--steps-per-epoch", "2", "--space", "nb201", "--init-channels", "4", "--layers", "1",
              "--controller-train-steps", "2", "--controller-num-aggregate", "3", "--derive-samples", "3",
              "--final-samples", "4", "--stat-samples", "8", "--retrain-epochs", "1", "--retrain-batch-size", "8",
              "--retrain-init-channels", "4", "--retrain-layers", "3"]


def test_nb201_controller_is_the_official_size_and_scores_what_it_samples():
    """search_model_enas_utils.py Controller(6 edges, 5 ops, lstm 32, 2 layers): input_vars 32 + 2 LSTM layers
    x (4*32*(32+32) + 2*4*32) + embedding 5*32 + linear 32*5+5 = 17253; log pi and H are the hand sums of
    Eq. (5)-(6) with C 2.5, T 5; re-scoring the sampled ops gives the same log-probability."""
    torch.manual_seed(0)
    ctrl = enas.NB201Controller()
    assert sum(p.numel() for p in ctrl.parameters()) == 32 + 2 * (4 * 32 * 64 + 2 * 4 * 32) + 5 * 32 + 32 * 5 + 5
    arcs, log_prob, entropy, probs = ctrl(7)
    assert arcs[0].shape == (7, 6) and len(probs) == 6 and all(p.shape == (7, 5) for p in probs)
    hand_lp = sum(torch.log(p[torch.arange(7), arcs[0][:, e]]) for e, p in enumerate(probs))
    hand_h = sum(-(p * p.log()).sum(1) for p in probs)
    assert torch.allclose(log_prob, hand_lp, atol=1e-5) and torch.allclose(entropy, hand_h, atol=1e-5)
    assert all(p.max() / p.min() <= math.exp(2 * 2.5) + 1e-3 for p in probs)  # logits in (-2.5, 2.5)
    _, again, _, _ = ctrl(7, arcs=arcs)
    assert torch.allclose(again, log_prob)
    loss = enas.reinforce_loss(log_prob, torch.ones(7))  # REINFORCE reaches every controller weight
    loss.backward()
    assert all(p.grad is not None for p in ctrl.parameters())


def test_nb201_shared_net_runs_only_the_sampled_ops():
    torch.manual_seed(1)
    net = enas.NB201SharedNet(4, 10, 1)
    arc = ([3, 0, 1, 2, 4, 3],)  # op index per edge in NB201_EDGES order
    logits, aux = net(torch.randn(2, 3, 8, 8), arc)
    assert logits.shape == (2, 10) and aux is None
    logits.sum().backward()
    for cell in (c for c in net.cells if isinstance(c, torch.nn.ModuleList)):
        for e, ops in enumerate(cell):
            for k, op in enumerate(ops):
                grads = [p.grad for p in op.parameters()]
                assert all(g is not None for g in grads) if k == arc[0][e] else all(g is None for g in grads)
    assert enas.nb201_arch(arc) == \
        "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|nor_conv_1x1~0|avg_pool_3x3~1|nor_conv_3x3~2|"


def test_nb201_schedule_is_the_official_cosine_without_restarts():
    """ENAS.config T_max 10, eta_min 5e-4 (xautodl optimizers.py CosineAnnealingLR): every epoch e runs at
    eta_min + (lr - eta_min)(1 + cos(pi e / 10)) / 2, rising again after epoch 10."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], 0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10, eta_min=0.0005)
    for e in range(45):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.0005 + 0.0495 * (1 + math.cos(math.pi * e / 10)) / 2), e
        opt.step()
        sched.step()


def test_nb201_recipe_fills_only_untyped_flags_and_shows_in_help(capsys):
    args = common.parse_args(enas.Args, ["--space", "nb201", "--epochs", "3"])
    common.apply_recipes(args)
    assert args.epochs == 3 and (args.batch_size, args.lr, args.weight_decay, args.lr_schedule, args.layers) == \
        (128, 0.05, 2.5e-4, "cosine", 5)
    assert (args.lstm_size, args.lstm_layers, args.tanh_constant, args.controller_temperature, args.arch_lr) == \
        (32, 2, 2.5, 5.0, 0.001)
    assert (args.controller_train_steps, args.controller_num_aggregate, args.final_samples, args.grad_clip) == \
        (50, 20, 100, 5.0)
    assert (args.retrain_epochs, args.retrain_layers, args.retrain_init_channels) == (200, 5, 16)
    darts_space = common.parse_args(enas.Args, [])
    common.apply_recipes(darts_space)
    assert (darts_space.epochs, darts_space.lr_schedule, darts_space.lstm_size, darts_space.final_samples) == \
        (150, "sgdr", 64, 0)
    with pytest.raises(SystemExit):
        common.parse_args(enas.Args, ["--help"])
    assert "[--space nb201: 250]" in capsys.readouterr().out


def test_nb201_search_with_benchmark_lookup_end_to_end(tmp_path, nb201_benchmark):
    folder, expected = nb201_benchmark
    results = enas.main(common.parse_args(enas.Args, [*NB201_TINY, "--nb201-benchmark", str(folder),
                                                      "--out-dir", str(tmp_path), "--run-name", "r"]))
    run_dir = tmp_path / "r"
    history = read_jsonl(run_dir / "search_history.jsonl")
    assert len(history) == 2
    for row in history:  # each epoch: the best of 3 sampled cells, looked up in the benchmark
        assert len(row["sampled_val_acc"]) == 3 and row["best_sampled_val_acc"] == max(row["sampled_val_acc"])
        assert row["arch"] == enas.nb201_arch(row["arc"]) and row["nb201_index"] == common.nb201_index(row["arch"])
        assert row["nb201"] == expected(row["arch"]) and row["genotype"] == common.nb201_record(row["arch"])
    search = results["search"]  # the result: the best of --final-samples 4 after the last epoch
    assert search["final_samples"] == 4 and 0 <= search["final_sampled_val_acc"] <= 100
    saved = json.loads((run_dir / "genotype.json").read_text())
    assert saved == results["genotype"] == common.nb201_record(enas.nb201_arch(search["final_arc"]))
    alphas = read_jsonl(run_dir / "alphas.jsonl")
    p = np.array(alphas[-1]["edge_op"]["cell"])
    assert p.shape == (6, 5) and np.allclose(p.sum(1), 1, atol=1e-5)
    net = common.NB201Network(saved["arch"], 10, 4, 3)
    assert results["retrain"]["params_M"] == pytest.approx(sum(q.numel() for q in net.parameters()) / 1e6, abs=1e-6)
    assert (run_dir / "nb201.png").exists() and (run_dir / "alphas.png").exists()
    ckpt = torch.load(run_dir / "checkpoint_search.pt", weights_only=False)
    assert ckpt["c_optimizer"]["param_groups"][0]["eps"] == 1e-3 and ckpt["baseline"] == history[-1]["baseline"]


@pytest.mark.parametrize("flags,needle", [
    (["--nb201-benchmark", "x.pth"], "needs --space nb201"),
    (["--lstm-layers", "2"], "more need --space nb201"),
    (["--space", "nb201", "--genotype", "ENAS"], "needs --space nb201"),
    (["--genotype", "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"], "needs --space nb201"),
    (["--lr-schedule", "step"], "unknown --lr-schedule"),
])
def test_nb201_bad_inputs_are_one_line_exit_2_before_any_folder(tmp_path, capsys, flags, needle):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        common.cli(enas.main, enas.Args, [*TINY, "--out-dir", str(out), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


@pytest.mark.slow  # two subprocess runs of the tiny NB-201 search
def test_nb201_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    """The controller, its torch Adam, the baseline and the final best-of-N derivation resume bit for bit."""
    flags = [*NB201_TINY, "--epochs", "3"]
    ref = run_script("enas.py", *flags, "--out-dir", tmp_path, "--run-name", "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    kill_resume_and_compare("enas.py", flags, tmp_path, tmp_path / "ref", kill_in_retrain=False)
