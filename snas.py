"""SNAS: Stochastic Neural Architecture Search.

Sirui Xie, Hehui Zheng, Chunxiao Liu, Liang Lin. ICLR 2019. arXiv:1812.09926 (v3),
https://arxiv.org/abs/1812.09926. Official code: SNAS-Series/SNAS-Series @ 9a43adb (SNAS/), checked against
train_search.py, model_search.py, operations.py, utils.py, genotypes.py, model_edge_all.py, train_edge_all.py.

Reproduce the paper (the README's single-GPU search command, then its retraining of the derived cell):
    python snas.py                                  # 150 epochs, 8 cells, resource constraint as in the README
    python snas.py --seed 6                         # ... and its seed (our default 2 is train_search.py's)
    python snas.py --resource-lambda 0              # SNAS without the resource constraint
    python snas.py --genotype SNAS_mild_edge_all    # retrain a published cell only (also _moderate, _aggressive)
    python snas.py --space nb201                    # NAS-Bench-201 cell, then the benchmark's 200-epoch training

Equations implemented (numbers of arXiv v3 as reconstructed, see Deviation 1; the same in notebooks/snas.ipynb):
    Eq. (1)-(2)  x_j = sum_{i<j} Z_ij^T O_ij(x_i), Z_ij one-hot (relaxed: Eq. (4))   -> MixedOp, SearchCell
    Eq. (3)  min over theta and alpha of E_{Z ~ p_alpha(Z)}[L_theta(Z)]: theta and log alpha get their gradients
             from ONE backward of the same loss on the same training batch (no train/val split)  -> train_step
    Eq. (4)  Z^k = softmax_k((log alpha^k + G^k) / lambda), G^k = -log(-log U^k), U^k ~ U(0, 1)
                                                                        -> gumbel_softmax_sample
    Eq. (5)-(6) search gradient, per edge:
             dL/dlog alpha^k = (1/lambda) Z^k (g^k - sum_m Z^m g^m),  g^m = (dL/dx_j)^T O^m(x_i)
             (autograd computes it in train_step)                       -> search_gradient (tests check both agree)
    Eq. (7)  credit assignment: E_Z[dL/dalpha] = E_Z[grad_alpha log p_alpha(Z) [(dL/dx_j)^T O~_ij(x_i)]_c],
             p_alpha the Concrete density                               -> concrete_log_prob (notebook section 5)
    Eq. (8)-(9) resource constraint E_Z[L_theta(Z) + eta C(Z)], C(Z) = sum_ij Z_ij^T C(O_ij)
                                                                        -> op_costs, resource_penalty
    temperature: linear per epoch from 1 to 0.03 (official code)       -> temperature
    child network: the argmax op of EVERY edge, 'none' included ("edge_all")  -> derive_genotype, edge_all_to_cell

Deviations from the paper (each is what the official code does, unless marked "ours"; files of SNAS-Series/SNAS @
9a43adb):
    1. The paper body was not readable where this file was written (only its abstract, its introduction and
       third-party transcriptions of Eq. (4), Eq. (9) and the results table). Formulas were checked against the
       official code; the equation numbers are our reconstruction of arXiv v3 and may be off by one.
    2. The architecture parameters are log alpha (official normal_log_alpha), initialised N(1, 0.01)
       (--loc_mean 1 --loc_std 0.01, model_search.py lines 167-172); the paper differentiates w.r.t. alpha, which
       adds a factor 1/alpha^k.
    3. Architecture optimiser: the README's single-GPU search uses plain SGD on log alpha, lr 3e-4, no momentum,
       no weight decay (default here; train_search.py lines 268-271); --arch-optimizer adam gives the distributed
       launch's Adam(betas 0.5, 0.999, weight decay 1e-3; lines 254-259). The log-alpha gradient norm is clipped
       at 10, the weights' at 5 (lines 504-505).
    4. Temperature: lambda_e = lambda_0 - (lambda_0 - lambda_min) (e + 1) / E for epoch e = 0..E-1: the official
       scheduler steps before each epoch (train_search.py line 325), so epoch 0 already trains at
       lambda_0 - (lambda_0 - lambda_min) / E and the last at lambda_min. The official code hard-codes E = 150
       whatever --epochs is (utils.py line 144); ours: E = --epochs (equal at the default).
    5. ours: the weight lr scheduler steps at the end of each epoch (as darts.py Deviation 4); train_search.py
       line 323 steps it first, so its epoch 0 trains at eta(1).
    6. Data: weights and log alpha train on the whole training split; the per-epoch search accuracy is measured
       on the test split with a fresh Gumbel sample per batch (official valid_queue is the CIFAR-10 test set,
       train_search.py lines 278, 304); nothing is selected on it. We also log the child network's accuracy
       (one-hot argmax of every edge, official --gen_max_child, model_search.py lines 385-387), the paper's claim
       that the child keeps the search accuracy.
    7. Drop-path 0.3 on every edge output during search (README --drop_path_prob 3e-1; model_search.py
       lines 104-106 test the MixedOp, never an Identity, so no edge is spared).
    8. Resource constraint (README: --method reparametrization --log_penalty --resource_lambda 1.5e-3):
       per-edge costs (#params, FLOPs, memory access) are the official operations.py formulas, each measured at
       the op's input size; per edge (log max(C_size, 1) + log max(C_flops, 1) + log max(C_mac, 1)) / 3
       (model_search.py line 474); normal and reduction sums are averaged over the cells of each kind (official:
       divided by hard-coded 6 and 2, the counts at 8 cells, train_search.py lines 423-430). The paper's eta for
       its mild / moderate / aggressive cells is not in the code or in anything we could read.
       policy_gradient: ours detaches Z in the score function and uses the exact Concrete log-density
       (official logp, model_search.py lines 247-257: Z not detached, Z clamped at 1e-4).
    9. Genotype ("edge_all", official genotype_edge_all, model_search.py lines 726-756, the cells the README
       retrains): every edge keeps its argmax op, 'none' included, so a node can keep 0 to i+2 inputs; DARTS
       keeps the top-2 edges per node with 'none' excluded. ours: edge_all_to_cell writes such a cell exactly in
       the two-inputs-per-node format of common.NetworkCIFAR: a node with m > 2 inputs becomes m - 1 nodes chained
       by skip_connect (identity: no parameters, no drop-path), the helpers left out of the concat; a node with 1
       or 0 inputs is padded with 'none'. For the three published cells (genotypes.py lines 151, 207, 263) this
       gives common.GENOTYPES["SNAS_*"] (aggressive: up to the order of its 'none' pads). --genotype reads an
       edge_all cell by name, as a Genotype(...) literal or as a genotype.json, and converts it the same way.
   10. Retraining: the DARTS protocol of common.retrain, which is train_edge_all.py's; but the official child
       network has an affine BatchNorm after each pooling op (model_edge_all.py line 39 builds the ops with
       affine=True; operations.py lines 24-75), common.NetworkCIFAR has none (2160 parameters fewer for SNAS_mild,
       864 for SNAS_moderate at C=36).
   11. Parameter counts at C=36, 20 cells: SNAS_moderate 2.85 M and SNAS_aggressive 2.31 M match the paper's
       2.8 M and 2.3 M; SNAS_mild gives 2.66 M against the paper's 2.9 M, a gap we cannot explain (the pool BNs
       add 0.002 M, the auxiliary head 0.48 M).
   12. ours: --amp (bfloat16 autocast, CUDA only). Not implemented: --resample_layer, --nsample > 1, the
       auxiliary tower during search, the random-sampling / alternating-update ablations, the resource scheduler.
   13. ours: search_history.jsonl logs each epoch's cell after that epoch; train_search.py logs genotype_edge_all
       before each epoch trains (line 336) and once after the last (line 373), the cell retrained here too.
   14. --space nb201 (ours: SNAS has no NAS-Bench-201 code, and the benchmark paper, arXiv:2001.00326, benchmarks
       ten methods without SNAS; AutoDL-Projects has no SNAS config). So SNAS's own search defaults are kept
       (all the flags above: epochs, lr, temperature, arch SGD, drop-path, resource constraint, no train/val
       split) and only the network is the benchmark's: C=16, N=5 (scripts-search/NAS-Bench-201-algos/GDAS.sh
       lines 20-21, the same in DARTS-V1.sh), its stem, residual blocks and head (common.nb201_layout), the 5
       benchmark ops with affine-free BN (its avg_pool_3x3 has no BN after it, SNAS's pools do), ONE (6, 5)
       log alpha and one sample Z for all 3N cells (there is no reduction cell: --resource-ratio has no
       effect). The resource constraint applies cleanly: each NB-201 op is an op type SNAS's operations.py
       counts (Zero, Identity, AvgPool, ReLUConvBN; nb201_op_costs), every edge at stride 1 on its cell's
       C x H x H input, averaged over the 3N cells. SNAS's child rule (argmax per edge, 'none' included) is the
       benchmark's, so the derived cell is common.nb201_derive's arch string; it is retrained with the
       benchmark's 200-epoch recipe (common.NB201_RETRAIN_ARGS).
   15. --dataset imagenet retrains with SNAS/train_imagenet.py's values (Args.IMAGENET) in common.NetworkImageNet,
       which lacks the affine BN after the pools of SNAS's model.py (Deviation 10; tests/test_imagenet.py);
       its lr steps at the end of each epoch (train_imagenet.py line 190 steps first, as Deviation 5).
   Plus the deviations shared by every method file, listed in common.py's docstring (C1-C5).

Runs: --resume RUN_DIR continues a killed run; under torchrun only retraining is distributed (README.md).
"""

