"""DARTS: Differentiable Architecture Search.

Hanxiao Liu, Karen Simonyan, Yiming Yang. ICLR 2019. arXiv:1806.09055 (v2),
https://arxiv.org/abs/1806.09055. Official code: quark0/darts @ f276dd3 (cnn/), checked against
architect.py, model_search.py, train_search.py, train.py.

Also, as options of this file (neither paper released code; the paper is the reference):
    Amended-DARTS: Kaifeng Bi, Changping Hu, Lingxi Xie, Xin Chen, Longhui Wei, Qi Tian.
        "Stabilizing DARTS with Amended Gradient Estimation on Architectural Parameters",
        arXiv:1910.11831, https://arxiv.org/abs/1910.11831                       (--amended)
    DARTS+: Hanwen Liang, Shifeng Zhang, Jiacheng Sun, Xingqiu He, Weiran Huang, Kechen Zhuang,
        Zhenguo Li. "DARTS+: Improved Differentiable Architecture Search with Early Stopping",
        arXiv:1909.06035, https://arxiv.org/abs/1909.06035                     (--early-stop)

Reproduce the paper (search, derive the cell, retrain 600 epochs, test on CIFAR-10):
    python darts.py                     # first order ("DARTS_V1")
    python darts.py --unrolled          # second order ("DARTS_V2")
    python darts.py --genotype DARTS_V2 # retrain the published cell only
    python darts.py --amended           # Amended-DARTS gradient, DARTS search space and defaults
    python darts.py --early-stop        # DARTS+: first-order DARTS that stops at criterion 1 or 2
    python darts.py --space nb201       # NAS-Bench-201 ("DARTS-V1" of the benchmark paper; add --unrolled for V2)

NAS-Bench-201 (Dong & Yang, ICLR 2020, arXiv:2001.00326), --space nb201: the same mixed op (Eq. 2) and
architecture steps on the benchmark's cell (4 nodes, 6 edges, 5 ops, 'none' allowed in the derived cell)
in its macro network, one alpha of shape (6, 5) shared by every cell (xautodl search_model_darts.py
TinyNetworkDarts). Defaults then follow the benchmark's DARTS protocol (Args.NB201; D-X-Y/AutoDL-Projects
@ f46486e configs/nas-benchmark/algos/DARTS.config and scripts-search/NAS-Bench-201-algos/DARTS-V1.sh,
DARTS-V2.sh); the derived cell is retrained with the benchmark's 200-epoch recipe or, with
--nb201-benchmark, looked up every epoch. --amended applies unchanged (its estimator is space-free);
--early-stop (DARTS+) is refused: its criteria are defined on the DARTS normal cell's 8 kept edges.

Equations implemented (numbers of arXiv v2, also used in notebooks/darts.ipynb):
    Eq. (1)  x_j = sum_{i<j} o_bar^(i,j)(x_i)                          -> SearchCell.forward
    Eq. (2)  o_bar(x) = sum_o softmax(alpha)_o * o(x)                    -> MixedOp.forward
    Eq. (3)-(4) bilevel: min_alpha L_val(w*(alpha)), w* = argmin_w L_train -> search_epoch
    Eq. (5)  grad_alpha L_val(w*) ~ grad_alpha L_val(w - xi grad_w L_train(w))  -> unrolled_arch_grad
    Eq. (6)  = grad_alpha L_val(w') - xi grad2_{alpha,w} L_train(w) grad_w' L_val(w')  -> unrolled_arch_grad
    Eq. (7)  grad2_{alpha,w} L_train v ~ [grad_alpha L_train(w+) - grad_alpha L_train(w-)] / (2 eps),
             w+- = w +- eps v, eps = 0.01 / ||v||                      -> finite_difference_hvp
    first order (xi = 0): grad_alpha L_val(w, alpha)                   -> first_order_arch_grad
    Sec. 2.4 derived cell: top-2 incoming edges by strongest non-zero op -> derive_genotype
    Amended-DARTS: g2' = -eta (d2 L_train / dalpha dw) H (dL_val/dw), H = d2 L_train / dw2
                                                                       -> amended_arch_grad
    DARTS+ criteria 1 (>= 2 skip-connects in the normal cell) and 2 (stable ranking of the
    learnable ops' alphas)                                              -> darts_plus_stop

Deviations from the paper (each is what the official code does, unless marked "ours"):
    1. alpha is initialised as 1e-3 * N(0, 1) (paper: zeros).
    2. The search lr anneals by cosine to 0.001, not to zero (train_search.py --learning_rate_min).
    3. The unrolled step of Eq. (5) is the real SGD step, w' = w - xi (mu m + grad_w L_train + lambda w),
       with the momentum buffer m (mu = 0.9) and weight decay lambda = 3e-4 (architect.py); the paper
       writes w - xi grad_w L_train. Neither extra term depends on alpha, so Eq. (6)-(7) are unchanged.
    4. ours: xi is the lr in use and the scheduler steps at the end of each epoch. The official code
       steps it first (epoch 0 trains at eta(1)) and passes scheduler.get_lr(), which on
       PyTorch >= 1.4 is not the lr in use (train_search.py lines 109-110, architect.py).
    5. ours: each epoch walks the shuffled val half once (one val batch per train batch); the
       official code calls next(iter(valid_queue)) every step, a fresh shuffle each time
       (sampling with replacement, and slow on modern PyTorch).
    6. ours: alpha are nn.Parameters, so they are in every checkpoint (official: plain tensors).
    7. ours: the unrolled model w' is evaluated with torch.func.functional_call instead of a
       deep copy (model.new() + load_state_dict); BN uses batch statistics either way and the
       copy's running statistics are thrown away, as in the official code.
    8. Retraining uses auxiliary towers and cutout by default, as the paper does; the official
       train.py flags are off unless passed (README passes them).
    9. ours: --amp (bfloat16 autocast, CUDA only) speeds up weight steps and retraining; the
       second-order step always runs in float32 because Eq. (7) divides by a small eps.
   10. ours: --hessian-eigenvalue logs the dominant eigenvalue of grad2_alpha L_val per epoch
       (RobustDARTS, Zela et al., ICLR 2020), a diagnostic that is not part of DARTS.
   11. Amended-DARTS, ours where the paper is silent or was not readable here: the amending
       coefficient eta (default 0.1, the value of AdversarialNAS's configs, the only public code
       credited to the submission); search space, schedule and all other search settings are
       DARTS's; the paper's "unified" search/retrain hyper-parameters are not applied. g2' is
       computed exactly by double backward by default (--amended-hvp fd gives AdversarialNAS's
       two nested central differences, r = 0.01 each).
   12. Amended-DARTS: with A = d2 L_train / dw dalpha, <g2', g2> = eta v' H A A' H^-1 v, which is
       >= 0 when, e.g., H and A A' commute, but not sign-definite in general. We
       implement the estimator; notebooks/darts.ipynb measures how often the claim holds.
   13. DARTS+, ours where the paper is silent or unverified: criterion 2 compares, on every edge
       of both cells, the order of the four learnable ops (sep_conv_*, dil_conv_*) by alpha;
       neither criterion is checked before --stop-min-epochs (10), since early near-uniform
       alphas give random cells with >= 2 skip-connects about a third of the time; the cell of
       the stopping epoch is retrained with the DARTS recipe (the paper's own, reportedly
       longer, retraining is not reproduced).
   14. ours: the searched cell is derived after the last epoch; train_search.py logs model.genotype() at
       the start of each epoch (lines 113-114), so its last logged cell is the one before epoch 49 trains.
   15. --space nb201, ours: the cosine lr steps once per epoch; the benchmark's scripts anneal it every
       step (DARTS-V1.py line 46, scheduler.update(None, step / len(loader))).
   16. --space nb201, ours: first order takes the arch step before the weight step, as darts.py does in
       the DARTS space; the benchmark's DARTS-V1.py does the weight step first (lines 52-73). Its
       DARTS-V2.py has our order (lines 142-167).
   17. --space nb201: gradient clipping (5) covers the weights only; the benchmark clips
       network.parameters() (DARTS-V1.py line 58, DARTS-V2.py line 166), which includes alpha's
       gradient of the weight step's train loss (unused: a_optimizer zeroes it before its own step).
   18. --space nb201, ours: the weights / alpha split is darts.py's 50/50 cut of the training set by
       index; the benchmark uses its fixed random halves of CIFAR-10 train (configs/nas-benchmark/
       cifar-split.txt) and, for CIFAR-100 / ImageNet16-120, halves of their test sets.
   Plus the deviations shared by every method file, listed in common.py's docstring (C1-C5).

Runs: --resume RUN_DIR continues a killed run; under torchrun only retraining is distributed
(README.md, "Resume a killed run" and "Several GPUs").
"""

