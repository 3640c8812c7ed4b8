"""gdas.py: the run folder, real-data learning, SIGKILL + resume, bad input, and the GDAS formulas
(Gumbel-max sampling, straight-through weights, single-path edges, tau schedule, genotype rules)
against exact autograd, closed forms and counts. Also: GDAS against DARTS at the same config."""
import json
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import darts
import gdas
from common import PRIMITIVES
from conftest import TINY, kill_resume_and_compare, read_jsonl, run_script

SEARCH_FILES = ["args.json", "log.txt", "gdas.py", "common.py", "search_history.jsonl", "alphas.jsonl",
                "genotype.json", "checkpoint_search.pt", "alphas.png", "alpha_evolution.png",
                "search_curves.png", "genotype.png", "tau.png"]
RETRAIN_FILES = ["retrain_history.jsonl", "checkpoint_retrain.pt", "retrain_curves.png", "results.json"]


# ----------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted TINY run on fake data: checked file by file below, and the reference of the
    SIGKILL + resume test."""
    out = tmp_path_factory.mktemp("runs")
    proc = run_script("gdas.py", *TINY, "--out-dir", out, "--run-name", "ref")
    return proc, out / "ref"


@pytest.mark.slow
def test_search_and_retrain_on_fake_writes_the_run_folder(tiny_run):
    proc, run_dir = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in SEARCH_FILES + RETRAIN_FILES:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "gdas" and results["search"]["epochs"] == 2 and results["search"]["frc"] is False
    assert results["retrain"]["retrain_epochs"] == 1 and 0 <= results["retrain"]["test_acc"] <= 100
    history = read_jsonl(run_dir / "search_history.jsonl")
    assert [r["tau"] for r in history] == [10.0, pytest.approx(0.1)]  # Eq. (8) over 2 epochs: 10, then 0.1
    alphas = read_jsonl(run_dir / "alphas.jsonl")
    assert len(alphas) == 2 and [a["tau"] for a in alphas] == [r["tau"] for r in history]
    for cell in ("normal", "reduce"):
        w = np.array(alphas[-1]["softmax"][cell])
        assert w.shape == (14, 8) and np.allclose(w.sum(1), 1)
        moved = np.abs(np.array(alphas[1]["alpha"][cell]) - np.array(alphas[0]["alpha"][cell])).max()
        assert 5e-4 < moved < 8 * 3e-4 * 3  # 8 Adam steps of lr 3e-4 in epoch 1
    ckpt = torch.load(run_dir / "checkpoint_search.pt", weights_only=False)
    assert ckpt["method"] == "gdas" and ckpt["epoch"] == 1 and ckpt["tau"] == pytest.approx(0.1)
    assert {"w_optimizer", "a_optimizer", "scheduler", "rng", "generator"} <= set(ckpt)
    assert np.allclose(ckpt["model"]["alphas_normal"].numpy(), alphas[-1]["alpha"]["normal"])
    assert np.allclose(ckpt["alphas"]["reduce"].numpy(), alphas[-1]["alpha"]["reduce"])
    assert ckpt["w_optimizer"]["param_groups"][0]["nesterov"] is True
    genotype = common.parse_genotype(str(run_dir / "genotype.json"))
    assert common.genotype_to_dict(genotype) == results["genotype"] == ckpt["genotype"] == history[-1]["genotype"]
    log = (run_dir / "log.txt").read_text()
    assert "search epoch 1 step 8/8" in log and "tau 0.100" in log and "test accuracy" in log


@pytest.mark.slow
def test_digits_search_then_retrain_learns(run):
    """Real data: a broken search or retraining pipeline cannot clear 90 % (chance is 10 %). The
    supernet itself is not held to a bar: 22 single-path steps leave it near chance on digits."""
    proc, run_dir = run("gdas.py", "--dataset", "digits", "--device", "cpu", "--workers", "0", "--epochs", "2",
                        "--batch-size", "64", "--init-channels", "8", "--layers", "5", "--retrain-epochs", "3",
                        "--retrain-init-channels", "16", "--retrain-layers", "5", "--retrain-batch-size", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["search"]["tau"] == pytest.approx(0.1) and results["search"]["epochs"] == 2
    assert results["retrain"]["test_acc"] > 90, results["retrain"]
    history = read_jsonl(run_dir / "retrain_history.jsonl")
    assert [r["epoch"] for r in history] == list(range(3)) and history[-1]["lr"] < history[0]["lr"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_run, tmp_path):
    ref, ref_dir = tiny_run
    assert ref.returncode == 0, ref.stderr[-2000:]
    # killed during the search, after epoch 0 (tau 10)
    run_dir = kill_resume_and_compare("gdas.py", TINY, tmp_path, ref_dir, kill_in_retrain=False)
    assert "resuming the search at epoch" in (run_dir / "log.txt").read_text()


GDAS_CASES = [  # (flags, what the one line must say)
    (["--tau-min", "0"], "--tau-min must be >0, got 0.0"),
    (["--tau-max", "-1"], "--tau-max must be >0, got -1.0"),
    (["--tau-min", "20"], "--tau-min 20.0 is above --tau-max 10.0"),
    (["--genotype-rule", "top2"], "unknown --genotype-rule 'top2'; choose one of darts, pairs"),
    (["--train-portion", "1"], "--train-portion must be (0, 1), got 1.0"),
    (["--train-portion", "0"], "--train-portion must be (0, 1), got 0.0"),
    (["--arch-lr", "0"], "--arch-lr must be >0, got 0.0"),
    (["--arch-learning-rate", "-1"], "--arch-lr must be >0, got -1.0"),  # the official spelling is an alias
    (["--arch-weight-decay", "-1"], "--arch-weight-decay must be >=0"),
    (["--momentum", "0"], "--nesterov needs --momentum > 0"),
    (["--momentum", "-0.5", "--no-nesterov"], "--momentum must be [0, 1)"),
    (["--frc", "--no-retrain", "--init-channels", "6"], "divisible by 4"),
    (["--frc", "--genotype", "GDAS_V1"], "--frc searches the normal cell only"),
    (["--frc"], "--frc searches the normal cell only and common.retrain cannot build the fixed reduction cell"),
]


@pytest.mark.parametrize("flags,needle", GDAS_CASES, ids=[" ".join(f)[:40] for f, _ in GDAS_CASES])
def test_bad_gdas_flags_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, flags, needle):
    """GDAS's own flags and cross-flag checks, in-process through common.cli (the entry point of `python gdas.py`),
    as tests/test_bad_input.py runs the flags every method shares."""
    with pytest.raises(SystemExit) as exit_info:
        common.cli(gdas.main, gdas.Args, [*TINY, "--out-dir", str(tmp_path / "runs"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------
# Eq. (2)-(5): Gumbel-max sample and straight-through weights
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [10.0, 1.0, 0.1])
def test_sampled_weights_are_one_hot_forward_and_carry_the_softmax_gradient_backward(tau):
    torch.manual_seed(0)
    alpha = torch.randn(14, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(14, 8, dtype=torch.float64)  # an arbitrary upstream gradient dL/dh
    h, index = gdas.gumbel_max_sample(alpha, tau, torch.Generator().manual_seed(1))
    # forward: exactly one-hot (bit for bit), at the sampled index
    assert torch.equal(h.detach(), F.one_hot(index, 8).double())
    (grad,) = torch.autograd.grad((h * v).sum(), alpha)
    # the same expression by hand, with the same Gumbel noise (same generator seed)
    gumbel = -torch.empty(14, 8, dtype=torch.float64).exponential_(generator=torch.Generator().manual_seed(1)).log()
    soft = F.softmax((F.log_softmax(alpha, -1) + gumbel) / tau, -1)
    assert torch.equal(index, (F.log_softmax(alpha, -1) + gumbel).argmax(-1))
    (want,) = torch.autograd.grad((soft * v).sum(), alpha)
    assert torch.allclose(grad, want, rtol=1e-12, atol=1e-15)
    # closed form: d h~_k / d alpha_j = (1/tau) h~_k (delta_kj - h~_j); log_softmax drops out
    s = soft.detach()
    closed = (s * v - s * (s * v).sum(-1, keepdim=True)) / tau
    # (elementwise cancellation in rows that are nearly one-hot at tau 0.1: compare in norm)
    assert ((grad - closed).norm() / closed.norm()).item() < 1e-10
    assert grad.abs().max() > 0  # (at tau 0.1 some rows are nearly one-hot, but not all)
    # what the test would catch: the hard one-hot alone has no gradient, the soft value is not one-hot
    assert not torch.equal(s, F.one_hot(index, 8).double())


def test_sampling_frequencies_match_softmax_alpha_and_not_tau():
    g = torch.Generator().manual_seed(0)
    alpha = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.2],
                          [0.0] * 8,
                          [-3.0, 3.0, 0.0, 1.0, 1.0, 0.0, -1.0, 2.0]])
    n = 40000
    p = F.softmax(alpha, -1)

    def chi2(index, probs):  # Pearson statistic summed over the 3 rows: df = 3 * 7 = 21
        counts = F.one_hot(index, 8).sum(0).double()  # (3, 8)
        expected = n * probs.double()
        return ((counts - expected) ** 2 / expected).sum().item()

    _, index = gdas.gumbel_max_sample(alpha.expand(n, 3, 8), tau=1.0, generator=g)
    freq = F.one_hot(index, 8).double().mean(0)
    # 21 degrees of freedom: P(chi2 > 55) ~ 1e-4; 5 standard errors per cell
    assert chi2(index, p) < 55, chi2(index, p)
    assert (freq - p).abs().max() < 5 * (0.25 / n) ** 0.5
    # the test has teeth: the same draws are far from softmax(alpha / 2) and from uniform
    assert chi2(index, F.softmax(alpha / 2, -1)) > 1000 and chi2(index, torch.full((3, 8), 1 / 8)) > 1000
    # tau changes the gradient, never the sample: same noise, same ops at every tau
    samples = [gdas.gumbel_max_sample(alpha, tau, torch.Generator().manual_seed(5))[1] for tau in (10.0, 1.0, 0.1)]
    assert all(torch.equal(s, samples[0]) for s in samples)


def test_temperature_is_linear_from_tau_max_to_tau_min():
    taus = [gdas.temperature(e, 250, 10.0, 0.1) for e in range(250)]
    assert taus[0] == 10.0 and taus[-1] == pytest.approx(0.1) and np.allclose(np.diff(taus), -9.9 / 249)
    assert gdas.temperature(0, 1, 10.0, 0.1) == 10.0  # a single epoch searches at tau_max


# ----------------------------------------------------------------------------------------
# Eq. (1), (6): single-path edges and cells
# ----------------------------------------------------------------------------------------
def test_edge_runs_only_the_sampled_op_and_its_alpha_gradient_is_the_chain_rule():
    """Eq. (6): out = h^{k*} O^{k*}(x), so dL/dalpha = <dL/dout, O^{k*}(x)> * d h~_{k*} / d alpha."""
    torch.manual_seed(1)
    op = gdas.MixedOp(4, 1).double().train()
    x, v = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    alpha = torch.randn(8, dtype=torch.float64, requires_grad=True)
    calls = []
    for k, o in enumerate(op.ops):
        o.register_forward_hook(lambda m, i, out, k=k: calls.append(k))
    h, index = gdas.gumbel_max_sample(alpha, 0.5, torch.Generator().manual_seed(3))
    k = int(index)
    out = op(x, h, k)
    assert calls == [k] and torch.equal(out, op.ops[k](x))  # one op run, scaled by exactly 1
    (grad,) = torch.autograd.grad((out * v).sum(), alpha)
    gumbel = -torch.empty(8, dtype=torch.float64).exponential_(generator=torch.Generator().manual_seed(3)).log()
    soft = F.softmax((F.log_softmax(alpha, -1) + gumbel) / 0.5, -1)
    (d_soft_k,) = torch.autograd.grad(soft[k], alpha)
    assert torch.allclose(grad, (v * op.ops[k](x)).sum() * d_soft_k, rtol=1e-10, atol=1e-14)


def count_op_calls(model, x):
    """Forward passes of candidate ops (the modules inside MixedOps) in one forward of model."""
    calls = []
    hooks = [o.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules()
             if isinstance(m, (darts.MixedOp, gdas.MixedOp)) for o in m.ops]
    model(x)
    for hk in hooks:
        hk.remove()
    return len(calls)


def saved_tensor_bytes(model, x, y):
    """Bytes of the distinct storages autograd saves for backward in one training forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(storages.values())


