"""daas.py: its losses and schedules against dense / closed-form computations, the genotype rule, the
discretization-gap evaluator, and runs (fake end to end, digits, SIGKILL + resume, bad input)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import daas
from conftest import TINY, kill_resume_and_compare, read_jsonl, run_script

P = daas.PRIMITIVES
FAST = ["--warmup-epochs", "0", "--bn-batches", "2"]  # TINY has 2 epochs: alpha must train from epoch 0


# ------------------------------------------------------------------ formulas
def dense_entropy(z):
    """H(softmax(z)) written out with a loop, float64."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    p = e / e.sum()
    return -sum(pk * math.log(pk) for pk in p if pk > 0)


def dense_S(t):
    x = 2.0 * t
    return x if x >= -1 else x ** 3


def test_strengthen_closed_form():
    t = torch.tensor([-3.0, -0.6, -0.5, -0.2, 0.0, 0.7, 2.0], dtype=torch.float64)
    assert daas.strengthen(t).tolist() == pytest.approx([dense_S(v) for v in t.tolist()])  # -216, -1.728, -1, ...
    assert daas.strengthen(torch.tensor(-0.5 - 1e-9, dtype=torch.float64)).item() == pytest.approx(-1, abs=1e-7)
    s = daas.strengthen(torch.linspace(-3, 3, 601, dtype=torch.float64))
    assert (s[1:] > s[:-1]).all()  # increasing: the argmax op is the same for alpha and S(alpha)


def test_op_loss_matches_dense_computation_and_closed_form_gradient():
    """Eq. (3): value against a loop; gradient against dH/dz_k = -p_k (log p_k + H) times S'(alpha),
    S'(t) = 2 for 2t >= -1 and 24 t^2 below."""
    torch.manual_seed(0)
    alphas = [(0.8 * torch.randn(14, 7, dtype=torch.float64)).requires_grad_() for _ in range(2)]
    alphas[0].data[0, :3] = torch.tensor([-2.0, -0.7, -0.4], dtype=torch.float64)  # both branches of S
    loss = daas.op_loss(alphas)
    dense = sum(dense_entropy([dense_S(v) for v in row]) for a in alphas for row in a.tolist())
    assert loss.item() == pytest.approx(dense, rel=1e-12)
    grads = torch.autograd.grad(loss, alphas)
    for a, g in zip(alphas, grads):
        z = daas.strengthen(a.detach())
        p = F.softmax(z, -1)
        H = -(p * p.log()).sum(-1, keepdim=True)
        dS = torch.where(2 * a.detach() >= -1, torch.full_like(a, 2.0), 24 * a.detach() ** 2)
        assert torch.allclose(g, -p * (p.log() + H) * dS, rtol=1e-10, atol=1e-12)


def test_edge_loss_matches_dense_computation_and_closed_form_gradient():
    """Eq. (4) per node: w (sum_j clip(beta_j, 0, 1) - 2)^2 + H(softmax(min(beta, 1))); its gradient is
    2 w (s - 2) [0 < beta_j < 1] - p_j (log p_j + H) [beta_j < 1]."""
    w = 0.2
    betas = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in
             ([0.9, 0.3, -0.4], [1.7, 0.6, 0.2, -1.1], [0.45, 0.35, 1.2, -0.3, 0.8],  # normal, nodes 3-5
              [0.7, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4], [2.0, 1.5, -2.0, 0.3, 0.9])]     # reduce
    loss = daas.edge_loss(betas, w)
    dense = 0.0
    for b in betas:
        clipped = [min(v, 1.0) for v in b.tolist()]
        dense += w * (sum(v for v in clipped if v > 0) - 2) ** 2 + dense_entropy(clipped)
    assert loss.item() == pytest.approx(dense, rel=1e-12)
    grads = torch.autograd.grad(loss, betas)
    for b, g in zip(betas, grads):
        c = torch.clamp(b.detach(), max=1.0)
        p = F.softmax(c, -1)
        H = -(p * p.log()).sum()
        s = c.clamp(min=0).sum()
        inside = (b.detach() < 1).double()
        closed = inside * (2 * w * (s - 2) * (b.detach() > 0).double() - p * (p.log() + H))
        assert torch.allclose(g, closed, rtol=1e-10, atol=1e-12)
    # the sum term alone: zero exactly when the clipped positive betas add up to 2
    for v, zero in (([1.0, 1.0, -3.0], True), ([5.0, 0.5, 0.5, -1.0], True), ([0.9, 0.9, 0.1, 0.0], False)):
        b = torch.tensor(v, dtype=torch.float64)
        sum_term = (daas.edge_loss([b], w) - daas.entropy(torch.clamp(b, max=1.0))).item()
        assert (abs(sum_term) < 1e-12) == zero, (v, sum_term)


