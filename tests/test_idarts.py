"""idarts.py: the Neumann hypergradient against closed forms and dense matrices, and runs as a user
runs them (fake data, digits, SIGKILL + --resume, bad input)."""
import json
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import darts
import idarts
from common import PRIMITIVES
import conftest
from conftest import TINY, kill_resume_and_compare, read_jsonl, run_script

# TINY with a smaller supernet (8 px, C = 2) and fewer steps: the double backward is slow on CPU
SMALL = [*TINY, "--image-size", "8", "--batch-size", "8", "--init-channels", "2", "--steps-per-epoch", "2",
         "--inner-steps", "2"]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def rel_err(a, b):
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


# ----------------------------------------------------------------------------------------
# Eq. (IFT) + Eq. (Neumann) on ridge regression, where w*(alpha) has a closed form
# ----------------------------------------------------------------------------------------
def ridge_problem(seed=0, n=60, d=6):
    """L_train(w, alpha) = ||X w - y||^2 / n + sum_j exp(alpha_j) w_j^2 (a penalty per feature),
    L_val(w) = ||X_v w - y_v||^2 / n; w*(alpha) = (X'X / n + diag(e^alpha))^-1 X'y / n.
    Returns the losses, w*, and the exact hypergradient by autograd through the linear solve."""
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    beta = torch.randn(d, generator=g, dtype=torch.float64)
    y, yv = X @ beta + 0.5 * torch.randn(n, generator=g, dtype=torch.float64), Xv @ beta
    alpha = (0.3 * torch.randn(d, generator=g, dtype=torch.float64) - 1.0).requires_grad_()

    def train_loss(w, a):
        return (X @ w - y).pow(2).mean() + (a.exp() * w.pow(2)).sum()

    def val_loss(w):
        return (Xv @ w - yv).pow(2).mean()

    def w_star(a):
        return torch.linalg.solve(X.T @ X / n + torch.diag(a.exp()), X.T @ y / n)

    exact = torch.autograd.grad(val_loss(w_star(alpha)), alpha)[0]
    w = w_star(alpha).detach().requires_grad_()
    H = 2 * (X.T @ X / n + torch.diag(alpha.detach().exp()))  # d2 L_train / dw2, constant in w
    return train_loss, val_loss, w, alpha, exact, torch.linalg.eigvalsh(H)


def ridge_neumann(K, gamma_times_lmax, seed=0):
    train_loss, val_loss, w, alpha, exact, eig = ridge_problem(seed)
    gamma = gamma_times_lmax / eig.max().item()
    grads, _, _ = idarts.neumann_hypergradient(lambda: train_loss(w, alpha), lambda: val_loss(w), [w], [alpha],
                                               gamma, K)
    return rel_err(grads, [exact]), eig, gamma


def test_neumann_hypergradient_converges_to_the_exact_implicit_gradient_on_ridge():
    """At w*, Eq. (iDARTS) -> the exact hypergradient as K grows, for 0 < gamma < 2 / lambda_max(H),
    with error ~ max_i |1 - gamma lambda_i|^(K+1) (Eq. (Neumann): H^-1 - gamma sum_k (I - gamma H)^k
    = (I - gamma H)^(K+1) H^-1); and it diverges for gamma > 2 / lambda_max."""
    Ks = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    for c in (0.5, 1.0, 1.9):
        errs = [ridge_neumann(K, c)[0] for K in Ks]
        assert all(b < a or b < 1e-13 for a, b in zip(errs, errs[1:])), errs  # down to float64 round-off
        assert errs[-1] < 1e-10 and errs[0] > 0.1, errs
        _, eig, gamma = ridge_neumann(0, c)
        rate = (1 - gamma * eig).abs().max().item()
        kappa_bound = eig.max().item() / eig.min().item()  # ||A' (I - gamma H)^(K+1) H^-1 v|| / ||A' H^-1 v||
        for K, e in zip(Ks, errs):
            assert e <= kappa_bound * rate ** (K + 1) + 1e-12, (K, e, rate)
    # gamma beyond 2 / lambda_max: (I - gamma H)^k blows up along the top eigenvector
    errs = [ridge_neumann(K, 2.2)[0] for K in (8, 32, 64)]
    assert errs[0] < errs[1] < errs[2] and errs[2] > 10, errs