def search_step(model, w_opt, a_opt, x, y):
    """One search iteration as both files run it: a weight step and a first-order architecture step,
    each one forward + backward (gdas.search_epoch's order; darts.py does the two in the other order)."""
    w_opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    w_opt.step()
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), model.arch_parameters())
    for a, g in zip(model.arch_parameters(), grads):
        a.grad = g
    a_opt.step()


def step_cost(module, C=4, layers=3, batch=8, size=8, repeats=3, device="cpu"):
    """(min seconds per search step over repeats after a warm-up, op calls per forward, bytes saved for
    backward) for module.Network at one config; the same data and steps for darts and gdas."""
    torch.manual_seed(0)
    device = torch.device(device)
    model = module.Network(C, 10, layers).to(device).train()
    x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 10, (batch,), device=device)
    w_opt = torch.optim.SGD(model.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(model.arch_parameters(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    search_step(model, w_opt, a_opt, x, y)  # warm-up (allocator, cuDNN)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        search_step(model, w_opt, a_opt, x, y)
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), count_op_calls(model, x), saved_tensor_bytes(model, x, y)


def test_gdas_step_runs_one_op_per_edge_and_is_faster_and_smaller_than_darts():
    t_darts, ops_darts, mem_darts = step_cost(darts)
    t_gdas, ops_gdas, mem_gdas = step_cost(gdas)
    print(f"\nsearch step, C=4, 3 cells, batch 8, 8x8, CPU: DARTS {t_darts * 1e3:.0f} ms, {ops_darts} op calls, "
          f"{mem_darts / 2**20:.1f} MiB saved for backward; GDAS {t_gdas * 1e3:.0f} ms, {ops_gdas} op calls, "
          f"{mem_gdas / 2**20:.1f} MiB ({t_gdas / t_darts:.2f}x time, {mem_gdas / mem_darts:.2f}x memory)")
    # deterministic: 3 cells x 14 edges, all 8 ops in DARTS, the sampled one in GDAS
    assert ops_darts == 3 * 14 * 8 and ops_gdas == 3 * 14
    # measured about 0.15x in both; the margins leave room for a noisy shared machine
    assert mem_gdas < 0.4 * mem_darts
    assert t_gdas < 0.6 * t_darts


def test_one_sample_per_forward_shared_by_all_cells_of_a_type():
    torch.manual_seed(2)
    model = gdas.Network(4, 10, 5).train()  # cells 0, 2, 4 normal; 1, 3 reduction
    chosen = []
    for cell in model.cells:
        for e, edge in enumerate(cell.edges):
            for k, o in enumerate(edge.ops):
                o.register_forward_hook(lambda m, i, out, c=cell.reduction, e=e, k=k: chosen.append((c, e, k)))
    model(torch.randn(2, 3, 16, 16))
    ops = [[k for _, _, k in chosen[i * 14:(i + 1) * 14]] for i in range(5)]  # per cell, in edge order
    assert len(chosen) == 5 * 14 and ops[0] == ops[2] == ops[4] and ops[1] == ops[3] and ops[0] != ops[1]


def test_frc_supernet_searches_the_normal_cell_only():
    torch.manual_seed(3)
    model = gdas.Network(4, 10, 3, frc=True).train()
    assert [type(c).__name__ for c in model.cells] == ["SearchCell", "FixedReductionCell", "FixedReductionCell"]
    assert len(model.arch_parameters()) == 1 and "alphas_reduce" not in model.state_dict()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    cell = model.cells[1]
    assert cell(torch.randn(2, 12, 16, 16), torch.randn(2, 16, 16, 16)).shape == (2, 32, 8, 8)  # stem 3C, cell 0 4C
    g = model.genotype()
    assert len(g.normal) == 8 and g.reduce == [] and list(model.arch_weights()) == ["normal"]


@pytest.mark.parametrize("size", [9, 13, 30, 64])
@pytest.mark.parametrize("frc", [False, True])
def test_supernet_forward_and_backward_at_odd_and_large_image_sizes(frc, size):
    """Any image size >= 8: the search cells (and the fixed reduction cell) meet at ceil(H/2) after each reduction."""
    torch.manual_seed(0)
    model = gdas.Network(4, 10, 3, frc=frc).train()
    loss = F.cross_entropy(model(torch.randn(2, 3, size, size)), torch.tensor([1, 2]))
    grads = torch.autograd.grad(loss, model.arch_parameters())
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_frc_cell_convs_carry_the_official_search_bias():
    """Deviation 10: GDAS_Reduction_Cell builds its convs with bias=not affine, so the search cell (affine-free BNs)
    has a bias on each of its 6 convs: per branch 2 grouped convs of C * (C/8) * 3 weights + C biases and a 1x1 conv
    of C * C + C. The affine (retraining) form is the 2019 release's Transition: no bias."""
    C = 16
    search, retrain = gdas.FixedReductionCell(12, 16, C, False), gdas.FixedReductionCell(12, 16, C, False, affine=True)
    convs = [m for m in search.convs.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6 and all(c.bias is not None for c in convs)
    assert sum(p.numel() for p in search.convs.parameters()) == 2 * (2 * (C * (C // 8) * 3 + C) + C * C + C)
    assert all(m.bias is None for m in retrain.convs.modules() if isinstance(m, torch.nn.Conv2d))


# ----------------------------------------------------------------------------------------
# Deviation 12: zero-filled gradients (official) against --freeze-unsampled
# ----------------------------------------------------------------------------------------
def test_unsampled_ops_move_by_weight_decay_and_momentum_by_default_and_stay_with_freeze_unsampled(monkeypatch):
    """Two search steps with the sampled op forced on every edge: step 1 runs op a in the weight step and op b in the
    architecture step, step 2 runs op c in both. In step 2, a and b are not sampled, so their gradient is zero and
    official SGD (zero-filled .grad, Nesterov, weight decay wd, momentum mu, lr eta) gives, in closed form,
        d = wd p1,  buf2 = mu buf1 + d,  p2 = p1 - eta (d + mu buf2)    (a: buf1 from its step-1 update)
        p2 = p1 - eta (1 + mu) wd p1                                     (b: no buffer yet, buf2 = d)
    b moved in neither step before: it ran only in an architecture step, which leaves it a .grad in the official
    code. With --freeze-unsampled (set_to_none=True) SGD skips both: p2 == p1 bit for bit."""
    a, b, c = (PRIMITIVES.index(n) for n in ("sep_conv_3x3", "dil_conv_3x3", "sep_conv_5x5"))
    lr, mu, wd = 0.025, 0.9, 5e-4
    moved = {}
    for freeze in (False, True):
        order = iter([a, a, b, b, c, c, c, c])  # per forward: normal, then reduce sample

        def forced(alpha, tau, generator=None):  # straight-through one-hot of the forced op on every edge
            index = torch.full(alpha.shape[:-1], next(order), dtype=torch.long)
            soft = F.softmax(alpha, -1)
            return F.one_hot(index, alpha.shape[-1]).to(soft.dtype) - soft.detach() + soft, index

        monkeypatch.setattr(gdas, "gumbel_max_sample", forced)
        torch.manual_seed(0)
        model = gdas.Network(4, 10, 3).double().train()
        w_opt = torch.optim.SGD(model.weight_parameters(), lr, momentum=mu, weight_decay=wd, nesterov=True)
        a_opt = torch.optim.Adam(model.arch_parameters(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
        args = gdas.Args(device="cpu", freeze_unsampled=freeze)
        x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
        op_a, op_b = (list(model.cells[0].edges[0].ops[k].parameters()) for k in (a, b))
        p0 = [q.detach().clone() for q in op_b]
        gdas.search_step(model, x, y, x, y, w_opt, a_opt, args)
        p1a, p1b = ([q.detach().clone() for q in ps] for ps in (op_a, op_b))
        buf1 = [w_opt.state[q]["momentum_buffer"].clone() for q in op_a]
        assert all(torch.equal(q, r) for q, r in zip(p1b, p0))  # b ran in no weight step yet
        assert [q.grad is not None for q in op_b] == [not freeze] * len(op_b)  # the official .grad left by step 1
        gdas.search_step(model, x, y, x, y, w_opt, a_opt, args)
        if freeze:
            assert all(torch.equal(q.detach(), r) for q, r in zip(op_a + op_b, p1a + p1b))
            assert all("momentum_buffer" not in w_opt.state[q] for q in op_b)
        else:
            for q, p1, m1 in zip(op_a, p1a, buf1):
                d = wd * p1
                buf2 = mu * m1 + d
                assert torch.allclose(q.detach(), p1 - lr * (d + mu * buf2), rtol=1e-12, atol=1e-15)
            for q, p1 in zip(op_b, p1b):
                assert torch.allclose(q.detach(), p1 - lr * (1 + mu) * wd * p1, rtol=1e-12, atol=1e-15)
        moved[freeze] = max((q.detach() - r).abs().max().item() for q, r in zip(op_a + op_b, p1a + p1b))
    assert moved[False] > 1e-7 and moved[True] == 0.0
    assert gdas.Args().freeze_unsampled is False  # the official behaviour is the default


# ----------------------------------------------------------------------------------------
# Genotype rules and the published cell
# ----------------------------------------------------------------------------------------
def test_derive_genotype_on_hand_made_alpha_both_rules():
    idx = {p: i for i, p in enumerate(PRIMITIVES)}
    w = torch.full((14, 8), 0.1)
    # node 2 (edges 0-1): edge 0 has the two best ops of the node; 'none' is largest but excluded
    w[0, idx["none"]], w[0, idx["sep_conv_3x3"]], w[0, idx["skip_connect"]] = 0.9, 0.6, 0.5
    w[1, idx["max_pool_3x3"]] = 0.3
    # node 3 (edges 2-4): state 2 (0.8) and state 0 (0.6) beat state 1 (0.2)
    w[2, idx["dil_conv_3x3"]], w[3, idx["max_pool_3x3"]], w[4, idx["sep_conv_5x5"]] = 0.6, 0.2, 0.8
    # node 4 (edges 5-8): edge 8 has the two best ops
    w[8, idx["dil_conv_5x5"]], w[8, idx["avg_pool_3x3"]], w[6, idx["skip_connect"]] = 0.7, 0.65, 0.3
    # node 5 (edges 9-13): tie 0.5 / 0.5 on states 1 and 3 goes to the lower index
    w[10, idx["sep_conv_3x3"]], w[12, idx["skip_connect"]] = 0.5, 0.5
    g = gdas.derive_genotype(w, w)
    assert g.normal == [("sep_conv_3x3", 0), ("max_pool_3x3", 1), ("sep_conv_5x5", 2), ("dil_conv_3x3", 0),
                        ("dil_conv_5x5", 3), ("skip_connect", 1), ("sep_conv_3x3", 1), ("skip_connect", 3)]
    assert g.reduce == g.normal and g.normal_concat == g.reduce_concat == [2, 3, 4, 5]
    p = gdas.derive_genotype(w, w, rule="pairs")  # AutoDL: the two best (op, input) pairs, any inputs
    assert p.normal == [("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_5x5", 2), ("dil_conv_3x3", 0),
                        ("dil_conv_5x5", 3), ("avg_pool_3x3", 3), ("sep_conv_3x3", 1), ("skip_connect", 3)]
    assert g.normal == darts.derive_genotype(w, w).normal  # the DARTS rule is DARTS's rule
    assert gdas.derive_genotype(w, None).reduce == []  # FRC


def test_published_gdas_v1_has_the_papers_parameter_count():
    """Reference number: GDAS_V1 at C=36, 20 cells (2019 train-cifar.sh) is the paper's 3.4M
    (3.37M here, auxiliary head excluded)."""
    net = common.NetworkCIFAR(36, 10, 20, True, common.GENOTYPES["GDAS_V1"])
    assert common.count_parameters(net) == pytest.approx(3.37, abs=0.01)


# paper-scale comparison, run alone: PYTHONPATH=.:tests python tests/test_gdas.py cuda 16 8 64 32
if __name__ == "__main__":
    device, C, layers, batch, size = sys.argv[1], *map(int, sys.argv[2:6])
    for module in (darts, gdas):
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t, ops, mem = step_cost(module, C, layers, batch, size, repeats=10, device=device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
        print(f"{module.__name__:5s} C={C} cells={layers} batch={batch} {size}x{size} {device}: {t * 1e3:.1f} ms/step "
              f"(min of 10), {ops} op calls/forward, {mem / 2**30:.3f} GiB saved for backward, "
              f"peak CUDA memory {peak:.2f} GiB")


# ----------------------------------------------------------------------------------------
# --space nb201: the benchmark's GDAS search (search_model_gdas.py TinyNetworkGDAS)
# ----------------------------------------------------------------------------------------
NB201_TINY = ["--space", "nb201", "--device", "cpu", "--workers", "0", "--dataset", "fake", "--image-size", "8",
              "--epochs", "2", "--batch-size", "8", "--steps-per-epoch", "2", "--init-channels", "4", "--layers", "1",
              "--retrain-epochs", "1", "--retrain-init-channels", "4", "--retrain-layers", "3",
              "--retrain-batch-size", "16"]


def test_nb201_search_looks_up_every_epochs_cell_and_retrains_it_as_the_benchmark_network(tmp_path, nb201_benchmark,
                                                                                           monkeypatch):
    """Also: --channels-last reaches the supernet and the retrained network through common.speed_up, and the
    search history has common.Progress's per-step fields."""
    folder, expected = nb201_benchmark
    seen, speed_up = [], common.speed_up
    monkeypatch.setattr(common, "speed_up", lambda model, args: seen.append((type(model), args.channels_last))
                        or speed_up(model, args))
    results = common.cli(gdas.main, gdas.Args, [*NB201_TINY, "--nb201-benchmark", str(folder), "--channels-last",
                                                "--out-dir", str(tmp_path), "--run-name", "nb"])
    assert seen == [(gdas.NB201Network, True), (common.NB201Network, True)]
    run_dir = tmp_path / "nb"
    record = json.loads((run_dir / "genotype.json").read_text())
    arch = record["arch"]
    assert record == {"space": "nb201", "arch": arch, "nb201_index": common.nb201_index(arch)} == results["genotype"]
    history = read_jsonl(run_dir / "search_history.jsonl")
    assert len(history) == 2 and history[-1]["arch"] == arch
    assert all(len(r["step_seconds"]) == 2 and "peak_gpu_mb" in r for r in history)
    for row in history:  # the benchmark's accuracies of that epoch's derived cell, as GDAS.py line 322 logs them
        assert row["nb201_index"] == common.nb201_index(row["arch"]) and row["nb201"] == expected(row["arch"])
    alphas = read_jsonl(run_dir / "alphas.jsonl")
    w = torch.tensor(alphas[-1]["alpha"]["cell"])
    assert w.shape == (6, 5) and list(alphas[-1]["softmax"]) == ["cell"]
    assert common.nb201_derive(w) == arch  # argmax per edge, 'none' allowed
    ckpt = torch.load(run_dir / "checkpoint_search.pt", weights_only=False)
    assert torch.equal(ckpt["model"]["alphas_cell"], w)
    net = common.NB201Network(arch, 10, 4, 3)  # the retrained network: the benchmark's, at C=4, N=3
    assert results["retrain"]["params_M"] == common.count_parameters(net)
    for name in ("nb201.png", "alphas.png", "alpha_evolution.png", "genotype.png", "retrain_curves.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert [r["tau"] for r in history] == [10.0, pytest.approx(0.1)]


def test_nb201_recipe_fills_only_untyped_flags_and_help_shows_it(capsys):
    args = common.parse_args(gdas.Args, ["--space", "nb201", "--batch-size", "32", "--retrain-epochs", "3"])
    common.apply_recipes(args)
    assert (args.batch_size, args.layers, args.init_channels, args.epochs, args.lr, args.tau_min) == (32, 5, 16, 250,
                                                                                                       0.025, 0.1)
    assert (args.retrain_epochs, args.retrain_batch_size, args.retrain_nesterov, args.retrain_layers) == (3, 256, True,
                                                                                                       5)
    darts_space = common.parse_args(gdas.Args, [])
    common.apply_recipes(darts_space)
    assert (darts_space.batch_size, darts_space.layers, darts_space.retrain_epochs) == (256, 8, 600)
    with pytest.raises(SystemExit):
        common.cli(gdas.main, gdas.Args, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "[--space nb201: 64]" in out and "GDAS.config" in out


def test_nb201_edge_is_the_official_forward_gdas_in_value_and_gradient():
    """search_cells.py forward_gdas: sum_k (h^k O^k(x) if k = k* else h^k). Value h^{k*} O^{k*}(x) (= O^{k*}(x));
    dL/dh^{k*} = <g, O^{k*}(x)>, dL/dh^k = sum(g) for the others (the broadcast value-0 scalars)."""
    torch.manual_seed(0)
    edge = gdas.NB201Edge(3, True).double().train()
    x, g = torch.randn(2, 3, 5, 5, dtype=torch.double), torch.randn(2, 3, 5, 5, dtype=torch.double)
    for k in range(5):
        alpha = torch.randn(5, dtype=torch.double, requires_grad=True)
        h = F.one_hot(torch.tensor(k), 5).double() - F.softmax(alpha, -1).detach() + F.softmax(alpha, -1)
        h.retain_grad()
        calls = []
        hooks = [op.register_forward_hook(lambda m, i, o, j=j: calls.append(j)) for j, op in enumerate(edge.ops)]
        out = edge(x, h, k)
        for hook in hooks:
            hook.remove()
        assert calls == [k]  # only the sampled op runs
        with torch.no_grad():
            ref = edge.ops[k](x)
        assert torch.allclose(out, ref)
        (out * g).sum().backward()
        want = torch.full((5,), g.sum().item(), dtype=torch.double)
        want[k] = (g * ref).sum()
        assert torch.allclose(h.grad, want)


def test_nb201_supernet_has_the_official_size_and_one_sample_for_all_cells():
    """TinyNetworkGDAS(C=16, N=5, 4 nodes, 10 classes, NAS-Bench-201 ops, affine False): 1692826 weights
    (xautodl 1.0.0 get_weights(), the same modules as TinyNetworkDarts, tests/test_nb201.py) and one (6, 5) alpha."""
    net = gdas.NB201Network(16, 10, 5)
    assert sum(p.numel() for p in net.weight_parameters()) == 1692826
    assert [tuple(a.shape) for a in net.arch_parameters()] == [(6, 5)]
    small = gdas.NB201Network(4, 10, 2).train()
    ran = []
    for cell in small.cells:
        if isinstance(cell, gdas.NB201SearchCell):
            for e, edge in enumerate(cell.edges):
                for k, op in enumerate(edge.ops):
                    op.register_forward_hook(lambda m, i, o, e=e, k=k: ran.append((e, k)))
    small.tau = 1.0
    assert small(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert sorted(ran) == sorted((e, k) for e, k in enumerate(small.last_index) for _ in range(6))  # 6 cells


@pytest.mark.parametrize("flags,needle", [
    (["--space", "nb201", "--genotype", "DARTS_V2"], "a NAS-Bench-201 arch string needs --space nb201"),
    (["--genotype", "|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|"], "needs --space nb201"),
    (["--nb201-benchmark", "x.pth"], "--nb201-benchmark looks up NAS-Bench-201 cells: it needs --space nb201"),
    (["--space", "nb201", "--frc"], "NAS-Bench-201 has none"),
    (["--space", "nb201", "--genotype", "|nor_conv_3x3~0|+|none~0|"], "expected 3 nodes"),
    (["--layers", "2"], "--layers must be >=3, got 2"),
])
def test_bad_nb201_flags_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as exit_info:
        common.cli(gdas.main, gdas.Args, [*TINY, "--out-dir", str(tmp_path / "runs"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------
# --dataset imagenet: GDAS's own retraining recipe (Args.IMAGENET); --channels-last / --compile reach the search
# ----------------------------------------------------------------------------------------
def test_imagenet_recipe_is_autodls_and_typed_flags_win(capsys):
    args = common.parse_args(gdas.Args, ["--dataset", "imagenet", "--retrain-batch-size", "64"])
    common.apply_recipes(args)
    assert (args.retrain_batch_size, args.retrain_init_channels, args.retrain_layers, args.retrain_epochs) == (64, 50,
                                                                                                            14, 250)
    assert (args.retrain_warmup_epochs, args.retrain_nesterov, args.retrain_grad_clip, args.aux_batchnorm) == (5, True,
                                                                                                            0.0, True)
    assert (args.retrain_weight_decay, args.label_smoothing, args.retrain_schedule) == (3e-5, 0.1, "cosine")
    # the schedule it gives: warm-up 0.02 .. 0.1 over 5 epochs, then the cosine
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], args.retrain_lr)
    sched, lrs = common.retrain_scheduler(opt, args), []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lrs[5:] == pytest.approx([0.05 * (1 + np.cos(np.pi * e / 250)) for e in (5, 6)])
    with pytest.raises(SystemExit):
        common.cli(gdas.main, gdas.Args, ["--help"])
    assert "[--dataset imagenet: 50]" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_nb201_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    """The NB-201 search resumes bit for bit (alphas_cell, optimisers, RNG, the zero-filled .grad of Deviation 12)."""
    flags = [*NB201_TINY, "--epochs", "3"]
    ref = run_script("gdas.py", *flags, "--out-dir", tmp_path, "--run-name", "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    run_dir = kill_resume_and_compare("gdas.py", flags, tmp_path, tmp_path / "ref", kill_in_retrain=False)
    arch = json.loads((run_dir / "genotype.json").read_text())["arch"]
    assert read_jsonl(run_dir / "search_history.jsonl")[-1]["arch"] == arch