def test_minimum_of_op_loss_is_one_hot():
    """H >= 0 with equality iff one-hot: L_O is log 7 per edge at uniform alpha, ~0 when one op leads
    (S cubes the losers: S(-2) = -64), and any less peaked edge costs more."""
    uniform = torch.zeros(14, 7)
    assert daas.op_loss([uniform]).item() == pytest.approx(14 * math.log(7), rel=1e-6)
    one_hot = torch.full((14, 7), -2.0)
    one_hot[torch.arange(14), torch.arange(14) % 7] = 2.0
    assert daas.op_loss([one_hot]).item() < 1e-20
    torch.manual_seed(1)
    for _ in range(20):
        assert daas.op_loss([torch.randn(14, 7)]).item() > daas.op_loss([one_hot]).item()


@pytest.mark.parametrize("n", [3, 4, 5])
def test_edge_loss_minimum_is_min_of_w_and_log2(n):
    """Closed form per node: L_E >= 0 is reached in the limit of one active edge (value w: sum 1, H = 0)
    or two at beta = 1 (value log 2: sum 2, H = log 2); the global minimum is min(w, log 2).
    Official w = 0.2: one edge. Two edges are a local minimum when w > 1/8 (moving one of them to
    1 - d adds w d^2 and removes d^2 / 8 of entropy), and descent from the official init lands there."""
    M = 60.0
    one = torch.tensor([1.0] + [-M] * (n - 1), dtype=torch.float64)
    two = torch.tensor([1.0, 1.0] + [-M] * (n - 2), dtype=torch.float64)
    for w in (0.2, 1.0):
        assert daas.edge_loss([one], w).item() == pytest.approx(w, abs=1e-12)
        assert daas.edge_loss([two], w).item() == pytest.approx(math.log(2), abs=1e-12)
        torch.manual_seed(n)
        for _ in range(200):  # no random point goes below the closed-form minimum
            b = 3 * torch.randn(n, dtype=torch.float64) - 1
            assert daas.edge_loss([b], w).item() >= min(w, math.log(2)) - 1e-9
    for w, local in ((0.2, True), (0.1, False)):
        d = 1e-2
        moved = two.clone()
        moved[1] = 1 - d
        assert (daas.edge_loss([moved], w) > daas.edge_loss([two], w)).item() == local
        assert daas.edge_loss([moved], w).item() - math.log(2) == pytest.approx((w - 1 / 8) * d * d, rel=0.05)
    # gradient descent from the official init 2/n + noise ends at two active edges, both at beta >= 1
    torch.manual_seed(0)
    for _ in range(2):
        b = (2 / n + 0.05 * torch.randn(n, dtype=torch.float64)).requires_grad_()
        opt = torch.optim.Adam([b], lr=0.1)
        for _ in range(400):
            opt.zero_grad()
            daas.edge_loss([b], 0.2).backward()
            opt.step()
        assert int((b.detach() > 0.5).sum()) == 2 and (b.detach().sort().values[-2] >= 0.99)
        assert daas.edge_loss([b.detach()], 0.2).item() == pytest.approx(math.log(2), abs=5e-3)