import dataclasses
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import common
from common import OPS, PRIMITIVES, Genotype, UsageError, arg


# =====================================================================================
# Args
# =====================================================================================
@dataclasses.dataclass
class Args(common.BaseArgs):
    exp_name: str = arg("darts", "name of the method; prefix of the run folder", "run")
    # Algorithm specific arguments (quark0/darts cnn/train_search.py defaults)
    epochs: int = arg(50, "train_search.py --epochs 50", check=">=1")
    batch_size: int = arg(64, "train_search.py --batch_size 64 (train and val streams)", check=">=2")
    lr: float = arg(0.025, "train_search.py --learning_rate 0.025 (weights, SGD)", check=">0")
    lr_min: float = arg(0.001, "train_search.py --learning_rate_min 0.001 (cosine floor)", check=">=0")
    momentum: float = arg(0.9, "train_search.py --momentum 0.9", check="[0,1)")
    nesterov: bool = arg(False, "Nesterov momentum for the weights (train_search.py: off; NAS-Bench-201's "
                         "DARTS.config line 10: on)")
    weight_decay: float = arg(3e-4, "train_search.py --weight_decay 3e-4", check=">=0")
    init_channels: int = arg(16, "train_search.py --init_channels 16", check=">=1")
    layers: int = arg(8, "train_search.py --layers 8 (cells in the supernet; at least 3, or there is no normal "
                      "cell and alphas_normal gets no gradient); --space nb201: N, search cells per stage (>=1)",
                      check=">=1")
    grad_clip: float = arg(5.0, "train_search.py --grad_clip 5 (weights only); 0 = no clipping", check=">=0")
    train_portion: float = arg(0.5, "train_search.py --train_portion 0.5 (weights / alpha split)", check="(0,1)")
    unrolled: bool = arg(False, "second order, Eq. (6)-(7) (train_search.py --unrolled)")
    arch_lr: float = arg(3e-4, "train_search.py --arch_learning_rate 3e-4 (Adam)", check=">0",
                         aliases=("--arch-learning-rate",))
    arch_weight_decay: float = arg(1e-3, "train_search.py --arch_weight_decay 1e-3", check=">=0")
    fd_r: float = arg(0.01, "Eq. (7): eps = fd_r / ||v|| (architect.py r=1e-2)", check=">0")
    # Amended-DARTS (Bi et al., arXiv:1910.11831): no official code, see Deviations 11-12
    amended: bool = arg(False, "Amended-DARTS architecture gradient g1 + g2' (instead of first/second order)")
    amending_coef: float = arg(0.1, "Amended-DARTS eta; not stated in what we could read, 0.1 as in "
                               "AdversarialNAS's configs (ours)", check=">=0")
    amended_hvp: str = arg("exact", "exact (double backward) | fd (nested finite differences, as the only "
                           "public implementation, AdversarialNAS architect.py)", check=("exact", "fd"))
    # DARTS+ (Liang et al., arXiv:1909.06035): no official code, see Deviation 13
    early_stop: bool = arg(False, "DARTS+ early stopping: criterion 1 or 2, whichever fires first")
    stop_skip: int = arg(2, "DARTS+ criterion 1: stop when the normal cell has this many skip-connects",
                         check=">=0")
    stable_epochs: int = arg(10, "DARTS+ criterion 2: stop when the ranking of the learnable ops' alphas "
                             "has not changed for this many epochs", check=">=1")
    stop_min_epochs: int = arg(10, "ours: check the criteria from this epoch on (early cells are random)",
                               check=">=0")
    hessian_eigenvalue: bool = arg(False, "ours: log the dominant eigenvalue of the val-loss Hessian in "
                                   "alpha per epoch (RobustDARTS collapse signal) and plot it")
    eigen_batches: int = arg(2, "ours: val batches the eigenvalue is computed on", check=">=1")
    # NAS-Bench-201 (issue 15)
    space: str = arg("darts", "darts | nb201: the NAS-Bench-201 cell (4 nodes, 6 edges, 5 ops) in the benchmark's "
                     "macro network; defaults then follow configs/nas-benchmark/algos/DARTS.config and "
                     "scripts-search/NAS-Bench-201-algos/DARTS-V1.sh (see [--space nb201: ...])",
                     check=("darts", "nb201"))
    nb201_benchmark: str = arg("", common.NB201_BENCHMARK_HELP)
    track_running_stats: bool = arg(True, "--space nb201: BN running statistics in the search cells (the "
                                    "benchmark's DARTS-V1.sh / DARTS-V2.sh BN argument; docs/NAS-Bench-201.md "
                                    "lines 227-228 run them with 1); --no-track-running-stats uses batch "
                                    "statistics in evaluation too")

    # The benchmark's DARTS protocol (D-X-Y/AutoDL-Projects @ f46486e). configs/nas-benchmark/algos/DARTS.config
    # (used by DARTS-V1.sh and DARTS-V2.sh, line 39): cosine lr 0.025 -> eta_min 0.001 (lines 2-4), 50 epochs
    # (line 5), SGD decay 5e-4, momentum 0.9, Nesterov (lines 7-10), batch 64 (line 12). DARTS-V1.sh lines
    # 20-21, 42: C=16, N=5, arch Adam lr 3e-4, wd 1e-3 (betas (0.5, 0.999): DARTS-V1.py / DARTS-V2.py
    # a_optimizer); grad clip 5 (DARTS-V1.py --gradient_clip default, line 383; DARTS-V2.py line 166).
    NB201 = {"epochs": 50, "batch_size": 64, "lr": 0.025, "lr_min": 0.001, "momentum": 0.9, "nesterov": True,
             "weight_decay": 5e-4, "init_channels": 16, "layers": 5, "grad_clip": 5.0, "arch_lr": 3e-4,
             "arch_weight_decay": 1e-3}