def test_ridge_exact_hypergradient_equals_the_dense_ift_formula():
    """Eq. (IFT) with explicit matrices = autograd through the closed-form solve (the reference above)."""
    train_loss, val_loss, w, alpha, exact, _ = ridge_problem(1)
    H = torch.autograd.functional.hessian(lambda w_: train_loss(w_, alpha.detach()), w.detach())
    A = torch.autograd.functional.jacobian(  # d/dalpha of d_w L_train: (d, d)
        lambda a: torch.autograd.grad(train_loss(w, a), w, create_graph=True)[0], alpha.detach())
    v = torch.autograd.grad(val_loss(w), w)[0]
    assert torch.allclose(-A.T @ torch.linalg.solve(H, v), exact, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Eq. (iDARTS) with exact Hessian-vector products = dense matrices, on a tiny smooth network
# ----------------------------------------------------------------------------------------
class SmoothNet(nn.Module):
    """A tiny supernet without kinks: logits = W2 . sum_k softmax(alpha_a)_k tanh(W1_k x) + softmax(alpha_b) . B"""

    def __init__(self, d_in=4, d_hidden=5, n_ops=3, n_out=3):
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


def dense_neumann_hypergradient(model, gamma, K, xt, yt, xv, yv):
    """g1 - gamma A' sum_{k=0..K} (I - gamma H)^k v with the explicit Hessian H (|w| x |w|) and
    mixed matrix A = d/dalpha d_w L_train (|w| x |alpha|)."""
    weights, alphas = model.weight_parameters(), model.arch_parameters()
    wn = [n for n, p in model.named_parameters() if not n.startswith("alpha")]
    an = [n for n, p in model.named_parameters() if n.startswith("alpha")]
    w0, a0 = flat([w.detach() for w in weights]), flat([a.detach() for a in alphas])

    def unflat(vec, params, names):
        out, i = {}, 0
        for n, p in zip(names, params):
            out[n] = vec[i:i + p.numel()].view_as(p)
            i += p.numel()
        return out

    def loss(w, a, x, y):
        return F.cross_entropy(torch.func.functional_call(model, {**unflat(w, weights, wn), **unflat(a, alphas, an)},
                                                          (x,)), y)

    H = torch.autograd.functional.hessian(lambda w: loss(w, a0, xt, yt), w0)
    A = torch.autograd.functional.jacobian(
        lambda a: torch.autograd.grad(loss(w0.requires_grad_(), a, xt, yt), w0, create_graph=True)[0], a0)
    g1, v = torch.autograd.functional.jacobian(lambda a, w: loss(w, a, xv, yv), (a0, w0))
    M = torch.eye(len(w0), dtype=w0.dtype) - gamma * H
    s = sum(torch.linalg.matrix_power(M, k) @ v for k in range(K + 1))
    return g1 - gamma * A.T @ s, g1


@pytest.mark.parametrize("K", [0, 1, 3])
def test_neumann_hypergradient_equals_dense_computation_on_a_smooth_net(K):
    torch.manual_seed(0)
    model = SmoothNet().double()
    xt, xv = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    yt, yv = torch.randint(0, 3, (12,)), torch.randint(0, 3, (12,))
    gamma = 2.0  # large, so every Neumann term is a real part of the result
    want, g1 = dense_neumann_hypergradient(model, gamma, K, xt, yt, xv, yv)
    before = [p.detach().clone() for p in model.parameters()]
    grads, val, implicit = idarts.neumann_hypergradient(
        lambda: F.cross_entropy(model(xt), yt), lambda: F.cross_entropy(model(xv), yv),
        model.weight_parameters(), model.arch_parameters(), gamma, K)
    assert (flat(grads) - want).norm() / want.norm() < 1e-10
    assert torch.allclose(flat(grads) + flat(implicit), g1, rtol=1e-12, atol=1e-14)  # implicit = gamma A' s
    assert flat(implicit).norm() > 0.3 * want.norm()  # the check has teeth: the implicit term is not small
    assert val.item() == pytest.approx(F.cross_entropy(model(xv), yv).item())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # nothing moved
    if K:  # and the extra terms matter: K - 1 terms give a clearly different answer
        fewer, _ = dense_neumann_hypergradient(model, gamma, K - 1, xt, yt, xv, yv)
        assert (fewer - want).norm() > 1e-3 * want.norm()


def test_gamma_zero_gives_the_darts_first_order_gradient_on_the_supernet():
    """Eq. (iDARTS) with gamma = 0 drops the implicit term: darts.first_order_arch_grad on the real
    supernet (both files' Network are the same DARTS supernet)."""
    torch.manual_seed(0)
    model = idarts.Network(2, 10, 3)
    x, xv = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    y, yv = torch.randint(0, 10, (4,)), torch.randint(0, 10, (4,))
    grads, _, implicit = idarts.neumann_hypergradient(
        lambda: F.cross_entropy(model(x), y), lambda: F.cross_entropy(model(xv), yv),
        model.weight_parameters(), model.arch_parameters(), 0.0, 1)
    first, _ = darts.first_order_arch_grad(model, xv, yv)
    assert all(g.shape == (14, 8) for g in grads) and flat(implicit).abs().max() == 0
    assert torch.allclose(flat(grads), flat(first), rtol=1e-5, atol=1e-8)
    grads, _, implicit = idarts.neumann_hypergradient(  # gamma = lr: a small but non-zero correction
        lambda: F.cross_entropy(model(x), y), lambda: F.cross_entropy(model(xv), yv),
        model.weight_parameters(), model.arch_parameters(), 0.025, 2)
    assert torch.isfinite(flat(grads)).all() and 0 < flat(implicit).norm() < flat(grads).norm()


def test_cost_of_the_hypergradient_relative_to_darts_first_order():
    """Eq. (iDARTS) with K = 2 costs one val forward-backward, a train forward-backward with
    create_graph and K + 1 double-backward passes: several times DARTS's first order (CPU seconds,
    best of 2; printed with -s)."""
    torch.manual_seed(0)
    model = idarts.Network(2, 10, 3)
    x, xv = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    y, yv = torch.randint(0, 10, (8,)), torch.randint(0, 10, (8,))

    def cpu_seconds(f):
        best = float("inf")
        for _ in range(2):
            t0 = time.process_time()
            f()
            best = min(best, time.process_time() - t0)
        return best

    first = cpu_seconds(lambda: darts.first_order_arch_grad(model, xv, yv))
    hyper = cpu_seconds(lambda: idarts.neumann_hypergradient(
        lambda: F.cross_entropy(model(x), y), lambda: F.cross_entropy(model(xv), yv),
        model.weight_parameters(), model.arch_parameters(), 0.025, 2))
    print(f"first order {first:.3f} s, iDARTS K=2 {hyper:.3f} s: {hyper / first:.1f}x")
    assert 3 < hyper / first < 60


@pytest.mark.parametrize("size", [8, 9, 13, 30, 64])
def test_supernet_and_hypergradient_run_at_any_image_size(size):
    torch.manual_seed(0)
    model = idarts.Network(2, 10, 3)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 2])
    assert model(x).shape == (2, 10)
    grads, _, implicit = idarts.neumann_hypergradient(
        lambda: F.cross_entropy(model(x), y), lambda: F.cross_entropy(model(x), y),
        model.weight_parameters(), model.arch_parameters(), 0.025, 1)
    assert all(g.abs().sum() > 0 for g in grads) and flat(implicit).norm() > 0  # both cell types, both terms


