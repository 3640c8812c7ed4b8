"""darts.py formulas against exact autograd or hand-worked answers."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import darts
from common import PRIMITIVES


class SmoothNet(nn.Module):
    """A tiny supernet without kinks (tanh only), so finite differences converge:
    logits = W2 . sum_k softmax(alpha_a)_k tanh(W1_k x) + softmax(alpha_b) . B"""

    def __init__(self, d_in=5, d_hidden=6, n_ops=3, n_out=4):
        super().__init__()
        self.alpha_a = nn.Parameter(0.5 * torch.randn(n_ops))
        self.alpha_b = nn.Parameter(0.5 * torch.randn(2))
        self.w1 = nn.Parameter(0.5 * torch.randn(n_ops, d_hidden, d_in))
        self.w2 = nn.Parameter(0.5 * torch.randn(n_out, d_hidden))
        self.bias = nn.Parameter(0.5 * torch.randn(2, n_out))

    def forward(self, x):
        h = torch.einsum("k,bkh->bh", F.softmax(self.alpha_a, 0), torch.tanh(torch.einsum("khd,bd->bkh", self.w1, x)))
        return h @ self.w2.T + F.softmax(self.alpha_b, 0) @ self.bias

    def arch_parameters(self):
        return [self.alpha_a, self.alpha_b]

    def weight_parameters(self):
        return [self.w1, self.w2, self.bias]


def smooth_problem(seed=0):
    torch.manual_seed(seed)
    model = SmoothNet().double()
    data = [(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 4, (16,))) for _ in range(2)]
    return model, data


def rel_err(a, b):
    a, b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return ((a - b).norm() / b.norm()).item()


def exact_mixed_hvp(model, x, y, v):
    """grad2_{alpha,w} L_train . v by double backward: d/dalpha <grad_w L_train, v>."""
    g_w = torch.autograd.grad(F.cross_entropy(model(x), y), model.weight_parameters(), create_graph=True)
    return torch.autograd.grad(sum((g * d).sum() for g, d in zip(g_w, v)), model.arch_parameters())


def test_finite_difference_hvp_matches_double_backward():
    model, [(x, y), _] = smooth_problem()
    weights, alphas = model.weight_parameters(), model.arch_parameters()
    before = [w.detach().clone() for w in weights]
    v = [torch.randn_like(w) for w in weights]
    exact = exact_mixed_hvp(model, x, y, v)
    fd = darts.finite_difference_hvp(lambda: F.cross_entropy(model(x), y), weights, alphas, v, r=0.01)
    assert rel_err(fd, exact) < 1e-4  # central difference: O(eps^2) truncation error
    assert all(torch.allclose(w, b, rtol=0, atol=1e-12) for w, b in zip(weights, before))  # w restored
    # The pt.darts transcription (p - n) / 2 * eps = hvp * eps^2 must be far outside that tolerance.
    eps = 0.01 / torch.cat([d.flatten() for d in v]).norm()
    buggy = [h * eps**2 for h in fd]
    assert rel_err(buggy, exact) > 0.99


def test_finite_difference_error_shrinks_quadratically():
    """Halving r cuts the central-difference error about 4x (smooth model, float64)."""
    model, [(x, y), _] = smooth_problem(1)
    v = [torch.randn_like(w) for w in model.weight_parameters()]
    exact = exact_mixed_hvp(model, x, y, v)
    errs = [rel_err(darts.finite_difference_hvp(lambda: F.cross_entropy(model(x), y), model.weight_parameters(),
                                                model.arch_parameters(), v, r=r), exact) for r in (0.4, 0.2)]
    assert 3.0 < errs[0] / errs[1] < 5.0, errs


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 3e-4)])
def test_unrolled_arch_grad_equals_exact_unrolled_gradient(momentum, weight_decay):
    """Eq. (5)-(7) against autograd through the unrolled step itself:
    d/dalpha L_val(w - xi (mu m + grad_w L_train(w, alpha) + lambda w), alpha), m fixed."""
    model, [(xt, yt), (xv, yv)] = smooth_problem(2)
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    F.cross_entropy(model(xt), yt).backward()
    opt.step()  # creates the momentum buffer the unrolled step must include
    opt.zero_grad()
    xi = 0.5  # large, so the second-order term is a big part of the gradient
    weights, alphas = model.weight_parameters(), model.arch_parameters()
    g_w = torch.autograd.grad(F.cross_entropy(model(xt), yt), weights, create_graph=True)
    w_prime = {}
    for (name, w), g in zip([(n, p) for n, p in model.named_parameters() if not n.startswith("alpha")], g_w):
        m = opt.state[w].get("momentum_buffer", torch.zeros_like(w)) if momentum else torch.zeros_like(w)
        w_prime[name] = w - xi * (momentum * m + g + weight_decay * w)
    val = F.cross_entropy(torch.func.functional_call(model, w_prime, (xv,)), yv)
    exact = torch.autograd.grad(val, alphas)
    grads, _ = darts.unrolled_arch_grad(model, opt, xi, xt, yt, xv, yv, r=0.01)
    assert rel_err(grads, exact) < 1e-4
    # the second-order term matters here: dropping it (first order at w') is clearly worse
    w_prime_const = {k: t.detach() for k, t in w_prime.items()}
    only_direct = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, w_prime_const, (xv,)), yv),
                                      alphas)
    assert rel_err(only_direct, exact) > 100 * rel_err(grads, exact)


def test_first_order_grad_is_val_loss_gradient():
    model, [_, (xv, yv)] = smooth_problem(3)
    grads, _ = darts.first_order_arch_grad(model, xv, yv)
    F.cross_entropy(model(xv), yv).backward()
    assert all(torch.allclose(g, a.grad) for g, a in zip(grads, model.arch_parameters()))


def test_derive_genotype_on_hand_made_alpha():
    """Top-2 edges per node by strongest non-'none' op, 'none' ignored even when it is largest."""
    idx = {p: i for i, p in enumerate(PRIMITIVES)}
    w = torch.full((14, 8), 0.1)
    # node 2 (edges 0-1): both inputs kept, in ranking order; edge 0's 'none' is largest but excluded
    w[0, idx["none"]], w[0, idx["sep_conv_3x3"]] = 0.9, 0.3
    w[1, idx["skip_connect"]] = 0.5
    # node 3 (edges 2-4 from states 0,1,2): state 2 (0.8) and state 0 (0.6) beat state 1 (0.2)
    w[2, idx["dil_conv_3x3"]], w[3, idx["max_pool_3x3"]], w[4, idx["sep_conv_5x5"]] = 0.6, 0.2, 0.8
    # node 4 (edges 5-8 from states 0..3): a 'none'-only strong edge (5) loses; 7 and 8 win
    w[5, idx["none"]], w[7, idx["avg_pool_3x3"]], w[8, idx["dil_conv_5x5"]] = 0.99, 0.4, 0.7
    # node 5 (edges 9-13 from states 0..4): tie 0.5 / 0.5 on states 1 and 3 goes to the lower index
    w[10, idx["sep_conv_3x3"]], w[12, idx["skip_connect"]] = 0.5, 0.5
    g = darts.derive_genotype(w, w)
    assert g.normal == [("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 2), ("dil_conv_3x3", 0),
                        ("dil_conv_5x5", 3), ("avg_pool_3x3", 2), ("sep_conv_3x3", 1), ("skip_connect", 3)]
    assert g.normal_concat == [2, 3, 4, 5] and g.reduce == g.normal


def test_supernet_alphas_are_parameters_in_state_dict():
    model = darts.Network(4, 10, 3)
    sd = model.state_dict()
    assert sd["alphas_normal"].shape == (14, 8) and sd["alphas_reduce"].shape == (14, 8)
    assert not any(p is a for p in model.weight_parameters() for a in model.arch_parameters())
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_same_seed_same_alphas_after_steps():
    """Determinism on CPU: two searches with one seed give bit-identical alphas."""
    import common

    def alphas_after(seed, steps=3):
        common.seed_everything(seed)
        model = darts.Network(4, 10, 3)
        a_opt = torch.optim.Adam(model.arch_parameters(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
        for _ in range(steps):
            x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
            grads, _ = darts.first_order_arch_grad(model, x, y)
            for a, g in zip(model.arch_parameters(), grads):
                a.grad = g
            a_opt.step()
        return [a.detach().clone() for a in model.arch_parameters()]

    a, b = alphas_after(5), alphas_after(5)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


# ----------------------------------------------------------------------------------------
# Amended-DARTS and DARTS+
# ----------------------------------------------------------------------------------------
def dense_amended_grad(model, eta, xt, yt, xv, yv):
    """g1 - eta A' H v with the explicit Hessian H (|w| x |w|) and mixed matrix A (|w| x |alpha|)."""
    weights, alphas = model.weight_parameters(), model.arch_parameters()
    names = [n for n, p in model.named_parameters() if not n.startswith("alpha")]
    anames = [n for n, p in model.named_parameters() if n.startswith("alpha")]
    w0 = torch.cat([w.detach().flatten() for w in weights])
    a0 = torch.cat([a.detach().flatten() for a in alphas])

    def unflat(vec, params, pnames):
        out, i = {}, 0
        for n, p in zip(pnames, params):
            out[n] = vec[i:i + p.numel()].view_as(p)
            i += p.numel()
        return out

    def loss(w, a, x, y):
        return F.cross_entropy(torch.func.functional_call(model, {**unflat(w, weights, names),
                                                                  **unflat(a, alphas, anames)}, (x,)), y)

    H = torch.autograd.functional.hessian(lambda w: loss(w, a0, xt, yt), w0)  # (|w|, |w|)
    A = torch.autograd.functional.jacobian(  # d/dalpha of grad_w L_train: (|w|, |alpha|)
        lambda a: torch.autograd.grad(loss(w0.requires_grad_(), a, xt, yt), w0, create_graph=True)[0], a0)
    g1, v = torch.autograd.functional.jacobian(lambda a, w: loss(w, a, xv, yv), (a0, w0))
    return g1 - eta * A.T @ (H @ v), H, A, v


