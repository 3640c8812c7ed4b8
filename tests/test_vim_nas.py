"""vim_nas.py: the run folder, a real search + retrain, SIGKILL + resume, bad input, and the formulas
VIM-NAS adds to DARTS (the generator phi, A = phi(eps) + xi, its gradient, the lower bound of Eq. (V2))."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import vim_nas
from conftest import RUN_FILES, TINY, kill_resume_and_compare, read_jsonl, run_script

SEARCH_FILES = ["args.json", "log.txt", "vim_nas.py", "common.py", "search_history.jsonl", "alphas.jsonl",
                "alpha_steps.jsonl", "genotype.json", "checkpoint_search.pt", "alphas.png", "alpha_evolution.png",
                "anytime_weights.png", "search_curves.png", "genotype.png"]
RETRAIN_FILES = ["retrain_history.jsonl", "checkpoint_retrain.pt", "retrain_curves.png", "results.json"]
FLAGS = [*TINY, "--steps-per-epoch", "4", "--report-freq", "2"]


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    """One uninterrupted TINY run: its folder is checked file by file, and the resume test compares to it."""
    out = tmp_path_factory.mktemp("vim")
    proc = run_script("vim_nas.py", *FLAGS, "--out-dir", out, "--run-name", "ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "ref"


@pytest.mark.slow
def test_search_and_retrain_on_fake_writes_the_run_folder(ref_run):
    for name in SEARCH_FILES + RETRAIN_FILES:
        assert (ref_run / name).is_file() and (ref_run / name).stat().st_size > 0, name
    results = json.loads((ref_run / "results.json").read_text())
    assert results["method"] == "vim_nas" and results["search"]["epochs"] == 2
    assert results["retrain"]["retrain_epochs"] == 1 and 0 <= results["retrain"]["test_acc"] <= 100
    settle = results["search"]["settling"]
    assert 1 <= settle["genotype_epochs"] <= 2 and len(settle["change"]) == 1 and len(settle["max_weight"]) == 2
    assert 0 <= settle["init_agreement"] <= 1 and settle["agreement"][-1] == 1.0
    alphas = read_jsonl(ref_run / "alphas.jsonl")
    assert [r["epoch"] for r in alphas] == [0, 1]
    for cell in ("normal", "reduce"):
        w, mu = np.array(alphas[-1]["softmax"][cell]), torch.tensor(alphas[-1]["alpha"][cell])
        assert w.shape == (14, 8) and np.allclose(w.sum(1), 1)
        assert np.allclose(w, F.softmax(mu, -1).numpy(), atol=1e-6)  # softmax of the logged phi(eps)
    # the anytime trace: step 0 (initialisation), then every --report-freq 2 of the 4 steps of each epoch
    steps = read_jsonl(ref_run / "alpha_steps.jsonl")
    assert [(r["epoch"], r["step"]) for r in steps] == [(0, 0), (0, 2), (0, 4), (1, 6), (1, 8)]
    assert steps[-1]["softmax"] == alphas[-1]["softmax"]  # the last log point is the end of the last epoch
    # the checkpoint holds phi (both generators, their fixed noise eps) and the map it gives
    ckpt = torch.load(ref_run / "checkpoint_search.pt", weights_only=False)
    assert ckpt["method"] == "vim_nas" and ckpt["epoch"] == 1
    assert {"w_optimizer", "a_optimizer", "scheduler", "rng", "arch", "alphas"} <= set(ckpt)
    assert ckpt["arch"]["normal"]["eps"].shape == (1, 3, 14, 8)
    assert torch.equal(ckpt["model"]["arch_reduce.eps"], ckpt["arch"]["reduce"]["eps"])
    assert np.allclose(ckpt["alphas"]["normal"].numpy(), alphas[-1]["alpha"]["normal"])
    model = vim_nas.Network(4, 10, 3)
    model.load_state_dict(ckpt["model"])
    genotype = common.parse_genotype(str(ref_run / "genotype.json"))
    assert model.genotype() == genotype  # the cell is derived from the learned phi (Algorithm 1, line 7)
    assert common.genotype_to_dict(genotype) == results["genotype"] == ckpt["genotype"]
    log = (ref_run / "log.txt").read_text()
    assert "search epoch 1 step 4/4" in log and "settling" in log and "test accuracy" in log


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(ref_run, tmp_path):
    # killed during the search, after epoch 0
    kill_resume_and_compare("vim_nas.py", FLAGS, tmp_path, ref_run, kill_in_retrain=False,
                            files=(*RUN_FILES, "alpha_steps.jsonl"))


@pytest.mark.slow
def test_digits_one_epoch_search_then_retrain_learns(run):
    """Real data, the paper's one search epoch: a broken search or retraining cannot clear 90 % (chance 10 %)."""
    proc, run_dir = run("vim_nas.py", "--dataset", "digits", "--device", "cpu", "--workers", "0", "--epochs", "1",
                        "--batch-size", "64", "--init-channels", "8", "--layers", "5", "--retrain-epochs", "6",
                        "--retrain-init-channels", "12", "--retrain-layers", "5", "--retrain-batch-size", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["search"]["epochs"] == 1
    assert results["retrain"]["test_acc"] > 90, results["retrain"]


def test_bad_flags_are_one_line_and_write_nothing(tmp_path):
    proc = run_script("vim_nas.py", *TINY, "--noise-std", "-1", "--out-dir", tmp_path / "runs")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--noise-std must be >=0" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()


BAD = [  # vim_nas.py's own flags (tests/test_bad_input.py has the ones every file shares)
    (["--noise-std", "-0.1"], "--noise-std must be >=0, got -0.1"),
    (["--noise-channels", "0"], "--noise-channels must be >=1"),
    (["--gen-channels", "0"], "--gen-channels must be >=1"),
    (["--arch-lr", "0"], "--arch-lr must be >0"),
    (["--arch-weight-decay", "-1"], "--arch-weight-decay must be >=0"),
    (["--train-portion", "0"], "--train-portion must be (0, 1)"),
    (["--grad-clip", "-1"], "--grad-clip must be >=0"),
    (["--batch-size", "1"], "--batch-size must be >=2"),
    (["--layers", "2"], "--layers must be >=3"),
    (["--lr-min", "0.5"], "--lr-min 0.5 is above --lr 0.025"),
]


@pytest.mark.parametrize("flags,needle", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_own_bad_flags_are_one_line_exit_2_before_any_folder(tmp_path, capsys, flags, needle):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        common.cli(vim_nas.main, vim_nas.Args, [*TINY, "--out-dir", str(out), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


@pytest.mark.parametrize("size", [8, 9, 13, 30, 64])
def test_supernet_runs_at_any_image_size_from_8(size):
    torch.manual_seed(0)
    model = vim_nas.Network(4, 10, 3)
    logits = model(torch.randn(2, 3, size, size), vim_nas.sample_noise(model, 1.0))
    assert logits.shape == (2, 10)
    grads, _ = vim_nas.phi_grad(model, torch.randn(2, 3, size, size), torch.tensor([1, 2]),
                                vim_nas.sample_noise(model, 1.0))
    names = [n for n, _ in model.named_parameters() if n.startswith("arch_")]
    for cell in ("arch_normal.", "arch_reduce."):  # both generators get a gradient (BN's last shift cannot:
        # adding one constant to every alpha leaves each softmax unchanged)
        assert sum(g.abs().sum() for n, g in zip(names, grads) if n.startswith(cell)) > 0


# ----------------------------------------------------------------------------- formulas
def test_generator_maps_fixed_noise_to_one_alpha_map_per_cell_type():
    """Eq. (V5): ConvReLUBN(3,14,3) -> ConvReLUBN(14,1,3) gives a (14, |O|) map; normal and reduce have
    their own generator (Deviation 2); eps is fixed, so phi(eps) is a function of phi alone."""
    torch.manual_seed(0)
    model = vim_nas.Network(4, 10, 3)
    mu = model.arch_means()
    assert {c: tuple(m.shape) for c, m in mu.items()} == {"normal": (14, 8), "reduce": (14, 8)}
    assert model.arch_normal is not model.arch_reduce and not torch.equal(mu["normal"], mu["reduce"])
    convs = [m for m in model.arch_normal.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(3, 14, (3, 3)), (14, 1, (3, 3))]
    model.eval()  # BN uses the map's own statistics in both modes (Deviation 3)
    assert torch.equal(model.arch_means()["normal"], mu["normal"])
    names = {n for n, _ in model.named_parameters() if n.startswith("arch_")}
    assert {id(p) for p in model.arch_parameters()} == {id(p) for n, p in model.named_parameters() if n in names}
    assert not {id(p) for p in model.arch_parameters()} & {id(p) for p in model.weight_parameters()}
    # one alpha depends on the noise of other edges (3x3 convs locally, BN statistics globally):
    # the edges of a cell are no longer independent, the paper's point against DARTS
    eps = model.arch_normal.eps.clone().requires_grad_()
    g = torch.autograd.grad(model.arch_normal.net(eps)[0, 0, 5, 3], eps)[0][0].abs().sum(0)  # (14, 8)
    assert g[4:7].sum() > 0 and g[:3].sum() > 0 and g[11:].sum() > 0


def test_sampled_architectures_have_mean_phi_eps_and_covariance_sigma2_identity():
    """Eq. (V4): A = phi(eps) + xi with xi ~ N(0, s^2 I): over many draws, mean phi(eps), covariance s^2 I."""
    torch.manual_seed(0)
    model, s, n = vim_nas.Network(4, 10, 3), 0.7, 5000
    mu = model.arch_means()["normal"].detach().flatten()  # (112,)
    A = torch.stack([mu + vim_nas.sample_noise(model, s)["normal"].flatten() for _ in range(n)]).double()
    se = s / n ** 0.5  # standard error of each mean
    assert ((A.mean(0) - mu).abs() < 5 * se).all()
    cov = torch.cov(A.T)  # (112, 112)
    off_diagonal = cov - torch.diag(cov.diagonal())
    assert (cov.diagonal() - s ** 2).abs().max() < 0.1 * s ** 2 and off_diagonal.abs().max() < 0.1 * s ** 2
    assert torch.equal(vim_nas.sample_noise(model, 0.0)["reduce"], torch.zeros(14, 8))  # point estimate


def test_reparameterised_gradient_matches_the_closed_form():
    """grad_phi E_xi[f(phi(eps) + xi)]: for f(A) = <c, A> + 0.5 <d, A^2>, E f = <c, mu> + 0.5 <d, mu^2 + s^2>
    in closed form. A linear f has the exact gradient in every single draw; a quadratic one on average,
    with an error that falls like 1/sqrt(draws)."""
    torch.manual_seed(1)
    gen = vim_nas.ArchGenerator(14, 8).double()
    c, d, s = torch.randn(14, 8, dtype=torch.float64), torch.rand(14, 8, dtype=torch.float64), 1.0
    params = list(gen.parameters())

    def closed_form(linear):
        mu = gen()
        return torch.autograd.grad((c * mu).sum() + (0 if linear else 0.5 * (d * (mu ** 2 + s ** 2)).sum()), params)

    def reparam(linear, n):  # the mean of n one-draw estimates, the way the search takes one per step
        A = gen() + s * torch.randn(n, 14, 8, dtype=torch.float64)  # Eq. (V4), (n, 14, 8)
        f = (c * A).sum((1, 2)) + (0 if linear else 0.5 * (d * A ** 2).sum((1, 2)))
        return torch.autograd.grad(f.mean(), params)

    def err(a, b):
        a, b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
        return ((a - b).norm() / b.norm()).item()

    assert err(reparam(True, 1), closed_form(True)) < 1e-12
    exact = closed_form(False)
    e_small, e_big = err(reparam(False, 100), exact), err(reparam(False, 10000), exact)
    assert e_big < 0.02 and e_big < e_small / 4  # unbiased: 100x the draws, ~10x less error


def test_lower_bound_on_a_discrete_joint_is_tight_at_the_posterior():
    """Eq. (V2): I(D;A) >= H(D) + E[log q(D|A)] for every q, with equality at q = p(D|A); the gap is
    E_A KL(p(D|A) || q(D|A)). Exact sums on a random 6 x 5 joint."""
    g = torch.Generator().manual_seed(0)
    p = torch.rand(6, 5, generator=g, dtype=torch.float64) ** 3
    p /= p.sum()
    p_a = p.sum(0)
    posterior = p / p_a  # p(D | A), columns sum to 1
    h = lambda x: -(x * x.log()).sum()
    mi, bound = vim_nas.mutual_information_bound(p, posterior)
    assert torch.isclose(mi, h(p.sum(1)) + h(p_a) - h(p.flatten()), atol=1e-12)  # I = H(D) + H(A) - H(D, A)
    assert abs(mi - bound) < 1e-12
    for _ in range(20):
        q = torch.rand(6, 5, generator=g, dtype=torch.float64)
        q /= q.sum(0)
        mi_q, bound_q = vim_nas.mutual_information_bound(p, q)
        kl = (p_a * (posterior * (posterior / q).log()).sum(0)).sum()
        assert bound_q < mi_q and torch.isclose(mi_q - bound_q, kl, atol=1e-12)
    independent = torch.outer(p.sum(1), p_a)  # I = 0 when D and A are independent
    assert abs(vim_nas.mutual_information_bound(independent, independent / p_a)[0]) < 1e-12


def test_phi_gradient_flows_through_softmax_of_the_sampled_architecture():
    """The phi step differentiates CE(supernet(x; softmax(phi(eps) + xi)), y): the chain rule through
    A, checked against d CE / d A from the same forward pass, pulled back through phi by autograd."""
    torch.manual_seed(0)
    model = vim_nas.Network(4, 10, 3).double()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    xi = {k: v.double() for k, v in vim_nas.sample_noise(model, 1.0).items()}
    torch.manual_seed(1)
    grads, _ = vim_nas.phi_grad(model, x, y, xi)
    mu = model.arch_means()
    A = {c: (mu[c] + xi[c]).detach().requires_grad_() for c in mu}  # the same A, as leaves
    w = {c: F.softmax(A[c], -1) for c in A}
    s0 = s1 = model.stem(x)
    for cell in model.cells:
        s0, s1 = s1, cell(s0, s1, w["reduce"] if cell.reduction else w["normal"])
    loss = F.cross_entropy(model.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1)), y)
    dA = torch.autograd.grad(loss, [A["normal"], A["reduce"]])
    want = torch.autograd.grad([mu["normal"], mu["reduce"]], model.arch_parameters(), grad_outputs=list(dA))
    for a, b in zip(grads, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # phi_grad takes CE of float32 logits (--amp path)


def test_genotype_from_a_hand_made_map_and_settling_of_hand_made_histories():
    w = torch.full((14, 8), 0.1)
    idx = common.PRIMITIVES.index
    w[0, idx("none")] = 0.9  # 'none' never wins
    w[0, idx("sep_conv_3x3")], w[1, idx("skip_connect")] = 0.3, 0.5
    w[2, idx("dil_conv_5x5")], w[4, idx("max_pool_3x3")], w[3, idx("sep_conv_5x5")] = 0.6, 0.7, 0.2
    g = vim_nas.derive_genotype(w, w)
    assert g.normal[:4] == [("skip_connect", 1), ("sep_conv_3x3", 0), ("max_pool_3x3", 2), ("dil_conv_5x5", 0)]
    assert g.normal_concat == [2, 3, 4, 5] and g.reduce == g.normal

    def row(m):
        return {"softmax": {"normal": m.tolist(), "reduce": m.tolist()}}

    u = torch.full((14, 8), 1 / 8)
    one = F.one_hot(torch.arange(14) % 8, 8).float()
    s = vim_nas.settling([row(u), row(one), row(one)])
    assert s["genotype_epochs"] == s["argmax_epochs"] == 2 and s["epochs"] == 3
    assert s["change"] == pytest.approx([7 / 8, 0.0]) and s["max_weight"] == pytest.approx([1 / 8, 1.0, 1.0])
    assert s["agreement"][1:] == [1.0, 1.0] and s["agreement"][0] < 1
    assert vim_nas.settling([row(one)] * 3)["genotype_epochs"] == 1
    swap = one.clone()
    swap[[0, 1]] = swap[[1, 0]]  # node 0 keeps the same two (op, input) pairs, listed in the other order
    assert vim_nas.derive_genotype(swap, swap) != vim_nas.derive_genotype(one, one)
    assert vim_nas.settling([row(one), row(one), row(swap)])["genotype_epochs"] == 1
    swap[2] = F.one_hot(torch.tensor(5), 8)  # edge 0 -> node 1: avg_pool_3x3 becomes sep_conv_5x5
    s = vim_nas.settling([row(one), row(one), row(swap)])
    assert s["genotype_epochs"] == 3 and s["agreement"] == [14 / 16, 14 / 16, 1.0]  # one pair per cell differs


# ----------------------------------------------------------------------------------------
# --space nb201: DARTS's NAS-Bench-201 protocol with VIM-NAS's generator (Deviation 13)
# ----------------------------------------------------------------------------------------
NB201_TINY = ["--device", "cpu", "--workers", "0", "--dataset", "fake", "--image-size", "8", "--batch-size", "8",
              "--epochs", "2", "--steps-per-epoch", "2", "--space", "nb201", "--init-channels", "4", "--layers", "1",
              "--retrain-epochs", "1", "--retrain-batch-size", "8", "--retrain-init-channels", "4",
              "--retrain-layers", "3"]


def test_nb201_supernet_is_the_benchmark_darts_supernet_with_one_generator():
    """Weights: those of TinyNetworkDarts(C=16, N=5, 10 classes) with running BN stats (1692826 weights, 14170
    buffer elements, as tests/test_nb201.py checks against xautodl) plus the generator's eps (1, 3, 6, 5);
    A = phi(eps) + xi is (6, 5), shared by all cells, and the derived cell is its argmax per edge."""
    net = vim_nas.NB201Supernet(16, 10, 5)
    assert sum(p.numel() for p in net.weight_parameters()) == 1692826
    assert sum(b.numel() for n, b in net.named_buffers() if not n.startswith("arch_")) == 14170
    assert net.arch_cell.eps.shape == (1, 3, 6, 5) and list(net.generators()) == ["cell"]
    xi = vim_nas.sample_noise(net, 1.0)
    assert xi["cell"].shape == (6, 5)
    small = vim_nas.NB201Supernet(4, 10, 1)
    loss = F.cross_entropy(small(torch.randn(2, 3, 8, 8), vim_nas.sample_noise(small, 1.0)), torch.tensor([1, 2]))
    grads = torch.autograd.grad(loss, small.arch_parameters())
    assert all(g.abs().sum() > 0 for g in grads)  # the val loss reaches phi through softmax(phi(eps) + xi)
    with torch.no_grad():
        assert small.genotype() == common.nb201_derive(small.arch_cell())


def test_nb201_recipe_fills_only_untyped_flags_and_keeps_vim_nas_own_settings(capsys):
    args = common.parse_args(vim_nas.Args, ["--space", "nb201", "--lr", "0.05"])
    common.apply_recipes(args)
    assert args.lr == 0.05 and (args.weight_decay, args.nesterov, args.layers, args.batch_size) == (5e-4, True, 5, 64)
    assert (args.epochs, args.arch_lr, args.noise_std) == (1, 0.025, 1.0)  # VIM-NAS's own (Deviation 13)
    assert (args.retrain_epochs, args.retrain_nesterov, args.auxiliary) == (200, True, False)
    with pytest.raises(SystemExit):
        common.parse_args(vim_nas.Args, ["--help"])
    assert "[--space nb201: 0.0005]" in capsys.readouterr().out


def test_nb201_search_with_benchmark_lookup_end_to_end(tmp_path, nb201_benchmark):
    folder, expected = nb201_benchmark
    results = vim_nas.main(common.parse_args(vim_nas.Args, [*NB201_TINY, "--nb201-benchmark", str(folder),
                                                            "--out-dir", str(tmp_path), "--run-name", "r"]))
    run_dir = tmp_path / "r"
    history = read_jsonl(run_dir / "search_history.jsonl")
    assert len(history) == 2
    for row in history:
        assert row["nb201_index"] == common.nb201_index(row["arch"]) and row["nb201"] == expected(row["arch"])
    alphas = read_jsonl(run_dir / "alphas.jsonl")
    assert np.array(alphas[-1]["softmax"]["cell"]).shape == (6, 5)
    saved = json.loads((run_dir / "genotype.json").read_text())
    assert saved == results["genotype"] == common.nb201_record(history[-1]["arch"])
    assert saved["arch"] == common.nb201_derive(torch.tensor(alphas[-1]["alpha"]["cell"]))
    net = common.NB201Network(saved["arch"], 10, 4, 3)
    assert results["retrain"]["params_M"] == pytest.approx(sum(q.numel() for q in net.parameters()) / 1e6, abs=1e-6)
    assert (run_dir / "nb201.png").exists() and (run_dir / "anytime_weights.png").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--nb201-benchmark", "x.pth"], "needs --space nb201"),
    (["--space", "nb201", "--genotype", "DARTS_V2"], "needs --space nb201"),
    (["--genotype", "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"], "needs --space nb201"),
    (["--space", "nb201", "--layers", "0"], "--layers must be >=1"),
])
def test_nb201_bad_inputs_are_one_line_exit_2_before_any_folder(tmp_path, capsys, flags, needle):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        common.cli(vim_nas.main, vim_nas.Args, [*TINY, "--out-dir", str(out), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()
