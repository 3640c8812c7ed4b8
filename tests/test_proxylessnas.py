"""proxylessnas.py: Eq. (4) against autograd of the relaxed mixture, the two-path rescaling against a replay of
the official rule, the latency loss and E[LAT], the released networks' parameter and multiply-add counts (no
training), bad inputs, an end-to-end digits run with an accuracy bar and SIGKILL + resume."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common
import proxylessnas as P
from conftest import kill_resume_and_compare, read_jsonl

TINY = ["--device", "cpu", "--workers", "0", "--init-channels", "8", "--layers", "2", "--batch-size", "16",
        "--steps-per-epoch", "4", "--arch-update-every", "2", "--warmup-epochs", "1", "--epochs", "2",
        "--latency-repeats", "2", "--retrain-epochs", "1", "--retrain-batch-size", "32"]


# ----------------------------------------------------------------------------------- Eq. (4)
def relaxed_grad(alpha, outs, c, idx):
    """d/dalpha of L = <c, sum_j p_j o_j>, p = softmax(alpha[idx]): the relaxed mixture, by autograd."""
    a = alpha.clone().requires_grad_()
    p = F.softmax(a[idx], 0)
    loss = (c * sum(pj * outs[j] for pj, j in zip(p, idx))).sum()
    return torch.autograd.grad(loss, a)[0]


@pytest.mark.parametrize("involved", [[0, 1, 2, 3, 4, 5, 6], [4, 1]])
def test_eq4_equals_the_relaxed_gradient_when_the_loss_is_linear_in_the_mixture(involved):
    """With L linear in m, dL/dg_j = <c, o_j> wherever the gates are, so Eq. (4) must be the exact gradient of the
    relaxed mixture (over all paths, or over the two sampled ones with p renormalised)."""
    torch.manual_seed(0)
    alpha, outs, c = torch.randn(7), torch.randn(7, 5), torch.randn(5)
    gate_grad = outs @ c  # dL/dg_j
    got = P.binary_alpha_grad(alpha, gate_grad, involved)
    want = relaxed_grad(alpha, outs, c, involved)
    assert torch.allclose(got, want, atol=1e-6)
    assert got[[j for j in range(7) if j not in involved]].abs().sum() == 0


def test_gate_gradients_of_the_supernet_are_the_official_inner_products():
    """Through SuperNet.layer, dL/dg_k = sum(dL/dout * o_k(x)) for every involved path, the active one and the
    detached one (official full_v2 backward, mix_op.py lines 128-139), and only the active path gets weight grads."""
    torch.manual_seed(0)
    net = P.SuperNet(P.search_space(SimpleNamespace(init_channels=8, layers=2)), 10, True)
    x = torch.randn(2, 8, 4, 4)
    i = next(k for k, (c_in, c_out, s, _) in enumerate(net.plan) if c_in == 8 and c_out == 8 and s == 1)
    active, involved = 2, [2, 5]
    gates = torch.zeros(len(net.choices[i])).index_fill_(0, torch.tensor([active]), 1.0).requires_grad_()
    out = net.layer(i, x, active, gates, involved)
    c = torch.randn_like(out)
    (out * c).sum().backward()
    for k in involved:
        assert torch.allclose(gates.grad[k], (c * net.layers[i][k](x)).sum(), rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in net.layers[i][active].parameters())
    assert all(p.grad is None for p in net.layers[i][5].parameters())


def test_rescaling_is_the_official_rule_and_keeps_the_unsampled_probabilities():
    torch.manual_seed(1)
    old = torch.randn(7)
    new = old.clone()
    involved = [3, 0]
    new[involved] += torch.tensor([0.3, -0.1])  # an Adam step on the two sampled alphas
    got = new.clone()
    P.rescale_alphas(got, old, involved)
    # mix_op.py lines 243-252, replayed: offset = log(sum exp(new) / sum exp(old)) over the involved paths
    offset = math.log(sum(math.exp(new[i]) for i in involved) / sum(math.exp(old[i]) for i in involved))
    want = new.clone()
    want[involved] -= offset
    assert torch.allclose(got, want, atol=1e-6)
    p_old, p_new = F.softmax(old, 0), F.softmax(got, 0)
    rest = [j for j in range(7) if j not in involved]
    assert torch.allclose(p_old[rest], p_new[rest], atol=1e-7)
    assert not torch.allclose(p_old[involved], p_new[involved])


def test_two_path_sampling_draws_distinct_paths_and_the_active_one_first():
    torch.manual_seed(0)
    alpha = torch.tensor([2.0, 0.0, 0.0, -1.0])
    counts = torch.zeros(4)
    for _ in range(2000):
        active, involved = P.sample_two(alpha)
        assert involved[0] == active and involved[0] != involved[1]
        counts[active] += 1
    assert counts.argmax() == 0 and counts[0] / 2000 > F.softmax(alpha, 0)[0]  # the pair's renormalised p favours it


# ----------------------------------------------------------------------------------- latency
def test_latency_loss_and_expected_latency_formulas():
    table = {"fixed": 100.0, "layers": [[10.0, 20.0, 0.0], [30.0, 50.0]]}
    probs = [torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.1, 0.9])]
    lat = P.expected_latency(probs, table)
    assert lat.item() == pytest.approx(100 + 5 + 5 + 0 + 3 + 45)
    ce, lat = torch.tensor(1.7), torch.tensor(158.0, requires_grad=True)
    loss = P.latency_loss(ce, lat, 120.0, "mul_log", 0.2, 0.3)
    assert loss.item() == pytest.approx(0.2 * 1.7 * (math.log(158) / math.log(120)) ** 0.3)
    loss.backward()  # d/dLAT = a CE beta (log LAT / log T)^(beta-1) / (LAT log T)
    want = 0.2 * 1.7 * 0.3 * (math.log(158) / math.log(120)) ** (0.3 - 1) / (158 * math.log(120))
    assert lat.grad.item() == pytest.approx(want, rel=1e-5)
    assert P.latency_loss(ce, lat, 120.0, "add_linear", lam=0.1).item() == pytest.approx(1.7 + 0.1 * 38 / 120)
    assert P.latency_loss(ce, lat, 120.0, "none").item() == pytest.approx(1.7)


def test_measured_table_has_one_time_per_candidate_and_zero_for_zero():
    net = P.SuperNet(P.search_space(SimpleNamespace(init_channels=8, layers=2)), 10, True)
    table = P.measure_latency_table(net, 8, torch.device("cpu"), repeats=1)
    assert [len(r) for r in table["layers"]] == [len(c) for c in net.choices]
    for row, names in zip(table["layers"], net.choices):
        assert all((t == 0) == (n == P.ZERO) for t, n in zip(row, names))
    assert table["fixed"] > 0 and table["unit"] == "us"


# ----------------------------------------------------------------------------------- published networks
@pytest.mark.parametrize("name,params_M,macs_M", [("proxyless_gpu", 7.12, 465.3), ("proxyless_cpu", 4.36, 439.2),
                                                  ("proxyless_mobile", 4.08, 320.4)])
def test_published_networks_match_the_official_counts(name, params_M, macs_M):
    """Official logs/imagenet_*_log.txt: 'Total training params' and 'Total FLOPs' (conv + linear MACs)."""
    net = P.published_network(name)
    assert common.count_parameters(net) == pytest.approx(params_M, rel=0.015)
    assert common.count_macs(net, 224) == pytest.approx(macs_M, rel=0.015)
    assert P.validate_genotype(P.PUBLISHED[name])


# ----------------------------------------------------------------------------------- bad inputs
BAD = [
    (["--genotype", "proxyless_gpx"], "unknown genotype 'proxyless_gpx'"),
    (["--genotype", "[\"3x3_MBConv3\""], "malformed genotype literal"),
    (["--genotype", "[\"3x3_MBConv3\"]"], "11 searchable layers need 11 ops, got 1"),
    (["--genotype", json.dumps(["zero"] + ["3x3_MBConv3"] * 10)], "layer 0 op 'zero' is not allowed"),
    (["--genotype", json.dumps(["9x9_MBConv3"] * 11)], "layer 0 op '9x9_MBConv3' is not allowed"),
    (["--genotype", "{\"ops\": []}"], "a ProxylessNAS genotype is a dict"),
    (["--latency-table", "/nonexistent.json"], "--latency-table /nonexistent.json: no such file"),
    (["--latency-table", "{tmp}/bad.json"], "not a latency.json of this file"),
    (["--target-latency", "0.5"], "--target-latency must be 0 or >1"),
    (["--grad-estimator", "reinforc"], "did you mean 'reinforce'"),
    (["--binary-mode", "full_v2"], "unknown --binary-mode 'full_v2'"),
    (["--layers", "0"], "--layers must be >=1"),
    (["--arch-update-every", "0"], "--arch-update-every must be >=1"),
    (["--genotype", "proxyless_cpu", "--no-retrain"], "nothing to do"),
]


@pytest.mark.parametrize("flags,needle", BAD, ids=[" ".join(f)[:40] for f, _ in BAD])
def test_bad_input_is_one_line(flags, needle, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{}")
    argv = [*TINY, "--dataset", "fake", "--out-dir", str(tmp_path / "runs"), *[f.replace("{tmp}", str(tmp_path)) for f in flags]]
    with pytest.raises(SystemExit) as e:
        common.cli(P.main, P.Args, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_fake_search_writes_its_files_and_refuses_its_table_for_another_space(tmp_path, capsys):
    """In-process (seconds): a search on fake data, its rows, alphas, table and genotype; then its latency.json
    given to a run with another space: one line, exit 2, no run folder."""
    flags = [*TINY, "--dataset", "fake", "--image-size", "8", "--no-retrain", "--out-dir", str(tmp_path)]
    common.cli(P.main, P.Args, [*flags, "--run-name", "a"])
    run_dir = tmp_path / "a"
    with pytest.raises(SystemExit) as e:
        common.cli(P.main, P.Args, [*flags, "--layers", "1", "--latency-table", str(run_dir / "latency.json"),
                                    "--run-name", "b"])
    assert e.value.code == 2 and "measured for another space" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # the first run's files and numbers
    rows = read_jsonl(run_dir / "search_history.jsonl")
    assert [r["phase"] for r in rows] == ["warmup", "search", "search"]
    assert [r["arch_steps"] for r in rows] == [0, 0, 2]  # no architecture step in the first search epoch
    alphas = read_jsonl(run_dir / "alphas.jsonl")
    assert alphas[0]["alpha"] == alphas[1]["alpha"] != alphas[2]["alpha"]
    table = json.loads((run_dir / "latency.json").read_text())
    genotype = json.loads((run_dir / "genotype.json").read_text())
    assert P.validate_genotype(genotype)["ops"] == rows[-1]["genotype"]
    paths = [table["choices"][i].index(op) for i, op in enumerate(genotype["ops"])]
    assert rows[-1]["derived_latency_us"] == pytest.approx(P.path_latency(paths, table))


# ----------------------------------------------------------------------------------- end to end
def test_reinforce_gradient_is_the_closed_form_score_function():
    """REINFORCE: alpha.grad = mean_m (R_m - b) grad(-log p(g_m)), grad_alpha log p_j = e_j - p (closed form),
    replayed with the same seed; the first baseline is the mean reward (nas_manager.py lines 520-531)."""
    torch.manual_seed(0)
    net = P.SuperNet(P.search_space(SimpleNamespace(init_channels=8, layers=1)), 10, True)
    table = {"fixed": 50.0, "layers": [[10.0 * (j + 1) for j in range(len(c))] for c in net.choices]}
    args = SimpleNamespace(rl_batch_size=4, rl_tradeoff=0.1, rl_baseline_decay=0.99, latency_loss="mul_log")
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    optimizer = torch.optim.SGD(net.alphas, lr=0.0)
    torch.manual_seed(1)
    state = {}
    mean, b = P.reinforce_arch_step(net, x, y, optimizer, table, 200.0, args, state)
    torch.manual_seed(1)
    samples = []
    for _ in range(4):
        paths = net.sample_paths()
        acc = P._accuracy(net, x, y, paths) / 100
        samples.append((paths, acc * (200.0 / P.path_latency(paths, table)) ** 0.1))
    assert b == pytest.approx(mean) and mean == pytest.approx(sum(r for _, r in samples) / 4)
    for i, a in enumerate(net.alphas):
        p = F.softmax(a.detach(), 0)
        want = sum((r - b) * (p - F.one_hot(torch.tensor(paths[i]), len(p))) for paths, r in samples) / 4
        assert torch.allclose(a.grad, want, atol=1e-6)


@pytest.mark.slow
def test_digits_search_and_retraining_clear_an_accuracy_bar(run):
    proc, run_dir = run("proxylessnas.py", *TINY, "--dataset", "digits", "--steps-per-epoch", "0", "--batch-size", "32",
                        "--grad-clip", "5", "--retrain-epochs", "4", "--retrain-lr", "0.05", "--retrain-batch-size",
                        "64", "--no-cutout", name="digits")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["search"]["grad_estimator"] == "binary" and results["search"]["epochs"] == 3
    assert results["retrain"]["test_acc"] > 60.0, results["retrain"]
    assert (run_dir / "latency.json").exists() and (run_dir / "alphas.png").exists()


@pytest.mark.slow
def test_sigkill_and_resume_give_the_uninterrupted_run(run, tmp_path):
    flags = [*TINY, "--dataset", "fake", "--image-size", "8", "--epochs", "3"]
    proc, ref = run("proxylessnas.py", *flags, name="ref")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the same measured table for both runs, or their E[LAT] would differ by the timing noise
    kill_resume_and_compare("proxylessnas.py", [*flags, "--latency-table", ref / "latency.json"], tmp_path, ref)


def test_reproduce_samples_valid_uniform_networks(tmp_path):
    """reproduce.py --random-cells: one candidate per searchable layer uniformly, 'zero' only where allowed; the
    written genotype.json is what --genotype reads."""
    import random

    import reproduce

    args = P.Args(init_channels=8, layers=2)
    space = P.search_space(args)
    counts = {}
    for i in range(600):
        g = reproduce.SAMPLERS[reproduce.METHODS["proxylessnas"]](random.Random(i), args)
        common.write_json(tmp_path / "g.json", g)
        assert P.parse_genotype(str(tmp_path / "g.json"), space) == g
        counts[g["ops"][1]] = counts.get(g["ops"][1], 0) + 1  # layer 1 allows zero (stride 1, same width)
    assert set(counts) == set(P.CANDIDATES + [P.ZERO]) and max(abs(n / 600 - 1 / 7) for n in counts.values()) < 0.05