def test_schedules_closed_form():
    """Eq. (6): lambda_c = 0.1 (t - 1) / 49; Eq. (7): 0 before t = 8, log(t - 7) / log(42) after
    (dimension.py linear and log_ with EP = 50, E = 8)."""
    assert [daas.lambda_c(t, 50) for t in (1, 2, 26, 50)] == pytest.approx([0, 0.1 / 49, 2.5 / 49, 0.1])
    assert [daas.lambda_alpha(t, 50) for t in (1, 7, 8)] == [0.0, 0.0, 0.0]
    assert daas.lambda_alpha(9, 50) == pytest.approx(math.log(2) / math.log(42))
    assert daas.lambda_alpha(50, 50) == pytest.approx(1.00629, abs=1e-5)  # log 43 / log 42
    assert daas.lambda_c(1, 1) == 0.0 and daas.lambda_alpha(3, 3, 2) == pytest.approx(1.0)  # short-run guards


def test_default_warmup_is_the_official_interval_8():
    """Replay of the official schedule: epochs t = 1..50 (train_search.py line 116), architect.set() gives alpha
    its lr when t == --interval 8 (lines 153-154; architect.py starts it at 0, line 21), and lambda_alpha is
    dimension.py log_ with E = 8. Ours, at 0-based epoch t - 1 with the default --warmup-epochs 7: the same."""
    args = daas.Args()
    official_lr, lr = [], 0.0
    for t in range(1, 51):
        if t == 8:
            lr = args.arch_lr  # architect.set()
        official_lr.append(lr)
    assert [daas.alpha_lr(e, args) for e in range(args.epochs)] == official_lr
    assert official_lr.index(args.arch_lr) == args.warmup_epochs == 7  # first moving 0-based epoch
    official_log = [0 if t < 8 else math.log(t - 8 + 1, 50 - 8) for t in range(1, 51)]
    ours = [daas.lambda_alpha(e + 1, args.epochs, args.warmup_epochs + 1) for e in range(args.epochs)]
    assert ours == pytest.approx(official_log, rel=1e-15, abs=0)
    official_linear = [args.loss_weight * (t - 1) / (50 - 1) for t in range(1, 51)]  # weight * linear(t)
    assert [daas.lambda_c(e + 1, args.epochs, args.loss_weight) for e in range(50)] == pytest.approx(official_linear)


def test_edge_weights_of_eq_1():
    assert torch.allclose(daas.edge_weights(torch.full((4,), 0.5)), torch.ones(4))  # uniform = DARTS's 1 each
    b = torch.tensor([5.0, 1.0, 0.0])  # min(beta, 1): the first two are equal
    w = daas.edge_weights(b)
    assert w[0] == w[1] and w.sum().item() == pytest.approx(3.0)
    model = daas.Network(4, 10, 3)
    for betas in (model.betas_normal, model.betas_reduce):
        assert [len(b) for b in betas] == [3, 4, 5]
        assert all(abs(b.sum().item() - 2) < 1e-3 for b in betas)  # official init: sum beta = 2
        assert all(torch.allclose(daas.edge_weights(b), torch.ones(len(b)), atol=1e-3) for b in betas)