@pytest.mark.parametrize("hvp,tol", [("exact", 1e-10), ("fd", 1e-3)])
def test_amended_gradient_equals_dense_computation(hvp, tol):
    model, [(xt, yt), (xv, yv)] = smooth_problem(4)
    eta = 20.0  # large enough that the amending term is a real part of the gradient
    want, H, A, v = dense_amended_grad(model, eta, xt, yt, xv, yv)
    grads, _ = darts.amended_arch_grad(model, eta, xt, yt, xv, yv, hvp=hvp, r=0.01)
    got = torch.cat([g.flatten() for g in grads])
    assert ((got - want).norm() / want.norm()).item() < tol
    # the amending term is a real part of the gradient here, so the check has teeth
    assert (eta * A.T @ (H @ v)).norm() > 0.5 * want.norm()


def test_amended_and_unrolled_are_exclusive(tmp_path):
    from conftest import TINY, run_script

    proc = run_script("darts.py", *TINY, "--unrolled", "--amended", "--out-dir", tmp_path / "runs")
    assert proc.returncode == 2 and "pick one" in proc.stderr and not (tmp_path / "runs").exists()


def history_from(alphas):
    return [{"normal": a, "reduce": a} for a in alphas]


def cell(winners):
    """(14, 8) softmax-like weights where edge e's strongest op is winners[e] (edge order)."""
    w = torch.full((14, 8), 0.05)
    for e, op in enumerate(winners):
        w[e, PRIMITIVES.index(op)] = 0.5
    return w