import ast
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import OPS, PRIMITIVES, Genotype, UsageError, arg


# =====================================================================================
# Args
# =====================================================================================
@dataclasses.dataclass
class Args(common.BaseArgs):
    exp_name: str = arg("snas", "name of the method; prefix of the run folder", "run")
    # Algorithm specific arguments (SNAS/train_search.py defaults and the README's single-GPU command)
    epochs: int = arg(150, "README --epochs 150", check=">=1")
    batch_size: int = arg(64, "train_search.py --batch_size 64", check=">=2")
    lr: float = arg(0.025, "train_search.py --learning_rate 0.025 (weights, SGD)", check=">0")
    lr_min: float = arg(0.001, "train_search.py --learning_rate_min 0.001 (cosine floor)", check=">=0")
    momentum: float = arg(0.9, "train_search.py --momentum 0.9", check="[0,1)")
    weight_decay: float = arg(3e-4, "train_search.py --weight_decay 3e-4", check=">=0")
    init_channels: int = arg(16, "README --init_channels 16", check=">=1")
    layers: int = arg(8, "README --layer 8 (cells in the supernet); at least 3, or there is no normal cell "
                      "(reductions sit at layers//3 and 2*layers//3) and log_alpha_normal gets no gradient; "
                      "--space nb201: N, search cells per stage (3N in all)", check=">=1")
    grad_clip: float = arg(5.0, "train_search.py --grad_clip 5 (weights); 0 = no clipping", check=">=0")
    arch_optimizer: str = arg("sgd", "sgd (single-GPU train_search.py: plain SGD on log alpha) | adam (its "
                              "distributed launch: Adam, betas (0.5, 0.999))", check=("sgd", "adam"))
    arch_lr: float = arg(3e-4, "train_search.py --arch_learning_rate 3e-4", check=">0",
                         aliases=("--arch-learning-rate",))
    arch_weight_decay: float = arg(1e-3, "train_search.py --arch_weight_decay 1e-3 (Adam only)", check=">=0")
    arch_grad_clip: float = arg(10.0, "train_search.py line 505 clips the log-alpha gradient norm at 10; "
                                "0 = no clipping", check=">=0")
    loc_mean: float = arg(1.0, "train_search.py --loc_mean 1: log alpha ~ N(loc_mean, loc_std) (any finite number)")
    loc_std: float = arg(0.01, "train_search.py --loc_std 0.01", check=">=0")
    tau_max: float = arg(1.0, "README --temp 1: initial Gumbel-softmax temperature lambda_0", check=">0",
                         aliases=("--temp",))
    tau_min: float = arg(0.03, "README --temp_min 0.03: final temperature (linear per epoch, --temp_annealing); "
                         "at most --tau-max", check=">0", aliases=("--temp-min",))
    search_drop_path_prob: float = arg(0.3, "README --drop_path_prob 3e-1: drop-path on every edge during search",
                                       check="[0,1)")
    resource_lambda: float = arg(1.5e-3, "README --resource_lambda 1.5e-3: eta of Eq. (8); 0 = no constraint",
                                 check=">=0")
    resource_method: str = arg("reparametrization", "README --method: reparametrization | discrete | "
                               "policy_gradient (Deviation 8)",
                               check=("reparametrization", "discrete", "policy_gradient"))
    log_penalty: bool = arg(True, "README --log_penalty: mean of the logs of the 3 costs per edge")
    resource_ratio: float = arg(1.0, "train_search.py --ratio 1: weight of the reduction cells' cost", check=">=0")
    space: str = arg("darts", "darts | nb201: the NAS-Bench-201 cell (4 nodes, 6 edges, 5 ops) in the benchmark's "
                     "macro network; the benchmark has no SNAS protocol: SNAS's own defaults stay, C and N follow "
                     "scripts-search/NAS-Bench-201-algos/*.sh channel 16, num_cells 5 (Deviation 14; see "
                     "[--space nb201: ...])", check=("darts", "nb201"))
    nb201_benchmark: str = arg("", common.NB201_BENCHMARK_HELP)

    # --space nb201 (Deviation 14): the macro network of D-X-Y/AutoDL-Projects @ f46486e
    # scripts-search/NAS-Bench-201-algos/GDAS.sh lines 20-21 (channel=16, num_cells=5; the same in DARTS-V1.sh);
    # the batch (64) is SNAS's and the benchmark's (configs/nas-benchmark/algos/DARTS.config line 12) alike.
    NB201 = {"init_channels": 16, "layers": 5}

    # --dataset imagenet: SNAS-Series SNAS/train_imagenet.py @ 9a43adb, whose values equal DARTS's recipe
    # (common.IMAGENET_RETRAIN_ARGS: 250 epochs, batch 128, lr 0.1, momentum 0.9, wd 3e-5, StepLR(1, 0.97),
    # label smoothing 0.1, clip 5, 14 cells, drop path 0; lines 30-49, 177) except --init_channels 50 (line 38)
    # and --auxiliary, off by default (line 40; the README has no ImageNet command to turn it on); the head has
    # its 768-channel BN when turned on (model.py lines 93-98).
    IMAGENET = {"retrain_init_channels": 50, "auxiliary": False, "aux_batchnorm": True}