# =====================================================================================
# Search space: mixed op, search cell, supernet
# =====================================================================================
class MixedOp(nn.Module):
    """All candidate ops on one edge; search ops have affine=False and pools get a BN (official). With
    space="nb201" the ops are NB-201's five at C -> C, pools without a BN (search_cells.py NAS201SearchCell)."""

    def __init__(self, C, stride, space="darts", track_running_stats=True):
        super().__init__()
        self.ops = nn.ModuleList()
        if space == "nb201":
            self.ops.extend(common.NB201_OPS[name](C, C, stride, False, track_running_stats)
                            for name in common.NB201_PRIMITIVES)
            return
        for name in PRIMITIVES:
            op = OPS[name](C, stride, False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self.ops.append(op)

    def forward(self, x, weights):  # weights: (n_ops,) = softmax(alpha^(i,j))
        # ALGO LOGIC: Eq. (2): o_bar(x) = sum_o softmax(alpha)_o * o(x)
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.preprocess0, self.preprocess1 = common.cell_preprocess(C_prev_prev, C_prev, C, reduction_prev,
                                                                    affine=False)
        # edge order: node 0 <- states 0,1; node 1 <- 0,1,2; ... (2+3+4+5 = 14 edges for 4 steps)
        self.edges = nn.ModuleList(MixedOp(C, 2 if reduction and j < 2 else 1)
                                   for i in range(steps) for j in range(2 + i))

    def forward(self, s0, s1, weights):  # weights: (n_edges, n_ops)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            # ALGO LOGIC: Eq. (1): x_j = sum_{i<j} o_bar^(i,j)(x_i)
            node = sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self.multiplier:], dim=1)  # (B, multiplier*C, H, W)