def test_darts_plus_criterion_1_fires_on_two_skips_and_not_on_one():
    convs = ["sep_conv_3x3"] * 14
    two = list(convs)
    two[0] = two[1] = "skip_connect"  # node 2 keeps both its input edges: two skips in the cell
    one = list(convs)
    one[0] = "skip_connect"
    noisy = [cell(convs) + 0.01 * torch.rand(14, 8) for _ in range(11)]  # rankings keep changing
    assert darts.darts_plus_stop(history_from(noisy + [cell(two)]), 2, 10, 10).startswith("criterion 1: 2 skip")
    assert darts.darts_plus_stop(history_from(noisy + [cell(one)]), 2, 10, 10) is None
    assert darts.darts_plus_stop(history_from(noisy[:5] + [cell(two)]), 2, 10, 10) is None  # before min epochs


def test_darts_plus_criterion_2_fires_on_a_stable_ranking_and_not_on_a_changing_one():
    torch.manual_seed(0)
    base = torch.softmax(torch.randn(14, 8), 1)
    base[:, PRIMITIVES.index("skip_connect")] = 0.0  # criterion 1 stays silent
    stable = [base + 1e-4 * e for e in range(12)]  # values move, order of learnable ops does not
    assert darts.darts_plus_stop(history_from(stable), 2, 10, 0).startswith("criterion 2")
    flipped = [b.clone() for b in stable]
    conv = darts.LEARNABLE
    flipped[5][3, conv[0]], flipped[5][3, conv[1]] = stable[5][3, conv[1]], stable[5][3, conv[0]]  # one swap
    # epochs 6..11 share a ranking: unchanged for 5 epochs after the swap at epoch 5
    assert darts.darts_plus_stop(history_from(flipped), 2, 5, 0).startswith("criterion 2")
    assert darts.darts_plus_stop(history_from(flipped), 2, 6, 0) is None
    assert darts.darts_plus_stop(history_from(stable[:10]), 2, 10, 0) is None  # too short to tell