# =====================================================================================
# Search space: Gumbel-softmax sample, mixed op, search cell, supernet, costs
# =====================================================================================
def gumbel_softmax_sample(log_alpha, temp, noise=None):
    """Eq. (4): Z = softmax((log alpha + G) / lambda) along the last dim, G = -log(-log U), U ~ U(0, 1);
    a soft (relaxed one-hot) sample, no straight-through. `noise` = G, drawn when not given."""
    if noise is None:
        u = torch.rand_like(log_alpha).clamp_min(torch.finfo(log_alpha.dtype).tiny)
        noise = -torch.log(-torch.log(u))
    # ALGO LOGIC: Eq. (4): Z^k = exp((log alpha^k + G^k) / lambda) / sum_l exp((log alpha^l + G^l) / lambda)
    return F.softmax((log_alpha + noise) / temp, dim=-1)


def concrete_log_prob(log_alpha, log_z, temp):
    """Log-density of the Concrete (Gumbel-softmax) distribution at a sample with log Z = log_z, last dim n:
        log p(Z) = log (n-1)! + (n-1) log lambda + sum_k (log alpha^k - (lambda+1) log Z^k)
                   - n log sum_k alpha^k (Z^k)^(-lambda)
    (Maddison et al. 2017; official model_search.py logp). Its gradient in log alpha is the score function of
    Eq. (7) and of the policy_gradient resource term."""
    n = log_alpha.shape[-1]
    return (math.lgamma(n) + (n - 1) * math.log(temp) + (log_alpha - (temp + 1) * log_z).sum(-1)
            - n * torch.logsumexp(log_alpha - temp * log_z, dim=-1))