class Network(nn.Module):
    """The DARTS supernet: stem, `layers` search cells (all normal cells share alphas_normal,
    all reduction cells alphas_reduce), global pool, linear."""

    def __init__(self, C, num_classes, layers, steps=4, multiplier=4, stem_multiplier=3):
        super().__init__()
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in common.reduction_layers(layers)
            C_curr = C_curr * 2 if reduction else C_curr
            self.cells.append(SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.classifier = nn.Linear(C_prev, num_classes)
        n_edges = sum(2 + i for i in range(steps))
        # Deviation 1: official init 1e-3 * N(0, 1); the paper says zeros
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, len(PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, len(PRIMITIVES)))

    def forward(self, x):
        w_normal = F.softmax(self.alphas_normal, dim=-1)
        w_reduce = F.softmax(self.alphas_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))

    def arch_parameters(self):
        return [self.alphas_normal, self.alphas_reduce]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("alphas_")]

    def genotype(self):
        return derive_genotype(F.softmax(self.alphas_normal, -1), F.softmax(self.alphas_reduce, -1))


class NB201SearchCell(nn.Module):
    """The NAS-Bench-201 search cell: node i = sum_{j<i} o_bar^(i,j)(node j) over common.NB201_EDGES,
    output node 3 (Eq. (1) on the benchmark's DAG)."""

    def __init__(self, C, track_running_stats=True):
        super().__init__()
        self.edges = nn.ModuleList(MixedOp(C, 1, "nb201", track_running_stats) for _ in common.NB201_EDGES)

    def forward(self, x, weights):  # x: (B, C, H, W), weights: (6, 5)
        nodes = [x]
        for i in range(1, common.NB201_NODES):
            # ALGO LOGIC: Eq. (1): x_i = sum_{j<i} o_bar^(i,j)(x_j)
            nodes.append(sum(self.edges[e](nodes[j], weights[e]) for e, (to, j) in enumerate(common.NB201_EDGES)
                             if to == i))
        return nodes[-1]


class NB201Network(nn.Module):
    """The DARTS supernet in the NAS-Bench-201 space (search_model_darts.py TinyNetworkDarts): stem, 3 stages
    of N search cells at C, 2C, 4C with a residual block between stages, BN-ReLU, pool, linear; one
    alpha (6, 5) shared by all cells (no normal / reduce split)."""

    def __init__(self, C, num_classes, N, track_running_stats=True):
        super().__init__()
        self.stem = common.nb201_stem(C)
        self.cells = nn.ModuleList(NB201SearchCell(c_in, track_running_stats) if kind == "cell"
                                   else common.NB201ResNetBlock(c_in, c_out) for kind, c_in, c_out in common.nb201_layout(C, N))
        self.lastact = common.nb201_lastact(4 * C)
        self.classifier = nn.Linear(4 * C, num_classes)
        # Deviation 1: 1e-3 * N(0, 1), as search_model_darts.py line 61
        self.alphas = nn.Parameter(1e-3 * torch.randn(len(common.NB201_EDGES), len(common.NB201_PRIMITIVES)))

    def forward(self, x):
        w = F.softmax(self.alphas, dim=-1)  # (6, 5)
        h = self.stem(x)
        for cell in self.cells:
            h = cell(h, w) if isinstance(cell, NB201SearchCell) else cell(h)
        return self.classifier(F.adaptive_avg_pool2d(self.lastact(h), 1).flatten(1))  # (B, num_classes)

    def arch_parameters(self):
        return [self.alphas]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if n != "alphas"]

    def genotype(self):
        return common.nb201_derive(F.softmax(self.alphas, -1))  # argmax per edge, 'none' allowed