def test_derive_genotype_uses_beta_for_edges_and_alpha_for_ops():
    """Hand-made: the edges of nodes 3-5 come from beta even where alpha has stronger ops elsewhere."""
    idx = {p: i for i, p in enumerate(P)}
    w = torch.full((14, 7), 0.1)
    w[0, idx["sep_conv_3x3"]], w[1, idx["skip_connect"]] = 0.4, 0.6  # node 2: both inputs, strongest first
    # node 3 (edges 2-4 from states 0, 1, 2): alpha's strongest edge is 2 -> state 0, but beta keeps 1 and 2
    w[2, idx["dil_conv_5x5"]], w[3, idx["max_pool_3x3"]], w[4, idx["sep_conv_5x5"]] = 0.9, 0.3, 0.5
    # node 4 (edges 5-8 from states 0..3): beta keeps states 3 and 0
    w[5, idx["avg_pool_3x3"]], w[8, idx["dil_conv_3x3"]], w[6, idx["sep_conv_3x3"]] = 0.2, 0.7, 0.95
    # node 5 (edges 9-13 from states 0..4): state 1 first, then a beta tie of states 2 and 4 goes to
    # the lower index although state 4 has the strongest op
    w[10, idx["sep_conv_5x5"]], w[11, idx["dil_conv_5x5"]], w[13, idx["skip_connect"]] = 0.3, 0.4, 0.8
    betas = [torch.tensor([0.1, 0.9, 0.8]), torch.tensor([0.6, 0.2, -0.5, 0.9]),
             torch.tensor([0.0, 0.8, 0.5, 0.1, 0.5])]
    g = daas.derive_genotype(w, w, betas, betas)
    assert g.normal == [("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 2), ("max_pool_3x3", 1),
                        ("dil_conv_3x3", 3), ("avg_pool_3x3", 0), ("dil_conv_5x5", 2), ("sep_conv_5x5", 1)]
    assert g.reduce == g.normal and g.normal_concat == [2, 3, 4, 5]
    common.validate_genotype(g)


def official_genotype(alphas_normal, alphas_reduce, beta_normal, beta_reduce):
    """A replay of the official model_search.py genotype() (lines 189-232), in numpy: zero the alpha rows of
    the lowest-beta inputs of nodes 3-5 (_sift_beta), softmax(alpha) WITHOUT S, then the DARTS parse: per node
    the 2 edges of largest max weight, in that order, each with its argmax op."""
    def sift(betas, W):
        W, offset = W.copy(), 2
        for node, n_drop in zip(betas, (1, 2, 3)):
            for j in np.argsort(node, kind="stable")[:n_drop]:
                W[offset + j] = 0
            offset += len(node)
        return W

    def parse(W):
        gene, start = [], 0
        for i in range(4):
            rows = W[start:start + i + 2]
            for j in sorted(range(i + 2), key=lambda x: -max(rows[x]))[:2]:
                gene.append((P[int(np.argmax(rows[j]))], j))
            start += i + 2
        return gene

    out = []
    for a, b in ((alphas_normal, beta_normal), (alphas_reduce, beta_reduce)):
        W = sift(b, a)
        out.append(parse(np.exp(W) / np.exp(W).sum(1, keepdims=True)))
    return out


def test_genotype_lists_the_edges_of_a_node_as_the_official_rule():
    """Deviation 7: within a node the kept edges are ordered by max softmax(alpha) (official), not by the
    forward's softmax(S(alpha)). Node 2 below: edge 0 has two tied leaders (max softmax(alpha) 0.261), edge 1
    one leader (0.251), so the official order is edge 0 first; under S edge 1 would lead (0.403 vs 0.374)."""
    torch.manual_seed(0)
    model = daas.Network(4, 10, 3)
    with torch.no_grad():
        model.alphas_normal[0] = torch.tensor([1.0, 1.0, 0, 0, 0, 0, 0])
        model.alphas_normal[1] = torch.tensor([0, 0, 0, 0.7, 0, 0, 0])
    sharp = F.softmax(daas.strengthen(model.alphas_normal[:2].detach()), -1).max(1).values
    plain = F.softmax(model.alphas_normal[:2].detach(), -1).max(1).values
    assert plain[0] > plain[1] and sharp[0] < sharp[1]  # S flips the order: the test can fail
    assert model.genotype().normal[:2] == [("max_pool_3x3", 0), ("sep_conv_3x3", 1)]
    for seed in range(20):  # random alpha of the size a search reaches, where S matters
        torch.manual_seed(seed)
        model = daas.Network(4, 10, 3)
        with torch.no_grad():
            for p in model.arch_parameters() + model.beta_parameters():
                p.add_(torch.randn_like(p))
        want = official_genotype(*(a.detach().double().numpy() for a in model.arch_parameters()),
                                 [b.detach().numpy() for b in model.betas_normal],
                                 [b.detach().numpy() for b in model.betas_reduce])
        g = model.genotype()
        assert [g.normal, g.reduce] == want, seed


@pytest.mark.parametrize("size", [8, 9, 13, 30, 64])
def test_supernet_and_derived_cell_run_at_any_image_size(size):
    torch.manual_seed(0)
    model = daas.Network(4, 10, 3)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 2])
    logits = model(x)
    assert logits.shape == (2, 10)
    grads = torch.autograd.grad(F.cross_entropy(logits, y), model.arch_parameters() + model.beta_parameters())
    assert all(g.abs().sum() > 0 for g in grads)  # L_C alone reaches alpha and beta of both cell types
    with torch.no_grad():
        assert daas.discrete_forward(model, x, model.genotype()).shape == (2, 10)