class MixedOp(nn.Module):
    """All candidate ops on one edge; search ops have affine=False and pools get a BN (official)."""

    def __init__(self, C, stride):
        super().__init__()
        self.ops = nn.ModuleList()
        for name in PRIMITIVES:
            op = OPS[name](C, stride, False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self.ops.append(op)

    def forward(self, x, weights):  # weights: (n_ops,) = Z_ij, a Gumbel-softmax sample
        # ALGO LOGIC: Eq. (2): O~_ij(x) = Z_ij^T O_ij(x) = sum_k Z^k O^k(x)
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction, self.steps, self.multiplier, self.C = reduction, steps, multiplier, C
        self.kind = "reduce" if reduction else "normal"  # which log alpha it samples from
        self.preprocess0, self.preprocess1 = common.cell_preprocess(C_prev_prev, C_prev, C, reduction_prev,
                                                                    affine=False)
        # edge order: node 0 <- states 0,1; node 1 <- 0,1,2; ... (2+3+4+5 = 14 edges for 4 steps)
        self.edges = nn.ModuleList(MixedOp(C, 2 if reduction and j < 2 else 1)
                                   for i in range(steps) for j in range(2 + i))
        self.input_size, self.node_size, self._costs = None, None, (None, None)  # H of inputs, nodes; cached costs

    def forward(self, s0, s1, weights, drop_prob=0.0):  # weights: (n_edges, n_ops)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        self.input_size = states[1].shape[-1]
        offset = 0
        for _ in range(self.steps):
            node = 0
            for j, h in enumerate(states):
                out = self.edges[offset + j](h, weights[offset + j])
                if self.training and drop_prob > 0:  # Deviation 7: every edge, during search
                    out = common.drop_path(out, drop_prob)
                # ALGO LOGIC: Eq. (1): x_j = sum_{i<j} O~_ij(x_i)
                node = node + out
            offset += len(states)
            states.append(node)
        self.node_size = states[2].shape[-1]  # ceil(H / 2) in a reduction cell
        return torch.cat(states[-self.multiplier:], dim=1)  # (B, multiplier*C, H, W)

    def costs(self, like):
        """(n_edges, n_ops, 3) costs C(O_ij) of Eq. (9) for this cell: #params, FLOPs, memory access, on the
        device and dtype of `like`; computed from the input sizes of the last forward (of the cell's inputs for the
        edges from states 0 and 1, of its nodes for the others), as operations.py measures x.size(), then cached."""
        key = (self.input_size, self.node_size, like.device, like.dtype)
        if self._costs[0] != key:
            rows = []
            for i in range(self.steps):
                for j in range(2 + i):
                    stride = 2 if self.reduction and j < 2 else 1
                    rows.append(op_costs(self.C, stride, self.input_size if j < 2 else self.node_size))
            self._costs = (key, torch.tensor(rows, dtype=like.dtype, device=like.device))
        return self._costs[1]


def op_costs(C, stride, H):
    """(size, FLOPs, MAC) of every candidate op on a C-channel H x H input with the given stride, as SNAS's
    operations.py counts them (y = output size; sizes exclude BN; skip_connect with stride 2 is
    FactorizedReduce(C, C))."""
    y = H if stride == 1 else H // 2
    pool = (0, 9 * y * y * C, (2 if stride == 1 else 5) * y * y * C)
    sep = lambda k: 2 * C * k * k + 2 * C * C  # two depthwise k x k + two 1x1
    dil = lambda k: C * k * k + C * C  # one depthwise k x k + one 1x1
    conv = lambda size, a, b: (size, size * y * y, y * y * ((a if stride == 1 else b) * C + C) + size)
    costs = {"none": (0, 0, 0), "max_pool_3x3": pool, "avg_pool_3x3": pool,
             "skip_connect": (0, 0, 2 * C * H * H) if stride == 1 else
             (C * (C // 2) * 2, C * (C // 2) * 2 * y * y, 2 * y * y * (4 * C + C // 2) + C * (C // 2) * 2),
             "sep_conv_3x3": conv(sep(3), 7, 10), "sep_conv_5x5": conv(sep(5), 7, 10),
             "dil_conv_3x3": conv(dil(3), 3, 6), "dil_conv_5x5": conv(dil(5), 3, 6)}
    return [costs[name] for name in PRIMITIVES]


class Network(nn.Module):
    """The DARTS supernet with SNAS's stochastic edges: every forward draws one Gumbel-softmax sample Z for all
    normal cells and one for all reduction cells (Eq. (4)) at the current `temperature`. forward returns
    (logits, the weights used), so common.evaluate (which reads out[0]) works on it."""

    def __init__(self, C, num_classes, layers, steps=4, multiplier=4, stem_multiplier=3, loc_mean=1.0,
                 loc_std=0.01, temperature=1.0, drop_path_prob=0.0):
        super().__init__()
        self.temperature, self.drop_path_prob = temperature, drop_path_prob
        self.fixed_weights = None  # set to evaluate one architecture (the child network) instead of sampling
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
        # Deviation 2: log alpha ~ N(loc_mean, loc_std) (softmax is shift invariant; the mean only matters with Adam's
        # weight decay)
        self.log_alpha_normal = nn.Parameter(loc_mean + loc_std * torch.randn(n_edges, len(PRIMITIVES)))
        self.log_alpha_reduce = nn.Parameter(loc_mean + loc_std * torch.randn(n_edges, len(PRIMITIVES)))

    def sample_weights(self):
        return {"normal": gumbel_softmax_sample(self.log_alpha_normal, self.temperature),
                "reduce": gumbel_softmax_sample(self.log_alpha_reduce, self.temperature)}

    def argmax_weights(self):  # the child network: one-hot argmax of every edge, 'none' included
        return {k: F.one_hot(a.detach().argmax(-1), len(PRIMITIVES)).to(a.dtype)
                for k, a in (("normal", self.log_alpha_normal), ("reduce", self.log_alpha_reduce))}

    def forward(self, x, weights=None):
        if weights is None:
            weights = self.fixed_weights if self.fixed_weights is not None else self.sample_weights()
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights[cell.kind], self.drop_path_prob)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1)), weights

    def arch_parameters(self):
        return [self.log_alpha_normal, self.log_alpha_reduce]

    def log_alphas(self):
        return {"normal": self.log_alpha_normal, "reduce": self.log_alpha_reduce}

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("log_alpha_")]

    def probabilities(self):  # p_alpha(Z_ij = one-hot k) = softmax(log alpha_ij)_k
        return {"normal": F.softmax(self.log_alpha_normal, -1), "reduce": F.softmax(self.log_alpha_reduce, -1)}

    def genotype_edge_all(self):
        p = self.probabilities()
        return derive_genotype(p["normal"], p["reduce"])


class NB201MixedOp(nn.Module):
    """The 5 NAS-Bench-201 ops of one edge (common.NB201_OPS: affine-free BN with running statistics, as SNAS's
    search ops; the benchmark's avg_pool_3x3 has no BN after it)."""

    def __init__(self, C):
        super().__init__()
        self.ops = nn.ModuleList(common.NB201_OPS[name](C, C, 1, False, True) for name in common.NB201_PRIMITIVES)

    def forward(self, x, weights):  # weights: (5,) = Z_ij
        # ALGO LOGIC: Eq. (2): O~_ij(x) = sum_k Z^k O^k(x)
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class NB201SearchCell(nn.Module):
    """A NAS-Bench-201 search cell: node i = sum_{j<i} O~_(i,j)(node j) over common.NB201_EDGES, drop-path on
    every edge output during search (Deviation 7)."""

    def __init__(self, C):
        super().__init__()
        self.C, self.kind, self.input_size = C, "cell", None
        self.edges = nn.ModuleList(NB201MixedOp(C) for _ in common.NB201_EDGES)
        self._costs = (None, None)

    def forward(self, x, weights, drop_prob=0.0):  # x: (B, C, H, W), weights: (6, 5)
        self.input_size = x.shape[-1]
        nodes = [x]
        for i in range(1, common.NB201_NODES):
            node = 0
            for e, (to, j) in enumerate(common.NB201_EDGES):
                if to == i:
                    out = self.edges[e](nodes[j], weights[e])
                    if self.training and drop_prob > 0:
                        out = common.drop_path(out, drop_prob)
                    # ALGO LOGIC: Eq. (1): x_i = sum_{j<i} O~_ij(x_j)
                    node = node + out
            nodes.append(node)
        return nodes[-1]  # (B, C, H, W)

    def costs(self, like):
        """(6, 5, 3) costs C(O_ij) of Eq. (9): every edge sees a C x H x H input at stride 1 (nb201_op_costs)."""
        key = (self.input_size, like.device, like.dtype)
        if self._costs[0] != key:
            rows = [nb201_op_costs(self.C, self.input_size)] * len(common.NB201_EDGES)
            self._costs = (key, torch.tensor(rows, dtype=like.dtype, device=like.device))
        return self._costs[1]