def softmax_alphas(model):
    """{"normal": (14, 8), "reduce": (14, 8)} or, in the NB-201 space, {"cell": (6, 5)}: softmax(alpha) as lists."""
    if isinstance(model, NB201Network):
        return {"cell": F.softmax(model.alphas, -1).tolist()}
    return {"normal": F.softmax(model.alphas_normal, -1).tolist(), "reduce": F.softmax(model.alphas_reduce, -1).tolist()}


def raw_alphas(model):
    names = ["cell"] if isinstance(model, NB201Network) else ["normal", "reduce"]
    return dict(zip(names, (a.detach().cpu() for a in model.arch_parameters())))


# =====================================================================================
# Architecture update rule
# =====================================================================================
def first_order_arch_grad(model, x_val, y_val):
    """First order (xi = 0): grad_alpha L_val(w, alpha) at the current weights."""
    loss = F.cross_entropy(model(x_val), y_val)
    return list(torch.autograd.grad(loss, model.arch_parameters())), loss.detach()


def finite_difference_hvp(train_loss, weights, alphas, v, r=0.01):
    """Eq. (7): grad2_{alpha,w} L_train(w, alpha) . v
         ~ [grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)] / (2 eps),
       w+- = w +- eps v, eps = r / ||v||_2. Costs two forward-backward passes instead of
       |alpha| x |w| memory. train_loss() evaluates L_train at the weights as they are now;
       the weights are restored exactly (up to float rounding) before returning. Passing the
       weights themselves as `alphas` gives the Hessian-vector product H v in w instead."""
    eps = r / torch.cat([x.flatten() for x in v]).norm()
    with torch.no_grad():
        for w, d in zip(weights, v):
            w.add_(d, alpha=eps)  # w+ = w + eps v
    g_pos = torch.autograd.grad(train_loss(), alphas)
    with torch.no_grad():
        for w, d in zip(weights, v):
            w.sub_(d, alpha=2 * eps)  # w- = w - eps v
    g_neg = torch.autograd.grad(train_loss(), alphas)
    with torch.no_grad():
        for w, d in zip(weights, v):
            w.add_(d, alpha=eps)  # back to w
    return [(p - n) / (2 * eps) for p, n in zip(g_pos, g_neg)]


def unrolled_arch_grad(model, w_optimizer, xi, x_train, y_train, x_val, y_val, r=0.01):
    """Second order, Eq. (5)-(7), as quark0/darts architect.py computes it:
        w'   = w - xi (mu m + grad_w L_train(w) + lambda w)        (Deviation 3)
        grad = grad_alpha L_val(w', alpha) - xi [grad2_{alpha,w} L_train(w, alpha)] grad_w' L_val(w', alpha)
    with the mixed second derivative from finite_difference_hvp on the same train batch."""
    alphas = model.arch_parameters()
    arch_ids = {id(a) for a in alphas}
    named_w = [(n, p) for n, p in model.named_parameters() if id(p) not in arch_ids]
    weights = [p for _, p in named_w]
    group = w_optimizer.param_groups[0]
    mu, wd = group.get("momentum", 0.0), group.get("weight_decay", 0.0)

    def train_loss():
        return F.cross_entropy(model(x_train), y_train)

    grads = torch.autograd.grad(train_loss(), weights)
    w_prime = {}
    with torch.no_grad():
        for (name, w), g in zip(named_w, grads):
            m = w_optimizer.state.get(w, {}).get("momentum_buffer")  # zeros before the first SGD step
            step = g + wd * w + (mu * m if m is not None else 0.0)
            # ALGO LOGIC: Eq. (5): w' = w - xi * (mu m + grad_w L_train + lambda w)
            w_prime[name] = (w - xi * step).requires_grad_()
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # the copy's BN stats are discarded
    val_loss = F.cross_entropy(functional_call(model, {**w_prime, **buffers}, (x_val,)), y_val)
    g_all = torch.autograd.grad(val_loss, alphas + list(w_prime.values()))
    d_alpha, v = g_all[:len(alphas)], g_all[len(alphas):]  # grad_alpha L_val(w'), v = grad_w' L_val(w')
    hvp = finite_difference_hvp(train_loss, weights, alphas, v, r)
    # ALGO LOGIC: Eq. (6): grad_alpha L_val(w', alpha) - xi * grad2_{alpha,w} L_train(w, alpha) . v
    return [da - xi * h for da, h in zip(d_alpha, hvp)], val_loss.detach()