# ----------------------------------------------------------------------------------------
# --space nb201 (NAS-Bench-201)
# ----------------------------------------------------------------------------------------
import json  # noqa: E402

import common  # noqa: E402
from conftest import read_jsonl  # noqa: E402

NB201_TINY = ["--space", "nb201", "--device", "cpu", "--workers", "0", "--dataset", "fake", "--image-size", "8",
              "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "8", "--init-channels", "4", "--layers", "1",
              "--retrain-epochs", "1", "--retrain-batch-size", "64", "--retrain-init-channels", "4",
              "--retrain-layers", "3"]


@pytest.mark.parametrize("track_running_stats,buffers", [(False, 550), (True, 14170)])
def test_nb201_supernet_has_the_official_size(track_running_stats, buffers):
    """xautodl TinyNetworkDarts(C=16, N=5, 10 classes, affine=False): 1692826 weights + one (6, 5) alpha
    (the numbers tests/test_nb201.py checks against the official supernet)."""
    net = darts.NB201Network(16, 10, 5, track_running_stats)
    assert sum(p.numel() for p in net.weight_parameters()) == 1692826
    assert [tuple(a.shape) for a in net.arch_parameters()] == [(6, 5)]
    assert sum(b.numel() for b in net.buffers()) == buffers
    assert "alphas" in net.state_dict() and not any(p is net.alphas for p in net.weight_parameters())


def test_nb201_cell_is_the_softmax_weighted_sum_of_the_benchmark_ops():
    """Eq. (1)-(2) on the NB-201 DAG against a hand-written sum over common.NB201_OPS with the same weights."""
    torch.manual_seed(0)
    cell = darts.NB201SearchCell(3, track_running_stats=False)
    w = F.softmax(torch.randn(6, 5), -1)
    x = torch.randn(2, 3, 6, 6)
    nodes = [x]
    for i in range(1, 4):
        nodes.append(sum(sum(w[e, k] * cell.edges[e].ops[k](nodes[j]) for k in range(5))
                         for e, (to, j) in enumerate(common.NB201_EDGES) if to == i))
    assert torch.allclose(cell(x, w), nodes[3], atol=1e-6)
    # the ops in NB201_PRIMITIVES order, pools without the DARTS space's extra BN
    names = [type(op).__name__ for op in cell.edges[0].ops]
    assert names == ["Zero", "Identity", "NB201ReLUConvBN", "NB201ReLUConvBN", "AvgPool2d"]