def test_arch_grad_is_the_gradient_of_eq_5():
    torch.manual_seed(0)
    model = daas.Network(4, 10, 3).double()
    with torch.no_grad():
        for p in model.arch_parameters() + model.beta_parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    grads, (lc, lo, le) = daas.arch_grad(model, x, y, 0.07, 0.4, w=0.2)
    params = model.arch_parameters() + model.beta_parameters()
    total = F.cross_entropy(model(x), y) + 0.07 * daas.op_loss(model.arch_parameters()) \
        + 0.4 * daas.edge_loss(model.beta_parameters(), 0.2)
    want = torch.autograd.grad(total, params)
    assert all(torch.allclose(g, h, rtol=1e-8, atol=1e-12) for g, h in zip(grads, want))
    assert lo.item() == pytest.approx(daas.op_loss(model.arch_parameters()).item())


def test_supernet_is_darts_without_none_plus_beta():
    model = daas.Network(4, 10, 3)
    sd = model.state_dict()
    assert sd["alphas_normal"].shape == (14, 7) and sd["betas_reduce.2"].shape == (5,)
    assert "none" not in P and len(P) == 7
    arch = {id(p) for p in model.arch_parameters() + model.beta_parameters()}
    assert not any(id(p) in arch for p in model.weight_parameters())
    assert len(model.weight_parameters()) + len(arch) == len(list(model.parameters()))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # Deviation 1: every cell is weighted with the betas of its own type (the official code swaps them)
    seen = []
    for cell in model.cells:
        cell.forward = lambda s0, s1, w, betas, cell=cell, f=cell.forward: \
            seen.append((cell.reduction, betas)) or f(s0, s1, w, betas)
    model(torch.randn(2, 3, 16, 16))
    assert [(r, b is (model.betas_reduce if r else model.betas_normal)) for r, b in seen] == \
        [(False, True), (True, True), (True, True)]