def amended_arch_grad(model, eta, x_train, y_train, x_val, y_val, hvp="exact", r=0.01):
    """Amended-DARTS, all at the current weights w (no unrolled step), H = d2 L_train / dw2:
        g1  = dL_val/dalpha,   v = dL_val/dw
        g2' = -eta * (d2 L_train / dalpha dw) . H . v        (replaces DARTS's -xi (...) v)
    The true second term is g2 = -(d2 L_train / dalpha dw) . H^-1 . v at the inner optimum;
    the paper argues <g2', g2> >= 0 (notebooks/darts.ipynb checks when it holds). hvp="exact"
    uses double backward; "fd" nests two central differences (H v, then the mixed term)."""
    alphas = model.arch_parameters()
    arch_ids = {id(a) for a in alphas}
    weights = [p for p in model.parameters() if id(p) not in arch_ids]
    val_loss = F.cross_entropy(model(x_val), y_val)
    g_all = torch.autograd.grad(val_loss, alphas + weights, allow_unused=True)
    g1 = g_all[:len(alphas)]
    v = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, g_all[len(alphas):])]

    def train_loss():
        return F.cross_entropy(model(x_train), y_train)

    if hvp == "exact":
        g_w = torch.autograd.grad(train_loss(), weights, create_graph=True)
        u = torch.autograd.grad(g_w, weights, grad_outputs=v, retain_graph=True, allow_unused=True)  # H v
        u = [torch.zeros_like(w) if x is None else x for w, x in zip(weights, u)]
        z = torch.autograd.grad(g_w, alphas, grad_outputs=u)  # (d2 L_train / dalpha dw) . u
    else:
        u = finite_difference_hvp(train_loss, weights, weights, v, r)  # H v
        z = finite_difference_hvp(train_loss, weights, alphas, u, r)
    # ALGO LOGIC: Amended-DARTS: grad = g1 + g2' = g1 - eta (d2 L_train / dalpha dw) H v
    return [a - eta * b for a, b in zip(g1, z)], val_loss.detach()


# =====================================================================================
# Genotype derivation (and DARTS+ early stopping)
# =====================================================================================
def derive_genotype(w_normal, w_reduce, steps=4, multiplier=4):
    """Sec. 2.4: for every intermediate node keep the 2 incoming edges whose strongest non-zero op
    is largest, and on each the argmax op with 'none' excluded (both steps skip 'none'). Ties go
    to the lower index (stable sort), as in the official Network.genotype()."""
    none = PRIMITIVES.index("none")

    def parse(w):  # w: (n_edges, n_ops) softmax weights
        w = w.detach().cpu().clone()
        w[:, none] = -1.0  # 'none' can never win
        gene, start = [], 0
        for i in range(steps):
            rows = w[start:start + i + 2]  # edges into node i, from states 0 .. i+1
            strength = rows.max(dim=1).values.tolist()
            keep = sorted(range(i + 2), key=lambda j: -strength[j])[:2]
            gene += [(PRIMITIVES[int(rows[j].argmax())], j) for j in keep]
            start += i + 2
        return gene

    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=parse(w_normal), normal_concat=concat, reduce=parse(w_reduce), reduce_concat=concat)


LEARNABLE = [k for k, name in enumerate(PRIMITIVES) if "conv" in name]  # sep_conv_*, dil_conv_*


def darts_plus_stop(alpha_history, stop_skip=2, stable_epochs=10, min_epochs=10):
    """DARTS+ early stopping, checked after the last epoch of alpha_history (a list of
    {"normal": (E, n_ops), "reduce": (E, n_ops)} softmax weights, one per epoch). Returns the
    reason to stop, or None.
      criterion 1: the normal cell derived now has >= stop_skip skip-connects;
      criterion 2: on every edge of both cells, the order of the learnable ops by alpha is the
                   same in the last stable_epochs + 1 epochs (unchanged for stable_epochs epochs)."""
    epoch = len(alpha_history) - 1
    if epoch < min_epochs:
        return None
    last = alpha_history[-1]
    genotype = derive_genotype(torch.as_tensor(last["normal"]), torch.as_tensor(last["reduce"]))
    skips = sum(op == "skip_connect" for op, _ in genotype.normal)
    if skips >= stop_skip:
        return f"criterion 1: {skips} skip-connects in the normal cell"
    if len(alpha_history) > stable_epochs:
        def ranking(w):  # (E, n_ops) -> per edge, the learnable ops from strongest to weakest
            return torch.as_tensor(w)[:, LEARNABLE].argsort(dim=1, descending=True, stable=True).tolist()
        recent = [(ranking(a["normal"]), ranking(a["reduce"])) for a in alpha_history[-(stable_epochs + 1):]]
        if all(r == recent[0] for r in recent):
            return f"criterion 2: ranking of the learnable ops unchanged for {stable_epochs} epochs"
    return None