def test_nb201_recipe_fills_untyped_flags_only_and_shows_in_help():
    args = common.parse_args(darts.Args, ["--space", "nb201", "--weight-decay", "1e-4", "--layers", "2"])
    common.apply_recipes(args)
    assert (args.weight_decay, args.layers) == (1e-4, 2)  # typed: kept
    assert (args.nesterov, args.init_channels, args.epochs, args.batch_size, args.arch_lr) == (True, 16, 50, 64, 3e-4)
    assert (args.retrain_epochs, args.retrain_batch_size, args.retrain_lr, args.auxiliary) == (200, 256, 0.1, False)
    plain = common.parse_args(darts.Args, [])
    common.apply_recipes(plain)
    assert (plain.weight_decay, plain.nesterov, plain.layers) == (3e-4, False, 8)  # the DARTS space is untouched
    text = " ".join(common._parser(darts.Args).format_help().split())  # argparse wraps lines
    assert "[--space nb201: 5]" in text and "[--space nb201: 0.0005]" in text


def run_nb201(tmp_path, *flags):
    argv = [*NB201_TINY, "--out-dir", str(tmp_path), "--run-name", "run", *flags]
    results = darts.main(common.parse_args(darts.Args, argv))
    return results, tmp_path / "run"


def test_nb201_first_order_search_looks_up_every_epoch_and_retrains(tmp_path, nb201_benchmark):
    folder, expected = nb201_benchmark
    results, run_dir = run_nb201(tmp_path, "--nb201-benchmark", str(folder))
    genotype = json.loads((run_dir / "genotype.json").read_text())
    arch = common.nb201_arch_str(common.parse_nb201_arch(genotype["arch"]))
    assert genotype == {"space": "nb201", "arch": arch, "nb201_index": common.nb201_index(arch)}
    history = read_jsonl(run_dir / "search_history.jsonl")
    assert [r["epoch"] for r in history] == [0, 1]
    for r in history:
        assert r["nb201_index"] == common.nb201_index(r["arch"])
        assert r["nb201"] == pytest.approx(expected(r["arch"]), abs=1e-9)
    assert history[-1]["arch"] == arch
    alphas = read_jsonl(run_dir / "alphas.jsonl")[-1]
    assert torch.tensor(alphas["alpha"]["cell"]).shape == (6, 5)
    assert common.nb201_derive(torch.tensor(alphas["softmax"]["cell"])) == arch  # the derived cell is the argmax
    assert (run_dir / "nb201.png").is_file() and (run_dir / "alphas.png").is_file()
    net = common.NB201Network(arch, 10, 4, 3)
    assert results["retrain"]["params_M"] == pytest.approx(common.count_parameters(net))
    assert results["search"]["order"] == "first"


def test_nb201_second_order_search_runs(tmp_path):
    results, run_dir = run_nb201(tmp_path, "--unrolled", "--no-retrain", "--epochs", "1")
    assert results["search"]["order"] == "second" and "retrain" not in results
    row = read_jsonl(run_dir / "search_history.jsonl")[0]
    assert row["arch"] == json.loads((run_dir / "genotype.json").read_text())["arch"]
    assert "nb201" not in row  # no --nb201-benchmark: no lookup


@pytest.mark.parametrize("flags,needle", [
    (["--space", "darts", "--nb201-benchmark", "x"], "needs --space nb201"),
    (["--space", "nb201", "--genotype", "DARTS_V2"], "--space nb201 needs one"),
    (["--genotype", "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"], "needs --space nb201"),
    (["--space", "nb201", "--early-stop"], "--early-stop (DARTS+) is defined on the DARTS space"),
    (["--space", "nb201", "--layers", "0"], "--layers must be >=1"),
    (["--space", "nb201", "--genotype", "|nor_conv_3x3~0|+|none~0|"], "expected 3 nodes"),
    (["--space", "nas201"], "unknown --space 'nas201'"),
])
def test_nb201_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, flags, needle):
    argv = ["--device", "cpu", "--dataset", "fake", "--out-dir", str(tmp_path / "runs"), *flags]
    with pytest.raises(SystemExit) as info:
        common.cli(darts.main, darts.Args, argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