def nb201_op_costs(C, H):
    """(size, FLOPs, MAC) of the NB-201 ops on a C-channel H x H input at stride 1 by SNAS's operations.py
    formulas for the same op types: Zero 0; Identity MAC 2 C H^2 (lines 175-187); AvgPool FLOPs 9 H^2 C, MAC
    2 H^2 C (lines 24-48); ReLUConvBN(C, C, k) size C^2 k^2, FLOPs size H^2, MAC H^2 (C + C) + size (78-105)."""
    conv = lambda k: (C * C * k * k, C * C * k * k * H * H, H * H * 2 * C + C * C * k * k)
    costs = {"none": (0, 0, 0), "skip_connect": (0, 0, 2 * C * H * H), "nor_conv_1x1": conv(1),
             "nor_conv_3x3": conv(3), "avg_pool_3x3": (0, 9 * H * H * C, 2 * H * H * C)}
    return [costs[name] for name in common.NB201_PRIMITIVES]


class NB201Network(nn.Module):
    """SNAS in the NAS-Bench-201 space: the benchmark's macro network (common.nb201_layout: stem, N search cells
    at C, 2C, 4C, residual blocks between the stages, BN-ReLU, pool, linear), ONE (6, 5) log alpha and one
    Gumbel-softmax sample Z per forward for all cells. The same interface as Network, with the one kind "cell"."""

    def __init__(self, C, num_classes, N, loc_mean=1.0, loc_std=0.01, temperature=1.0, drop_path_prob=0.0):
        super().__init__()
        self.temperature, self.drop_path_prob, self.fixed_weights = temperature, drop_path_prob, None
        self.stem = common.nb201_stem(C)
        self.cells = nn.ModuleList(NB201SearchCell(c_in) if kind == "cell" else common.NB201ResNetBlock(c_in, c_out)
                                   for kind, c_in, c_out in common.nb201_layout(C, N))
        self.lastact = common.nb201_lastact(4 * C)
        self.classifier = nn.Linear(4 * C, num_classes)
        # Deviation 2: log alpha ~ N(loc_mean, loc_std)
        self.log_alpha_cell = nn.Parameter(loc_mean + loc_std * torch.randn(len(common.NB201_EDGES),
                                                                            len(common.NB201_PRIMITIVES)))

    def sample_weights(self):
        return {"cell": gumbel_softmax_sample(self.log_alpha_cell, self.temperature)}

    def argmax_weights(self):  # the child network: one-hot argmax of every edge, 'none' included
        return {"cell": F.one_hot(self.log_alpha_cell.detach().argmax(-1), len(common.NB201_PRIMITIVES))
                .to(self.log_alpha_cell.dtype)}

    def forward(self, x, weights=None):  # x: (B, 3, H, W)
        if weights is None:
            weights = self.fixed_weights if self.fixed_weights is not None else self.sample_weights()
        h = self.stem(x)
        for cell in self.cells:
            h = cell(h, weights["cell"], self.drop_path_prob) if isinstance(cell, NB201SearchCell) else cell(h)
        return self.classifier(F.adaptive_avg_pool2d(self.lastact(h), 1).flatten(1)), weights  # (B, classes)

    def arch_parameters(self):
        return [self.log_alpha_cell]

    def log_alphas(self):
        return {"cell": self.log_alpha_cell}

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("log_alpha_")]

    def probabilities(self):
        return {"cell": F.softmax(self.log_alpha_cell, -1)}

    def genotype_edge_all(self):  # SNAS's child rule = the benchmark's: argmax per edge, 'none' allowed
        return common.nb201_derive(self.probabilities()["cell"].detach().cpu())


def resource_penalty(model, weights, method="reparametrization", log_penalty=True, ratio=1.0):
    """Eq. (8)-(9): C(Z) = sum_ij C(Z_ij), C(Z_ij) = Z_ij^T C(O_ij) for each of the 3 costs of op_costs, per edge
    either (log max(C_size,1) + log max(C_flops,1) + log max(C_mac,1)) / 3 (log_penalty) or
    0.43 (2 C_size + C_flops / 4000 + C_mac / 100) (official); summed over the edges, averaged over the cells
    of each kind, reduction cells weighted by `ratio`. Z is the sample used in the forward pass
    (reparametrization), softmax(log alpha) (discrete), or the sample as a fixed action whose cost is the
    reward of a score-function estimator (policy_gradient; the value is then a surrogate, not the cost)."""
    alphas = model.log_alphas()  # {"normal", "reduce"}, or {"cell"} in the NAS-Bench-201 space
    cells = [c for c in model.cells if hasattr(c, "costs")]  # search cells (not NB-201's residual blocks)
    counts = {k: max(1, sum(c.kind == k for c in cells)) for k in alphas}
    total = 0.0
    for cell in cells:
        kind = cell.kind
        cost = cell.costs(alphas[kind])  # (E, n_ops, 3)
        z = F.softmax(alphas[kind], -1) if method == "discrete" else weights[kind]
        z = z.detach() if method == "policy_gradient" else z
        r = (z.unsqueeze(-1) * cost).sum(1)  # (E, 3): expected or sampled size, FLOPs, MAC per edge
        if log_penalty:
            per_edge = r.clamp_min(1.0).log().mean(-1)  # official: values below 1 count as 1
        else:
            per_edge = 0.43 * (r * r.new_tensor([2.0, 1 / 4000, 1 / 100])).sum(-1)
        if method == "policy_gradient":
            log_z = z.clamp_min(torch.finfo(z.dtype).tiny).log()
            # ALGO LOGIC: score function: grad E[C] = E[C(Z) grad log p_alpha(Z)], C(Z) held constant
            per_edge = concrete_log_prob(alphas[kind], log_z, model.temperature) * per_edge.detach()
        total = total + per_edge.sum() / counts[kind] * (ratio if kind == "reduce" else 1.0)
    return total