# =====================================================================================
# Search loop
# =====================================================================================
def search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch):
    """One epoch of the alternating bilevel optimisation, Eq. (3)-(4): per train batch, first an
    architecture step on a val batch, then a weight step on the train batch (official order)."""
    model.train()
    steps = min(len(train_data), args.steps_per_epoch or len(train_data))
    progress = common.Progress(log, "search", epoch, steps, args.report_freq, device)
    for step, (x, y) in enumerate(train_data):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x_val, y_val = (t.to(device, non_blocking=True) for t in next(val_iter))
        # ALGO LOGIC: architecture step (Adam on alpha) with the first- or second-order gradient
        if args.unrolled:
            xi = w_optimizer.param_groups[0]["lr"]  # Deviation 4: the lr in use
            grads, _ = unrolled_arch_grad(model, w_optimizer, xi, x, y, x_val, y_val, args.fd_r)
        elif args.amended:
            grads, _ = amended_arch_grad(model, args.amending_coef, x, y, x_val, y_val, args.amended_hvp, args.fd_r)
        else:
            with common.autocast(device, args.amp):
                grads, _ = first_order_arch_grad(model, x_val, y_val)
        for a, g in zip(model.arch_parameters(), grads):
            a.grad = g
        a_optimizer.step()
        # weight step (SGD on w, grad-norm clip 5; alpha are not clipped in DARTS)
        w_optimizer.zero_grad(set_to_none=True)
        with common.autocast(device, args.amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        common.clip_grad(model.weight_parameters(), args.grad_clip)
        w_optimizer.step()
        progress.update(loss.item(), common.accuracy(logits, y))
    return progress.summary()


def val_hessian_eigenvalue(model, val_data, device, n_batches):
    """Dominant eigenvalue of grad2_alpha L_val on the first n_batches of a fresh pass over the val
    half, in train mode like the arch step (BN running statistics are put back afterwards). It
    draws val batches, so later epochs see other batches than a run without the flag."""
    saved = [b.clone() for b in model.buffers()]
    model.train()
    batches = [b for _, b in zip(range(n_batches), val_data)]
    loss = sum(F.cross_entropy(model(x.to(device)), y.to(device)) for x, y in batches) / len(batches)
    eig = common.dominant_eigenvalue(loss, model.arch_parameters())
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)
    return eig