def test_discrete_forward_is_the_derived_cell_on_a_darts_supernet():
    """With softmax(alpha) one-hot on the genotype's (op, input) pairs and 'none' on every other edge,
    darts.Network's forward IS the derived cell: discrete_forward must match it exactly."""
    import darts

    torch.manual_seed(0)
    model = darts.Network(4, 10, 3).double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    model(x)  # any BN statistics
    g = common.GENOTYPES["PC_DARTS"]
    prims = common.PRIMITIVES
    for name, edges in (("alphas_normal", g.normal), ("alphas_reduce", g.reduce)):
        a = torch.zeros(14, 8, dtype=torch.float64)
        a[:, prims.index("none")] = 1e4
        for k, (op, j) in enumerate(edges):
            row = sum(i + 2 for i in range(k // 2)) + j
            a[row] = 0.0
            a[row, prims.index(op)] = 1e4
        getattr(model, name).data.copy_(a)
    with torch.no_grad():
        assert torch.allclose(daas.discrete_forward(model, x, g, prims), model(x), rtol=1e-10, atol=1e-10)


def test_discretization_gap_leaves_the_model_alone():
    torch.manual_seed(0)
    model = daas.Network(4, 10, 3)
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(3)]
    model.train()
    for x, _ in data:
        model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = daas.discretization_gap(model, model.genotype(), data, torch.device("cpu"), calib_data=data, bn_batches=2)
    assert set(out) == {"val_loss", "val_acc", "disc_val_acc", "disc_val_acc_bn", "gap"}
    assert out["gap"] == out["val_acc"] - out["disc_val_acc"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


# ------------------------------------------------------------------ runs
@pytest.mark.slow
def test_search_and_retrain_on_fake_writes_the_run_folder(run):
    proc, run_dir = run("daas.py", *TINY, "--steps-per-epoch", "4", "--warmup-epochs", "1", "--bn-batches", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["args.json", "log.txt", "daas.py", "common.py", "search_history.jsonl", "alphas.jsonl",
                 "genotype.json", "checkpoint_search.pt", "alphas.png", "alpha_evolution.png", "search_curves.png",
                 "discretization.png", "genotype.png", "retrain_history.jsonl", "checkpoint_retrain.pt",
                 "retrain_curves.png", "results.json"]:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "daas" and results["search"]["epochs"] == 2
    assert 0 <= results["search"]["disc_val_acc"] <= 100 and 0 <= results["retrain"]["test_acc"] <= 100
    hist = read_jsonl(run_dir / "search_history.jsonl")
    assert [r["alpha_lr"] for r in hist] == [0.0, 3e-4]  # alpha frozen in epoch 0 (--warmup-epochs 1)
    assert [r["lambda_c"] for r in hist] == [0.0, 0.1] and [r["lambda_alpha"] for r in hist] == [0.0, 0.0]
    for r in hist:
        assert r["gap"] == pytest.approx(r["val_acc"] - r["disc_val_acc"]) and "disc_val_acc_bn" in r
        assert 1 / 7 - 1e-3 < r["discreteness"]["normal"]["op_onehot"] <= 1
    alphas = read_jsonl(run_dir / "alphas.jsonl")
    common.seed_everything(2)  # the run's seed: the same initial alpha as its supernet
    init = daas.Network(4, 10, 3).alphas_normal.tolist()
    assert alphas[0]["alpha"]["normal"] == init != alphas[1]["alpha"]["normal"]  # frozen in epoch 0 only
    assert alphas[0]["beta"] != alphas[1]["beta"]
    for cell in ("normal", "reduce"):
        w = np.array(alphas[-1]["softmax"][cell])
        assert w.shape == (14, 7) and np.allclose(w.sum(1), 1)
        assert [len(b) for b in alphas[-1]["edge_weights"][cell]] == [3, 4, 5]
        assert all(abs(sum(b) - len(b)) < 1e-5 for b in alphas[-1]["edge_weights"][cell])
    ckpt = torch.load(run_dir / "checkpoint_search.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and {"w_optimizer", "a_optimizer", "scheduler", "rng", "betas"} <= set(ckpt)
    assert np.allclose(ckpt["model"]["alphas_normal"].numpy(), alphas[-1]["alpha"]["normal"])
    assert np.allclose(ckpt["model"]["betas_reduce.1"].numpy(), alphas[-1]["beta"]["reduce"][1])
    genotype = common.parse_genotype(str(run_dir / "genotype.json"))
    assert common.genotype_to_dict(genotype) == results["genotype"] == ckpt["genotype"] == hist[-1]["genotype"]
    log = (run_dir / "log.txt").read_text()
    assert "search epoch 1 step 4/4" in log and "disc_val_acc" in log and "discreteness: op one-hot" in log
    assert "test accuracy" in log


@pytest.mark.slow  # about 42 s on 2 shared CPU cores
def test_digits_search_then_retrain_learns(run):
    """Real data: a broken search or retraining pipeline cannot clear 90 % (chance is 10 %)."""
    proc, run_dir = run("daas.py", "--dataset", "digits", "--device", "cpu", "--workers", "0", "--epochs", "2",
                        "--batch-size", "64", "--init-channels", "8", "--layers", "3", "--retrain-epochs", "5",
                        "--retrain-init-channels", "16", "--retrain-layers", "5", "--retrain-batch-size", "64",
                        "--warmup-epochs", "0", "--bn-batches", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["search"]["val_acc"] > 50, results["search"]  # 80.7 measured
    assert results["retrain"]["test_acc"] > 90, results["retrain"]  # 97.8 measured


@pytest.mark.slow  # about 30 s on 2 shared CPU cores
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    flags = [*TINY, "--epochs", "2", "--steps-per-epoch", "3", "--retrain-epochs", "2", "--warmup-epochs", "1",
             "--bn-batches", "2"]
    ref = run_script("daas.py", *flags, "--out-dir", tmp_path, "--run-name", "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    # killed during the search (alpha still frozen) and again during retraining
    kill_resume_and_compare("daas.py", flags, tmp_path, tmp_path / "ref")


@pytest.mark.parametrize("flags,needle", [
    (["--warmup-epochs", "2"], "--warmup-epochs 2 leaves alpha no step in --epochs 2"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >=0, got -1"),
    (["--alpha-start-epoch", "1"], "unrecognized arguments: --alpha-start-epoch"),  # 1-based: no alias
    (["--arch-lr", "0"], "--arch-lr must be >0, got 0.0"),
    (["--arch-lr-alpha", "-1"], "--arch-lr must be >0, got -1.0"),  # the official script's name
    (["--arch-lr-beta", "0"], "--arch-lr-beta must be >0"),
    (["--arch-weight-decay", "-1"], "--arch-weight-decay must be >=0"),
    (["--loss-weight", "-1"], "--loss-weight must be >=0"),
    (["--lambda-beta", "-1"], "--lambda-beta must be >=0"),
    (["--edge-sum-weight", "-0.5"], "--edge-sum-weight must be >=0"),
    (["--bn-batches", "-1"], "--bn-batches must be >=0"),
    (["--train-portion", "0"], "--train-portion must be (0, 1), got 0.0"),
    (["--layers", "2"], "--layers must be >=3, got 2"),
    (["--genotype", "DARTS_V2", "--no-retrain"], "nothing to do"),
])
def test_own_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, flags, needle):
    """daas.py's own flags and cross-flag checks, in-process through common.cli like test_bad_input.py."""
    with pytest.raises(SystemExit) as exit_info:
        common.cli(daas.main, daas.Args, [*map(str, TINY), "--out-dir", str(tmp_path / "runs"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def test_warmup_check_does_not_apply_to_a_given_genotype(tmp_path):
    """--genotype skips the search, so the default 7 warm-up epochs cannot make a 2-epoch run fail."""
    args = common.parse_args(daas.Args, [*map(str, TINY), "--genotype", "DARTS_V2", "--steps-per-epoch", "1",
                                         "--out-dir", str(tmp_path), "--run-name", "g"])
    results = daas.main(args)
    assert "search" not in results and results["genotype"] == common.genotype_to_dict(common.GENOTYPES["DARTS_V2"])
    assert 0 <= results["retrain"]["test_acc"] <= 100 and "best_test_acc" not in results["retrain"]


def test_old_run_folders_with_arch_lr_alpha_resume(tmp_path):
    """args.json of runs made before --arch-lr-alpha became --arch-lr still gives the run its own lr."""
    import dataclasses
    import shutil

    saved = dataclasses.asdict(daas.Args(epochs=3, warmup_epochs=0))
    saved["arch_lr_alpha"] = saved.pop("arch_lr") * 10
    (tmp_path / "args.json").write_text(json.dumps(saved))
    shutil.copy(daas.__file__, tmp_path / "daas.py")
    args = common.parse_args(daas.Args, ["--resume", str(tmp_path), "--device", "cpu"])
    resumed = common.resume_args(args, daas.__file__)
    assert resumed.arch_lr == pytest.approx(3e-3) and resumed.epochs == 3 and resumed.warmup_epochs == 0


def test_imagenet_recipe_is_darts_train_imagenet_py():
    """The official cnn/train_imagenet.py is DARTS's, so --dataset imagenet brings common's recipe unchanged."""
    assert not hasattr(daas.Args, "IMAGENET")
    assert common.recipes(daas.Args)["--dataset imagenet"] == common.IMAGENET_RETRAIN_ARGS
    args = common.parse_args(daas.Args, ["--dataset", "imagenet"])
    common.apply_recipes(args)
    assert (args.retrain_batch_size, args.retrain_schedule, args.retrain_gamma, args.aux_batchnorm) == (128, "step", 0.97,
                                                                                                      False)