# =====================================================================================
# Architecture update rule: one backward for theta and log alpha, temperature schedule
# =====================================================================================
def temperature(epoch, epochs, tau_max=1.0, tau_min=0.03):
    """Deviation 4: lambda used in `epoch` (0-based): linear from tau_max (lambda_0) to tau_min, reached at the last
    epoch. Official utils.Temp_Scheduler (utils.py lines 128-148): (1 - t/150)(temp - temp_min) + temp_min with
    t = epoch + 1."""
    # ALGO LOGIC: lambda = (1 - (e + 1) / E) (lambda_0 - lambda_min) + lambda_min
    return max(tau_min, (1 - (epoch + 1) / epochs) * (tau_max - tau_min) + tau_min)


def search_gradient(dL_dz, z, temp):
    """Eq. (5)-(6), the search gradient by hand: with g^m = dL/dZ^m = (dL/dx_j)^T O^m(x_i) (the credit of op m on
    this edge) and dZ^m/dlog alpha^k = (1/lambda) Z^m (delta_mk - Z^k),
        dL/dlog alpha^k = (1/lambda) Z^k (g^k - sum_m Z^m g^m).
    Any leading dims (edges) are kept. train_step gets the same numbers from autograd."""
    # ALGO LOGIC: Eq. (6): (1/lambda) Z^k (g^k - sum_m Z^m g^m)
    return z * (dL_dz - (z * dL_dz).sum(-1, keepdim=True)) / temp


def train_step(model, x, y, w_optimizer, a_optimizer, args):
    """Eq. (3): one Gumbel sample Z (Eq. (4)), loss = CE + eta * resource penalty (Eq. (8)), ONE backward; both
    the weights and log alpha step on these gradients, from the same batch (single level, no unrolling).
    Returns (CE loss, logits, penalty), detached."""
    w_optimizer.zero_grad(set_to_none=True)
    a_optimizer.zero_grad(set_to_none=True)
    with common.autocast(x.device, args.amp):
        logits, weights = model(x)
        loss = F.cross_entropy(logits.float(), y)
    penalty = resource_penalty(model, weights, args.resource_method, args.log_penalty, args.resource_ratio)
    # ALGO LOGIC: Eq. (3) + (8): L_theta(Z) + eta C(Z), one backward for theta and log alpha
    (loss + args.resource_lambda * penalty if args.resource_lambda else loss).backward()
    common.clip_grad(model.weight_parameters(), args.grad_clip)
    common.clip_grad(model.arch_parameters(), args.arch_grad_clip)
    w_optimizer.step()
    a_optimizer.step()
    return loss.detach(), logits.detach(), penalty.detach().item()


# =====================================================================================
# Genotype derivation: every edge's argmax ("edge_all"), then the two-inputs-per-node cell
# =====================================================================================
def _edge_all(text):  # "op j, op j; ..." -> per node, the (op, input) list; ";" separates nodes
    return [(op, int(j)) for node in text.split(";") for op, j in (e.split() for e in node.split(","))]


EDGE_ALL = {  # SNAS-Series SNAS/genotypes.py *_edge_all: per node, edges sorted by strength (README retrains these)
    name: Genotype(_edge_all(normal), [2, 3, 4, 5], _edge_all(reduce), [2, 3, 4, 5]) for name, normal, reduce in [
        ("SNAS_mild_edge_all",
         "sep_conv_3x3 0, sep_conv_3x3 1; skip_connect 0, dil_conv_3x3 1, none 2; skip_connect 0, skip_connect 1, "
         "none 3, none 2; skip_connect 0, sep_conv_3x3 1, none 4, none 3, none 2",
         "max_pool_3x3 0, max_pool_3x3 1; none 0, max_pool_3x3 1, skip_connect 2; none 0, max_pool_3x3 1, "
         "skip_connect 2, none 3; max_pool_3x3 0, dil_conv_5x5 2, none 1, none 3, none 4"),
        ("SNAS_moderate_edge_all",
         "dil_conv_5x5 0, skip_connect 1; sep_conv_3x3 0, skip_connect 1, none 2; skip_connect 0, none 3, none 2, "
         "skip_connect 1; sep_conv_3x3 0, dil_conv_5x5 1, none 4, none 3, none 2",
         "max_pool_3x3 0, max_pool_3x3 1; sep_conv_5x5 0, none 2, dil_conv_5x5 1; none 3, none 2, sep_conv_5x5 0, "
         "sep_conv_5x5 1; none 4, none 3, none 2, sep_conv_5x5 0, sep_conv_5x5 1"),
        ("SNAS_aggressive_edge_all",
         "sep_conv_5x5 0, skip_connect 1; skip_connect 0, skip_connect 1, none 2; dil_conv_5x5 1, skip_connect 0, "
         "none 2, none 3; skip_connect 0, dil_conv_5x5 1, none 2, none 3, none 4",
         "sep_conv_5x5 0, none 1; sep_conv_5x5 0, none 1, none 2; none 0, none 1, none 2, none 3; none 0, none 1, "
         "none 2, none 3, none 4")]}


def derive_genotype(w_normal, w_reduce, steps=4, multiplier=4):
    """The child network of SNAS (official genotype_edge_all): on EVERY edge the argmax op, 'none' included
    (ties to the lower index); per node the entries are sorted by their max probability (stable). Returns the
    14-entry-per-cell "edge_all" Genotype; edge_all_to_cell turns it into a retrainable cell."""
    def parse(w):  # w: (n_edges, n_ops) probabilities
        w = w.detach().cpu()
        gene, start = [], 0
        for i in range(steps):
            rows = w[start:start + i + 2]  # edges into node i, from states 0 .. i+1
            strength = rows.max(dim=1).values.tolist()
            gene += [(PRIMITIVES[int(rows[j].argmax())], j) for j in sorted(range(i + 2), key=lambda j: -strength[j])]
            start += i + 2
        return gene

    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=parse(w_normal), normal_concat=concat, reduce=parse(w_reduce), reduce_concat=concat)