def search(args, device, run_dir, log):
    """Run the search; returns (final genotype, summary). Writes per epoch: search_history.jsonl,
    alphas.jsonl, genotype.json, checkpoint_search.pt; at the end the figures."""
    generator = torch.Generator().manual_seed(args.seed)
    train_set, num_classes, _ = common.load_dataset(args.dataset, args.data, True, args.image_size)
    train_data, val_data = common.search_loaders(train_set, args.batch_size, args.train_portion, generator,
                                                 args.workers)
    nb201 = args.space == "nb201"
    net = NB201Network(args.init_channels, num_classes, args.layers, args.track_running_stats) if nb201 else \
        Network(args.init_channels, num_classes, args.layers)
    model = common.speed_up(net.to(device), args)
    log.info("supernet: %.3f M weights, alphas %s", sum(p.numel() for p in model.weight_parameters()) / 1e6,
             [tuple(a.shape) for a in model.arch_parameters()])
    w_optimizer = torch.optim.SGD(model.weight_parameters(), args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay, nesterov=args.nesterov)
    # architect.py: Adam with betas (0.5, 0.999), weight decay 1e-3
    a_optimizer = torch.optim.Adam(model.arch_parameters(), args.arch_lr, betas=(0.5, 0.999),
                                   weight_decay=args.arch_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_optimizer, args.epochs, eta_min=args.lr_min)
    start = 0
    if args.resume:  # TRY NOT TO MODIFY: continue after the last finished epoch, bit for bit
        start = common.resume_from(run_dir / "checkpoint_search.pt", "darts", generator, model=model,
                                   w_optimizer=w_optimizer, a_optimizer=a_optimizer, scheduler=scheduler)
        log.info("resuming the search at epoch %d", start)
    history = common.keep_jsonl(run_dir / "search_history.jsonl", start)
    alpha_history = [r["softmax"] for r in common.keep_jsonl(run_dir / "alphas.jsonl", start)]
    if history and history[-1].get("early_stop"):
        start = args.epochs  # DARTS+ had already stopped this search
    for epoch in range(start, args.epochs):
        t0 = time.time()
        lr = w_optimizer.param_groups[0]["lr"]
        val_iter = common.forever(val_data)  # one pass of the val half per epoch at the 50/50 split
        train = search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch)
        val_loss, val_acc = common.evaluate(model, val_data, device, args.amp, args.steps_per_epoch)
        scheduler.step()
        if args.hessian_eigenvalue:
            eig = val_hessian_eigenvalue(model, val_data, device, args.eigen_batches)
        genotype = model.genotype()
        weights = softmax_alphas(model)
        alpha_history.append(weights)
        # ALGO LOGIC: DARTS+: stop the search at criterion 1 or 2; this epoch's cell is the result
        stop = darts_plus_stop(alpha_history, args.stop_skip, args.stable_epochs, args.stop_min_epochs) \
            if args.early_stop else None
        row = {"epoch": epoch, "lr": lr, **train, "val_loss": val_loss, "val_acc": val_acc, "seconds": time.time() - t0,
               "genotype": common.genotype_to_dict(genotype), **(common.nb201_epoch_row(args, genotype, log) if nb201 else {})}
        if stop:
            row["early_stop"] = stop
        if args.hessian_eigenvalue:
            row["hessian_eigenvalue"] = eig
            log.info("dominant eigenvalue of the val-loss Hessian in alpha: %.4g", eig)
        history.append(row)
        common.append_jsonl(run_dir / "search_history.jsonl", row)
        common.append_jsonl(run_dir / "alphas.jsonl", {"epoch": epoch, "softmax": weights,
                                                       "alpha": {k: a.tolist() for k, a in raw_alphas(model).items()}})
        common.write_json(run_dir / "genotype.json", common.genotype_to_dict(genotype))
        log.info("search epoch %d lr %.5f train_acc %.2f val_acc %.2f %.1fs", epoch, lr, row["train_acc"], val_acc,
                 row["seconds"])
        log.info("genotype %s", genotype)
        # TRY NOT TO MODIFY: checkpoint with everything needed to resume, alphas included
        common.save_checkpoint(run_dir / "checkpoint_search.pt", {
            **common.make_checkpoint("darts", epoch, args, generator, model=model, w_optimizer=w_optimizer,
                                     a_optimizer=a_optimizer, scheduler=scheduler),
            "alphas": raw_alphas(model),
            "genotype": common.genotype_to_dict(genotype)})
        if stop:
            log.info("DARTS+ early stop at epoch %d, %s", epoch, stop)
            break
    genotype = model.genotype()  # also when a resumed run had nothing left to search
    primitives = common.NB201_PRIMITIVES if nb201 else PRIMITIVES
    common.plot_alphas(alpha_history[-1], run_dir / "alphas.png", primitives=primitives)
    common.plot_alpha_evolution(alpha_history, run_dir / "alpha_evolution.png", primitives=primitives)
    if nb201 and "nb201" in history[-1]:
        common.plot_nb201_history(history, run_dir / "nb201.png")
    common.plot_curves(history, ["train_acc", "val_acc"], run_dir / "search_curves.png", "DARTS search")
    if args.hessian_eigenvalue:
        common.plot_curves(history, ["hessian_eigenvalue"], run_dir / "hessian_eigenvalue.png",
                           "dominant eigenvalue of the val-loss Hessian in alpha", ylabel="eigenvalue")
    summary = {"epochs": len(history), "val_acc": history[-1]["val_acc"], "train_acc": history[-1]["train_acc"],
               "seconds": sum(r["seconds"] for r in history),
               "seconds_per_step": sum(r["seconds_per_step"] for r in history) / len(history),
               "order": "second" if args.unrolled else "amended" if args.amended else "first",
               "early_stop": history[-1].get("early_stop")}
    return genotype, summary


# =====================================================================================
# main: search -> derive -> retrain -> test
# =====================================================================================
def main(args):
    args, device = common.prepare(args, __file__)  # --resume's flags, the device, every flag's range
    if args.unrolled and args.amended:
        raise UsageError("--unrolled (second order) and --amended are two architecture gradients; pick one")
    if args.space == "darts" and args.layers < 3:
        raise UsageError(f"--layers must be >=3, got {args.layers} (the DARTS supernet needs a normal cell)")
    if args.space == "nb201" and args.early_stop:
        raise UsageError("--early-stop (DARTS+) is defined on the DARTS space's normal cell; it has no NAS-Bench-201 "
                         "form: drop --early-stop or --space nb201")
    genotype = common.parse_genotype(args.genotype) if args.genotype else None  # fail before any work
    return common.run(args, __file__, "darts", device, genotype, search)


if __name__ == "__main__":
    common.cli(main, Args)