def test_derive_genotype_on_hand_made_alpha():
    """Top-2 edges per node by strongest non-'none' op, 'none' ignored even when it is largest."""
    idx = {p: i for i, p in enumerate(PRIMITIVES)}
    w = torch.full((14, 8), 0.1)
    w[0, idx["none"]], w[0, idx["sep_conv_3x3"]] = 0.9, 0.3
    w[1, idx["skip_connect"]] = 0.5
    w[2, idx["dil_conv_3x3"]], w[3, idx["max_pool_3x3"]], w[4, idx["sep_conv_5x5"]] = 0.6, 0.2, 0.8
    w[5, idx["none"]], w[7, idx["avg_pool_3x3"]], w[8, idx["dil_conv_5x5"]] = 0.99, 0.4, 0.7
    w[10, idx["sep_conv_3x3"]], w[12, idx["skip_connect"]] = 0.5, 0.5  # tie goes to the lower index
    g = idarts.derive_genotype(w, w)
    assert g.normal == [("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 2), ("dil_conv_3x3", 0),
                        ("dil_conv_5x5", 3), ("avg_pool_3x3", 2), ("sep_conv_3x3", 1), ("skip_connect", 3)]
    assert g.normal_concat == [2, 3, 4, 5] and g.reduce == g.normal


# ----------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------
SEARCH_FILES = ["args.json", "log.txt", "idarts.py", "common.py", "search_history.jsonl", "alphas.jsonl",
                "genotype.json", "checkpoint_search.pt", "alphas.png", "alpha_evolution.png", "search_curves.png",
                "hypergradient.png", "genotype.png"]
RETRAIN_FILES = ["retrain_history.jsonl", "checkpoint_retrain.pt", "retrain_curves.png", "results.json"]


@pytest.mark.slow
def test_search_and_retrain_on_fake_writes_the_run_folder(run):
    proc, run_dir = run("idarts.py", *SMALL, "--neumann-k", "1", "--neumann-gamma", "0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in SEARCH_FILES + RETRAIN_FILES:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "idarts" and results["search"]["epochs"] == 2
    assert results["search"]["inner_steps"] == 2 and results["search"]["neumann_k"] == 1
    assert results["retrain"]["retrain_epochs"] == 1 and 0 <= results["retrain"]["test_acc"] <= 100
    history = read_jsonl(run_dir / "search_history.jsonl")
    assert [r["weight_steps"] for r in history] == [4, 4]  # T = 2 weight steps per alpha step, 2 alpha steps
    assert history[1]["lr"] < history[0]["lr"] == 0.025
    for r in history:  # both terms of the hypergradient were computed and logged
        assert r["direct_norm"] > 0 and r["implicit_norm"] > 0 and 0 < r["seconds_per_hypergradient"] < r["seconds"]
    alphas = read_jsonl(run_dir / "alphas.jsonl")
    assert len(alphas) == 2
    for cell in ("normal", "reduce"):
        w = np.array(alphas[-1]["softmax"][cell])
        assert w.shape == (14, 8) and np.allclose(w.sum(1), 1)
    ckpt = torch.load(run_dir / "checkpoint_search.pt", weights_only=False)
    assert ckpt["method"] == "idarts" and ckpt["epoch"] == 1
    assert {"w_optimizer", "a_optimizer", "scheduler", "rng", "alphas"} <= set(ckpt)
    assert np.allclose(ckpt["model"]["alphas_normal"].numpy(), alphas[-1]["alpha"]["normal"])
    assert not np.allclose(alphas[-1]["alpha"]["normal"], 0, atol=1e-3)  # Adam moved alpha off the 1e-3 init
    genotype = common.parse_genotype(str(run_dir / "genotype.json"))
    assert common.genotype_to_dict(genotype) == results["genotype"] == ckpt["genotype"]
    log = (run_dir / "log.txt").read_text()
    assert "search epoch 1 step 2/2" in log and "s hypergradient" in log and "test accuracy" in log


@pytest.mark.slow  # about 24 s on 2 shared CPU cores
def test_digits_search_then_retrain_learns(run):
    """Real data: a broken search or retraining pipeline cannot clear 90 % (chance is 10 %)."""
    # --train-portion 0.9: 3 alpha steps (130 val images), each after T = 5 weight steps (defaults T, K, gamma)
    proc, run_dir = run("idarts.py", "--dataset", "digits", "--device", "cpu", "--workers", "0", "--epochs", "1",
                        "--train-portion", "0.9", "--batch-size", "64", "--init-channels", "2", "--layers", "3",
                        "--retrain-epochs", "6", "--retrain-init-channels", "8", "--retrain-layers", "3",
                        "--retrain-batch-size", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    history = read_jsonl(run_dir / "search_history.jsonl")
    assert history[0]["weight_steps"] == 15 and results["search"]["train_acc"] > 25, history  # chance: 10 %
    assert results["retrain"]["test_acc"] > 90, results["retrain"]


VOLATILE = conftest.VOLATILE | {"seconds_per_hypergradient"}


@pytest.mark.slow  # about 21 s on 2 shared CPU cores
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    flags = [*SMALL, "--steps-per-epoch", "1", "--neumann-k", "1", "--epochs", "2", "--retrain-epochs", "2"]
    ref = run_script("idarts.py", *flags, "--out-dir", tmp_path, "--run-name", "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    # killed in search and in retraining
    kill_resume_and_compare("idarts.py", flags, tmp_path, tmp_path / "ref", volatile=VOLATILE)


@pytest.mark.parametrize("flags,needle", [
    (["--inner-steps", "0"], "--inner-steps must be >=1, got 0"),
    (["--neumann-k", "-1"], "--neumann-k must be >=0, got -1"),
    (["--neumann-gamma", "-0.1"], "--neumann-gamma must be >=0"),
    (["--arch-lr", "0"], "--arch-lr must be >0, got 0.0"),
    (["--arch-learning-rate", "-1"], "--arch-lr must be >0, got -1.0"),  # the official scripts' name
    (["--arch-weight-decay", "-1"], "--arch-weight-decay must be >=0"),
    (["--train-portion", "1"], "--train-portion must be (0, 1), got 1.0"),
    (["--lr-min", "-1"], "--lr-min must be >=0"),
    (["--layers", "2"], "--layers must be >=3, got 2"),
    (["--genotype", "DARTS_V2", "--no-retrain"], "nothing to do"),
])
def test_own_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, flags, needle):
    """idarts.py's own flags, in-process through common.cli like test_bad_input.py."""
    with pytest.raises(SystemExit) as exit_info:
        common.cli(idarts.main, idarts.Args, [*map(str, SMALL), "--out-dir", str(tmp_path / "runs"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------
# --space nb201: the official NAS-Bench-201 notebook's supernet and protocol (Deviation 9)
# ----------------------------------------------------------------------------------------
NB201_TINY = ["--device", "cpu", "--workers", "0", "--dataset", "fake", "--image-size", "8", "--batch-size", "8",
              "--epochs", "2", "--steps-per-epoch", "2", "--space", "nb201", "--init-channels", "4", "--layers", "1",
              "--inner-steps", "1", "--neumann-k", "1", "--retrain-epochs", "1", "--retrain-batch-size", "8",
              "--retrain-init-channels", "4", "--retrain-layers", "3"]


def test_nb201_supernet_is_the_official_size_and_derives_the_argmax_cell():
    """TinyNetworkDartsV2(C=16, N=5, 10 classes): 1692826 weights, 14170 buffer elements (affine=False BN with
    running stats, the counts tests/test_nb201.py checks against xautodl), one (6, 5) alpha; 'none' may win."""
    net = idarts.NB201Supernet(16, 10, 5)
    assert sum(p.numel() for p in net.weight_parameters()) == 1692826
    assert sum(b.numel() for b in net.buffers()) == 14170
    assert [tuple(a.shape) for a in net.arch_parameters()] == [(6, 5)]
    small = idarts.NB201Supernet(4, 10, 1)
    with torch.no_grad():
        small.alphas_cell.copy_(torch.eye(5)[[0, 3, 1, 4, 2, 3]])  # edge e -> op row
    assert small.genotype() == "|none~0|+|nor_conv_3x3~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|nor_conv_3x3~2|"
    assert small(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_nb201_recipe_fills_only_untyped_flags_and_shows_in_help(capsys):
    args = common.parse_args(idarts.Args, ["--space", "nb201", "--lr", "0.02"])
    common.apply_recipes(args)
    assert args.lr == 0.02 and (args.epochs, args.layers, args.lr_min, args.weight_decay, args.nesterov) == \
        (30, 5, 0.001, 5e-4, True)
    assert (args.inner_steps, args.neumann_k, args.retrain_epochs, args.retrain_layers) == (4, 2, 200, 5)
    darts_space = common.parse_args(idarts.Args, [])
    common.apply_recipes(darts_space)
    assert (darts_space.epochs, darts_space.lr, darts_space.layers, darts_space.inner_steps) == (50, 0.025, 8, 5)
    with pytest.raises(SystemExit):
        common.parse_args(idarts.Args, ["--help"])
    assert "[--space nb201: 30]" in capsys.readouterr().out


def test_nb201_search_with_benchmark_lookup_end_to_end(tmp_path, nb201_benchmark):
    folder, expected = nb201_benchmark
    results = idarts.main(common.parse_args(idarts.Args, [*NB201_TINY, "--nb201-benchmark", str(folder),
                                                          "--out-dir", str(tmp_path), "--run-name", "r"]))
    run_dir = tmp_path / "r"
    history = read_jsonl(run_dir / "search_history.jsonl")
    assert len(history) == 2
    for row in history:
        assert row["nb201_index"] == common.nb201_index(row["arch"]) and row["nb201"] == expected(row["arch"])
        assert row["genotype"] == common.nb201_record(row["arch"])
    saved = json.loads((run_dir / "genotype.json").read_text())
    assert saved == results["genotype"] == common.nb201_record(history[-1]["arch"])
    alphas = read_jsonl(run_dir / "alphas.jsonl")
    assert np.array(alphas[-1]["softmax"]["cell"]).shape == (6, 5)
    assert saved["arch"] == common.nb201_derive(torch.tensor(alphas[-1]["alpha"]["cell"]))
    net = common.NB201Network(saved["arch"], 10, 4, 3)
    assert results["retrain"]["params_M"] == pytest.approx(sum(p.numel() for p in net.parameters()) / 1e6, abs=1e-6)
    assert (run_dir / "nb201.png").exists() and (run_dir / "alphas.png").exists()
    assert "NAS-Bench-201" in (run_dir / "log.txt").read_text()


@pytest.mark.parametrize("flags,needle", [
    (["--nb201-benchmark", "x.pth"], "needs --space nb201"),
    (["--space", "nb201", "--genotype", "DARTS_V2"], "needs --space nb201"),
    (["--genotype", "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"], "needs --space nb201"),
    (["--space", "nb201", "--nb201-benchmark", "/nonexistent/NAS-Bench-201.pth"], "nonexistent"),
])
def test_nb201_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as exit_info:
        common.cli(idarts.main, idarts.Args, [*map(str, SMALL), "--out-dir", str(tmp_path / "runs"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()