def edge_all_to_cell(g, steps=4):
    """Deviation 9: the same network in common.NetworkCIFAR's format (two inputs per node). Per node, the edges
    whose op is not 'none': two -> as they are; one -> plus ('none', j) of its first 'none' edge; none -> the
    first two ('none', j); m > 2 -> m - 1 nodes, each adding one more edge to the previous one through
    ('skip_connect', previous), only the last kept in the concat. Inputs are renumbered."""
    def convert(edges, concat):
        where, out, start = {0: 0, 1: 1}, [], 0  # where[state of g] = state of the new cell
        for i in range(steps):
            node = edges[start:start + i + 2]
            start += i + 2
            kept = [(op, where[j]) for op, j in node if op != "none"]
            kept += [("none", where[j]) for op, j in node if op == "none"][:max(0, 2 - len(kept))]
            out += kept[:2]
            for edge in kept[2:]:  # chain: new state = previous state (identity) + one more edge
                out += [("skip_connect", len(out) // 2 + 1), edge]
            where[i + 2] = len(out) // 2 + 1
        return out, [where[c] for c in concat]

    normal, normal_concat = convert(g.normal, g.normal_concat)
    reduce, reduce_concat = convert(g.reduce, g.reduce_concat)
    return common.validate_genotype(Genotype(normal, normal_concat, reduce, reduce_concat), "edge_all cell")


def _read_genotype(text):
    """The Genotype that a --genotype literal or genotype.json holds, read without common's checks (they reject the
    edge_all form); None where it cannot be read, and common.parse_genotype then names the problem."""
    try:
        if not text.startswith("Genotype(") and (text.endswith(".json") or Path(text).is_file()):
            d = json.loads(Path(text).read_text())
            fields = d.get("genotype", d)
        elif text.startswith("Genotype("):
            fields = {k.arg: common._literal(k.value) for k in ast.parse(text, mode="eval").body.keywords}
        else:
            return None
        return Genotype(*[fields[k] for k in Genotype._fields])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SyntaxError):
        return None


def _is_edge_all(edges):
    try:
        return common.is_edge_all([tuple(e) for e in edges])
    except (TypeError, ValueError):  # not a list of (op, input) pairs: common.validate_genotype says why
        return False


def parse_genotype(text):
    """--genotype: a published edge_all name (EDGE_ALL) or an edge_all cell given as a Genotype(...) literal or a
    genotype.json (read as edge_all and converted by edge_all_to_cell), else anything common.parse_genotype reads
    (it rejects the edge_all form; its suggestions for an unknown name include EDGE_ALL)."""
    text = text.strip()
    if text in EDGE_ALL:
        return edge_all_to_cell(EDGE_ALL[text])
    g = _read_genotype(text)
    if g is None or not (_is_edge_all(g.normal) or _is_edge_all(g.reduce)):
        return common.parse_genotype(text, more_names=EDGE_ALL)
    what = "genotype literal" if text.startswith("Genotype(") else text
    for cell, concat in (("normal", g.normal_concat), ("reduce", g.reduce_concat)):
        edges = getattr(g, cell)
        if not _is_edge_all(edges):
            raise UsageError(f"{what}: one cell is in the edge_all form (14 edges, node k reads every earlier state) "
                             f"and the {cell} cell is not; give both cells in one form")
        for k, (op, _) in enumerate(edges):
            if not isinstance(op, str) or op not in OPS:
                raise UsageError(f"{what}: {cell}[{k}] has unknown op {op!r}; known: {', '.join(OPS)}")
        if not isinstance(concat, (list, tuple)) or not concat or \
                any(not isinstance(c, int) or not 0 <= c < 6 for c in concat):
            raise UsageError(f"{what}: {cell}_concat {concat!r} names states that do not exist (0..5)")
    return edge_all_to_cell(Genotype([tuple(e) for e in g.normal], list(g.normal_concat),
                                     [tuple(e) for e in g.reduce], list(g.reduce_concat)))


# =====================================================================================
# Search loop
# =====================================================================================
def search_epoch(model, train_data, w_optimizer, a_optimizer, device, args, log, epoch):
    """One epoch of Eq. (3): per training batch one train_step (weights and log alpha together). Returns
    common.Progress's summary (train loss and accuracy, seconds per step, peak GPU memory) and the mean penalty."""
    model.train()
    steps = min(len(train_data), args.steps_per_epoch or len(train_data))
    progress = common.Progress(log, "search", epoch, steps, args.report_freq, device)
    pen_sum = 0.0
    for step, (x, y) in enumerate(train_data):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, logits, penalty = train_step(model, x, y, w_optimizer, a_optimizer, args)
        pen_sum += penalty
        progress.update(loss.item(), common.accuracy(logits, y))
    return {**progress.summary(), "resource_penalty": pen_sum / max(len(progress.step_seconds), 1)}


def evaluate_child(model, data, device, amp=False, max_steps=0):
    """Accuracy of the child network: every edge fixed to its argmax op (official --gen_max_child)."""
    model.fixed_weights = model.argmax_weights()
    try:
        return common.evaluate(model, data, device, amp, max_steps)
    finally:
        model.fixed_weights = None


def search(args, device, run_dir, log):
    """Run the search; returns (final cell, summary). Writes per epoch: search_history.jsonl, alphas.jsonl,
    genotype.json, checkpoint_search.pt; at the end the figures."""
    generator = torch.Generator().manual_seed(args.seed)
    train_set, num_classes, _ = common.load_dataset(args.dataset, args.data, True, args.image_size)
    test_set, _, _ = common.load_dataset(args.dataset, args.data, False, args.image_size)
    # Deviation 6: no train/val split; the test split only monitors
    train_data = common.loader(train_set, args.batch_size, True, generator, args.workers)
    val_data = common.loader(test_set, args.batch_size, False, generator, args.workers)
    nb201 = args.space == "nb201"
    net = NB201Network if nb201 else Network
    model = net(args.init_channels, num_classes, args.layers, loc_mean=args.loc_mean, loc_std=args.loc_std,
                drop_path_prob=args.search_drop_path_prob).to(device)
    model = common.speed_up(model, args)  # --channels-last, --compile
    log.info("supernet: %.3f M weights, log alphas %s", sum(p.numel() for p in model.weight_parameters()) / 1e6,
             [tuple(a.shape) for a in model.arch_parameters()])
    w_optimizer = torch.optim.SGD(model.weight_parameters(), args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay)
    if args.arch_optimizer == "adam":  # Deviation 3
        a_optimizer = torch.optim.Adam(model.arch_parameters(), args.arch_lr, betas=(0.5, 0.999),
                                       weight_decay=args.arch_weight_decay)
    else:
        a_optimizer = torch.optim.SGD(model.arch_parameters(), args.arch_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_optimizer, args.epochs, eta_min=args.lr_min)
    start = 0
    if args.resume:  # TRY NOT TO MODIFY: continue after the last finished epoch, bit for bit
        start = common.resume_from(run_dir / "checkpoint_search.pt", "snas", generator, model=model,
                                   w_optimizer=w_optimizer, a_optimizer=a_optimizer, scheduler=scheduler)
        log.info("resuming the search at epoch %d", start)
    history = common.keep_jsonl(run_dir / "search_history.jsonl", start)
    alpha_history = [r["softmax"] for r in common.keep_jsonl(run_dir / "alphas.jsonl", start)]
    for epoch in range(start, args.epochs):
        t0 = time.time()
        lr = w_optimizer.param_groups[0]["lr"]
        # ALGO LOGIC: Deviation 4: linear annealing of the Gumbel-softmax temperature, once per epoch
        model.temperature = temperature(epoch, args.epochs, args.tau_max, args.tau_min)
        train = search_epoch(model, train_data, w_optimizer, a_optimizer, device, args, log, epoch)
        val_loss, val_acc = common.evaluate(model, val_data, device, args.amp, args.steps_per_epoch)
        child_loss, child_acc = evaluate_child(model, val_data, device, args.amp, args.steps_per_epoch)
        scheduler.step()
        edge_all = model.genotype_edge_all()
        genotype = edge_all if nb201 else edge_all_to_cell(edge_all)  # NB-201: the arch string
        weights = {k: w.tolist() for k, w in model.probabilities().items()}
        alpha_history.append(weights)
        row = {"epoch": epoch, "lr": lr, "temperature": model.temperature, **train, "val_loss": val_loss,
               "val_acc": val_acc, "child_val_loss": child_loss, "child_val_acc": child_acc,
               "seconds": time.time() - t0, "genotype": common.genotype_to_dict(genotype),
               "genotype_edge_all": common.genotype_to_dict(edge_all),
               **(common.nb201_epoch_row(args, genotype, log) if nb201 else {})}
        history.append(row)
        common.append_jsonl(run_dir / "search_history.jsonl", row)
        common.append_jsonl(run_dir / "alphas.jsonl", {"epoch": epoch, "temperature": model.temperature,
                                                       "softmax": weights,
                                                       "log_alpha": {k: a.tolist() for k, a in
                                                                     model.log_alphas().items()}})
        common.write_json(run_dir / "genotype.json", common.genotype_to_dict(genotype))
        log.info("search epoch %d lr %.5f temperature %.4f train_acc %.2f val_acc %.2f (child %.2f) %.1fs", epoch,
                 lr, model.temperature, row["train_acc"], val_acc, child_acc, row["seconds"])
        log.info("genotype_edge_all %s", edge_all)
        # TRY NOT TO MODIFY: checkpoint with everything needed to resume, log alphas included
        common.save_checkpoint(run_dir / "checkpoint_search.pt", {
            **common.make_checkpoint("snas", epoch, args, generator, model=model, w_optimizer=w_optimizer,
                                     a_optimizer=a_optimizer, scheduler=scheduler),
            "log_alphas": {k: a.detach().cpu() for k, a in model.log_alphas().items()},
            "temperature": model.temperature, "genotype": common.genotype_to_dict(genotype),
            "genotype_edge_all": common.genotype_to_dict(edge_all)})
    edge_all = model.genotype_edge_all()  # also when a resumed run had nothing left to search
    genotype = edge_all if nb201 else edge_all_to_cell(edge_all)
    primitives = common.NB201_PRIMITIVES if nb201 else PRIMITIVES
    common.plot_alphas(alpha_history[-1], run_dir / "alphas.png", primitives=primitives, title="softmax(log alpha)")
    common.plot_alpha_evolution(alpha_history, run_dir / "alpha_evolution.png", primitives=primitives)
    if nb201 and args.nb201_benchmark:
        common.plot_nb201_history(history, run_dir / "nb201.png")
    common.plot_curves(history, ["train_acc", "val_acc", "child_val_acc"], run_dir / "search_curves.png",
                       "SNAS search (val = test split, sampled Z; child = argmax)")
    common.plot_curves(history, ["temperature"], run_dir / "temperature.png", "Gumbel-softmax temperature",
                       ylabel="lambda")
    common.plot_curves(history, ["resource_penalty"], run_dir / "resource_penalty.png",
                       f"resource penalty C(Z) ({args.resource_method})", ylabel="penalty")
    summary = {"epochs": len(history), "val_acc": history[-1]["val_acc"], "child_val_acc": history[-1]["child_val_acc"],
               "train_acc": history[-1]["train_acc"], "temperature": history[-1]["temperature"],
               "seconds": sum(r["seconds"] for r in history),
               "seconds_per_step": sum(r["seconds_per_step"] for r in history) / len(history),
               "genotype_edge_all": common.genotype_to_dict(edge_all)}
    return genotype, summary


# =====================================================================================
# main: search -> derive -> retrain -> test
# =====================================================================================
def main(args):
    args, device = common.prepare(args, __file__)  # --resume's flags, the device, every flag's range
    if args.tau_min > args.tau_max:
        raise UsageError(f"the temperature anneals from --tau-max (--temp) down to --tau-min (--temp-min): "
                         f"--tau-min {args.tau_min} is above --tau-max {args.tau_max}")
    for name in ("loc_mean", "loc_std"):
        if not math.isfinite(getattr(args, name)):
            raise UsageError(f"{common.flag(name)} must be a finite number, got {getattr(args, name)}")
    if args.space == "darts" and args.layers < 3:
        raise UsageError(f"--layers must be >=3, got {args.layers} (the DARTS space needs a normal cell; N of "
                         "--space nb201 may be smaller)")
    genotype = parse_genotype(args.genotype) if args.genotype else None  # fail before any work
    return common.run(args, __file__, "snas", device, genotype, search)


if __name__ == "__main__":
    common.cli(main, Args)
