"""GDAS: Gradient-based search using Differentiable Architecture Sampler.

Xuanyi Dong, Yi Yang. "Searching for A Robust Neural Architecture in Four GPU Hours". CVPR 2019.
arXiv:1910.04465, https://arxiv.org/abs/1910.04465. Official code: D-X-Y/AutoDL-Projects @ f46486e
(exps/NAS-Bench-201-algos/GDAS.py, xautodl/models/cell_searchs/search_model_gdas_nasnet.py,
search_model_gdas_frc_nasnet.py, search_cells.py, cell_operations.py GDAS_Reduction_Cell,
configs/search-opts/GDAS-NASNet-CIFAR.config, scripts-search/NASNet-space-search-by-GDAS.sh) and the
2019 release @ 17b615e (scripts-cnn/train-cifar.sh, configs/nas-cifar-cos-cut.config).

GDAS is DARTS with one change: instead of the softmax mixture of all ops on an edge, every forward
pass samples ONE op per edge from softmax(A) (Gumbel-max) and evaluates only that op; the sample is
made differentiable in A with the straight-through Gumbel-softmax estimator. Hence the speed and
memory of a single path, and a gradient for A from the validation loss.

Reproduce the paper (search, derive the cell, retrain 600 epochs, test on CIFAR-10):
    python gdas.py                        # GDAS: normal and reduction cells searched ("GDAS_V1")
    python gdas.py --genotype GDAS_V1     # retrain the published cell only
    python gdas.py --frc --no-retrain     # GDAS (FRC): normal cell searched, fixed reduction cell
    python gdas.py --layers 6             # the AutoDL re-implementation's 6-cell supernet (N=2)
    python gdas.py --space nb201          # NAS-Bench-201: the benchmark's GDAS search, then its 200-epoch training
    python gdas.py --space nb201 --nb201-benchmark NAS-Bench-201-v1_1-096897.pth --no-retrain  # look cells up

Equations implemented. The paper's text (arXiv 1910.04465) could not be read here beyond its introduction, so
these numbers are ours (in the order of the paper's Sec. 3); notebooks/gdas.ipynb uses the same ones:
    Eq. (1)  x_j = sum_{i<j} h_{i,j}^{k*} O^{k*}(x_i), one sampled op per edge  -> SearchCell.forward
    Eq. (2)  p_{i,j} = softmax(A_{i,j})                                   -> gumbel_max_sample
    Eq. (3)  k* = argmax_k (log p^k + o^k), o^k = -log(-log u), u ~ U(0, 1) (Gumbel-max) -> gumbel_max_sample
    Eq. (4)  h~ = softmax((log p + o) / tau)       (Gumbel-softmax, for the gradient only) -> gumbel_max_sample
    Eq. (5)  h = one_hot(k*) - stopgrad(h~) + h~   (straight-through: value one-hot, gradient of h~)
                                                                           -> gumbel_max_sample
    Eq. (6)  edge output h^{k*} * O^{k*}(x): only the sampled op is run  -> MixedOp.forward
    Eq. (7)  first-order alternation: w <- SGD(grad_w L_train(w, h)), A <- Adam(grad_A L_val(w, h'))
             with fresh samples h, h' for each step                         -> search_step
    Eq. (8)  tau_e = tau_max - (tau_max - tau_min) * e / (E - 1), linear per epoch, 10 -> 0.1 -> temperature
    derived cell: top-2 incoming edges by strongest non-zero op (DARTS rule)  -> derive_genotype

Deviations from the paper (each is what the official code does, unless marked "ours"; files of AutoDL-Projects
@ f46486e unless another commit is named):
    1. A is initialised as 1e-3 * N(0, 1) (search_model_gdas_nasnet.py lines 80-85).
    2. The search hyper-parameters are those of the official NASNet-space re-implementation
       (configs/search-opts/GDAS-NASNet-CIFAR.config: 250 epochs, batch 256, SGD Nesterov lr 0.025 cosine to 0.001,
       weight decay 5e-4; scripts-search/NASNet-space-search-by-GDAS.sh: Adam 3e-4 / 1e-3 on A, tau 10 -> 0.1), the
       only code-verified values; the paper's own epoch count and batch size could not be checked here. The first
       commit's search script scripts-cnn/DMS-V-Train.sh @ 13e908f used batch 128, lr 0.05, wd 3e-4, tau 10 -> 4.
    3. ours: the supernet is DARTS's: 8 cells with reductions at 1/3 and 2/3, as the search scripts of the first
       commit (13e908f, scripts-cnn/*.sh --layers 8), and global pooling straight after the last cell. The official
       re-implementation builds N+1+(N-1)+1+(N-1) = 6 cells for N=2 (search_model_gdas_nasnet.py lines 35-40; the
       layout of --layers 6 here) and puts BN+ReLU before the pooling (line 77); its maintainer says this 6-cell
       layout is the paper's, which counts a stage's reduction cell among its N cells (AutoDL-Projects issue #60).
    4. The op set is DARTS's operations.py (common.OPS) with BN after the pools as in DARTS's MixedOp. The official
       NASNet space (cell_operations.py DARTS_SPACE, lines 96-105) has the same eight ops, its pools have no BN
       (POOLING, lines 262-285), and its 1x1 convs carry a bias in the search (bias=not affine with affine=False,
       lines 137, 173, 334, 340); each such bias feeds a BatchNorm directly, which removes it: the same function.
    5. ours: the sampled op indices go to the host once per forward (one .tolist() per cell type); the official
       code calls .item() on every edge (search_cells.py line 247: 14 * layers device syncs per forward). Same math.
    6. ours: the grad-norm clip (5) covers the weights only; the official clip_grad_norm_(network.parameters(), 5)
       (exps/NAS-Bench-201-algos/GDAS.py line 54) also counts what A's .grad holds then: the last architecture
       gradient plus this weight step's (A's .grad is zeroed only before the architecture step, line 65).
    7. ours: the search split is the first / second half of the training set by index (DARTS); the official one
       is a fixed random 25K / 25K file (configs/nas-benchmark/cifar-split.txt). Both halves are augmented
       (official). The search lr follows the cosine per epoch, as the official scheduler does: GDAS.py line 43
       updates it every step, but its cosine reads only the epoch (xautodl/procedures/optimizers.py lines 81-96).
    8. val_loss / val_acc in search_history are those of the architecture steps (train-mode BN, a fresh
       sample per batch), as the official code logs them; darts.py instead evaluates its supernet in
       eval mode, whose BN running statistics would here mix many sampled architectures.
    9. Genotype: the DARTS rule (two distinct input edges per node, each with its best non-zero op), as
       the 2019 release's lib/nas/model_search.py (17b615e, lines 138-166). The official re-implementation keeps
       the top-2 (op, input) pairs of each node (search_model_gdas_nasnet.py lines 128-143), which may read one input
       twice (--genotype-rule pairs). Every node of the published GDAS_V1 / GDAS_F1 cells reads two distinct inputs,
       which that rule gives for both cells of GDAS_V1 about one time in six from near-uniform alphas (notebook
       section 6).
   10. --frc (fixed reduction cell, cell_operations.py GDAS_Reduction_Cell, lines 433-549) is search-only here:
       retraining it needs common.NetworkCIFAR to build the fixed cell, which it does not yet. As in the official
       search, its BNs are affine-free and its convs carry a bias (bias=not affine); the 2019 release's
       retraining copy (Transition, lib/nas/construct_utils.py line 99 @ 17b615e) has affine BNs and no bias.
   11. Retraining is common.retrain (DARTS protocol) = the 2019 release's scripts-cnn/train-cifar.sh and
       configs/nas-cifar-cos-cut.config (600 epochs, batch 96, lr 0.025 cosine, wd 3e-4, C=36, 20 cells,
       auxiliary 0.4, drop path 0.2, cutout 16, clip 5) except the lr floor: LR_MIN 1e-4 there, 0 here.
   12. The weight step zero-fills the gradients (GDAS.py line 50, w_optimizer.zero_grad(), which zero-fills on
       the PyTorch 1.x the code was written for, docs/CVPR-2019-GDAS.md line 14; PyTorch 2.0 made set_to_none the
       default). So an op that has run once keeps moving under weight decay and Nesterov momentum in the steps
       where it is not sampled. An op run by an architecture step holds a .grad from then on too (official
       arch_loss.backward(), line 68); ours computes only A's gradient there and gives those weights the zero
       .grad they would hold. Which weights hold a .grad is checkpointed, so a resumed run equals an uninterrupted
       one (an official resume starts without any). ours: --freeze-unsampled uses zero_grad(set_to_none=True):
       an op not sampled in a step does not move at all in that step.
   13. --space nb201 (exps/NAS-Bench-201-algos/GDAS.py, search_model_gdas.py, search_cells.py): one (6, 5) alpha
       for all 3N cells, one sample per forward shared by them, affine-free BN (with running statistics:
       --track-running-stats) in the cells, the residual blocks and stem as the evaluation network's; the
       derived cell is the argmax op per edge, 'none' allowed (genotype(), lines 101-112), written as the arch
       string and its benchmark index, then retrained with the benchmark's 200-epoch recipe
       (common.NB201_RETRAIN_ARGS). The edge is the official NAS201SearchCell.forward_gdas (search_cells.py
       lines 72-86): sum_k (h^k O^k(x) if k = k* else h^k). The unsampled h^k are 0 in value, so the output is
       that of Eq. (6), but each gets the gradient sum(dL/dx_out) (a broadcast scalar), so A's gradient has a
       term the DARTS-space edge (NASNet MixedOp.forward_gdas, line 181) lacks. The weight and architecture steps,
       their order, the clip (Deviation 6) and the zero-filled gradients (Deviation 12) are as in the DARTS space.
       The official alpha is resampled until no inf or nan appears (search_model_gdas.py lines 115-129); ours
       checks the Gumbel draw only (softmax of finite values is finite).
   14. --dataset imagenet retrains with GDAS's own recipe (Args.IMAGENET: AutoDL-Projects' nas-infer-train.sh with
       configs/opts/NAS-IMAGENET.config) in common.NetworkImageNet, whose parameters equal AutoDL's DXYs ImageNet
       network at C=50 (tests/test_imagenet.py), with the BN in the auxiliary head as AutoDL's. Schedule: ours
       (common.retrain_scheduler) warms up at lr0 (e+1)/5 per epoch, then cos(pi e / 250); the official
       (xautodl/procedures/optimizers.py lines 81-107) rises per step (e + i/n)/5, then cos(pi (e-5) / 245), and
       its last 5 epochs run at eta_min 0 (max_epochs = 245 of 250). Augmentation: common's (train_imagenet.py's);
       AutoDL adds Lighting(0.1) PCA noise (xautodl/datasets/get_dataset_with_transform.py line 173).
   Plus the deviations shared by every method file, listed in common.py's docstring (C1-C5).

Runs: --resume RUN_DIR continues a killed run; under torchrun only retraining is distributed
(README.md, "Resume a killed run" and "Several GPUs").
"""

import dataclasses
import time

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
    exp_name: str = arg("gdas", "name of the method; prefix of the run folder", "run")
    # Algorithm specific arguments (AutoDL-Projects NASNet-space GDAS: GDAS-NASNet-CIFAR.config + .sh)
    epochs: int = arg(250, "search-opts/GDAS-NASNet-CIFAR.config epochs 250", check=">=1")
    batch_size: int = arg(256, "search-opts/GDAS-NASNet-CIFAR.config batch_size 256 (train and val streams)",
                          check=">=2")
    lr: float = arg(0.025, "search-opts config LR 0.025 (weights, SGD)", check=">0")
    lr_min: float = arg(0.001, "search-opts config eta_min 0.001 (cosine floor)", check=">=0")
    momentum: float = arg(0.9, "search-opts config momentum 0.9", check="[0,1)")
    nesterov: bool = arg(True, "search-opts config nesterov 1 (needs --momentum > 0)")
    weight_decay: float = arg(5e-4, "search-opts config decay 0.0005", check=">=0")
    init_channels: int = arg(16, "search-archs/GDAS-NASNet-CIFAR.config C 16", check=">=1")
    layers: int = arg(8, "cells in the supernet: DARTS's 8 (the AutoDL N=2 macro has 6: --layers 6); at least 3, "
                      "or there is no normal cell (reductions sit at layers//3 and 2*layers//3) and alphas_normal "
                      "gets no gradient; --space nb201: N, search cells per stage (3N in all)", check=">=1")
    grad_clip: float = arg(5.0, "GDAS.py line 54: clip_grad_norm_(..., 5) (ours: weights only, Deviation 6); "
                           "0 = no clipping", check=">=0")
    train_portion: float = arg(0.5, "weights / alpha split of the training set (cifar-split.txt: 25K / 25K)",
                               check="(0,1)")
    arch_lr: float = arg(3e-4, "NASNet-space-search-by-GDAS.sh --arch_learning_rate 0.0003 (Adam, betas 0.5, 0.999)",
                         check=">0", aliases=("--arch-learning-rate",))
    arch_weight_decay: float = arg(1e-3, "NASNet-space-search-by-GDAS.sh --arch_weight_decay 0.001", check=">=0")
    tau_max: float = arg(10.0, "Eq. (8): NASNet-space-search-by-GDAS.sh --tau_max 10", check=">0")
    tau_min: float = arg(0.1, "Eq. (8): NASNet-space-search-by-GDAS.sh --tau_min 0.1 (at most --tau-max)", check=">0")
    frc: bool = arg(False, "GDAS (FRC): search the normal cell only, fixed reduction cell (search only here)")
    genotype_rule: str = arg("darts", "darts (two distinct inputs per node, 2019 release) | pairs (top-2 "
                             "(op, input) pairs per node, AutoDL re-implementation); --space nb201 has one rule, "
                             "the argmax op per edge", check=("darts", "pairs"))
    space: str = arg("darts", "darts | nb201: the NAS-Bench-201 cell (4 nodes, 6 edges, 5 ops) in the benchmark's "
                     "macro network; defaults then follow configs/nas-benchmark/algos/GDAS.config and "
                     "scripts-search/NAS-Bench-201-algos/GDAS.sh (see [--space nb201: ...])", check=("darts", "nb201"))
    nb201_benchmark: str = arg("", common.NB201_BENCHMARK_HELP)
    track_running_stats: bool = arg(True, "--space nb201: BN running statistics in the search cells (GDAS.sh "
                                    "--track_running_stats, its BN argument; 1 in the benchmark's script of "
                                    "AutoDL-Projects 44a0d51, scripts-search/algos/GDAS.sh line 38)")
    freeze_unsampled: bool = arg(False, "ours: zero_grad(set_to_none=True), so an op not sampled in a step does not "
                                 "move; default: zero-filled gradients, as the official code under PyTorch 1.x, so "
                                 "weight decay and momentum move it (Deviation 12)")

    # --space nb201: the benchmark's GDAS search (AutoDL-Projects @ f46486e). configs/nas-benchmark/algos/
    # GDAS.config: LR 0.025 (line 3), eta_min 0.001 (4), epochs 250 (5), decay 0.0005 (8), momentum 0.9 (9),
    # nesterov 1 (10), batch_size 64 (12); scripts-search/NAS-Bench-201-algos/GDAS.sh: channel 16 (line 20),
    # num_cells 5 (21), tau 10 -> 0.1 (41), arch lr 0.0003 and weight decay 0.001 (42). Only the values that
    # differ from the defaults above are listed.
    NB201 = {"batch_size": 64, "init_channels": 16, "layers": 5}

    # --dataset imagenet: AutoDL-Projects @ f46486e docs/CVPR-2019-GDAS.md line 35 (scripts/nas-infer-train.sh
    # imagenet-1k GDAS_V1 256: batch 256, no cutout, line 31), configs/archs/NAS-IMAGENET-GDAS_V1.config (C 50,
    # N 4 = 14 cells, auxiliary 1, drop_path_prob 0: lines 5-8) and configs/opts/NAS-IMAGENET.config (cosine to
    # eta_min 0, 245 + 5 warm-up epochs, SGD lr 0.1, wd 3e-5, momentum 0.9, Nesterov, label smoothing 0.1,
    # auxiliary weight 0.4: lines 2-13); the procedure clips no gradient (xautodl/procedures/basic_main.py
    # lines 113-115); AutoDL's auxiliary head keeps its 768-channel BN (Deviation 14).
    IMAGENET = {"retrain_epochs": 250, "retrain_warmup_epochs": 5, "retrain_schedule": "cosine",
                "retrain_batch_size": 256, "retrain_lr": 0.1, "retrain_weight_decay": 3e-5, "retrain_momentum": 0.9,
                "retrain_nesterov": True, "label_smoothing": 0.1, "auxiliary": True, "auxiliary_weight": 0.4,
                "aux_batchnorm": True, "drop_path_prob": 0.0, "retrain_grad_clip": 0.0, "retrain_init_channels": 50,
                "retrain_layers": 14, "cutout": False}


# =====================================================================================
# Search space: Gumbel-max sampler, single-path mixed op, search cell, supernet
# =====================================================================================
def gumbel_max_sample(alpha, tau, generator=None):
    """One architecture sample per row of alpha (..., n_ops). Returns (h, index): h has alpha's shape,
    is exactly one_hot(index) in value and carries d softmax((log p + o) / tau) / d alpha backward;
    index (...,) are the sampled ops, distributed as softmax(alpha) whatever tau is."""
    # ALGO LOGIC: Eq. (2): log p = log softmax(A) (official: A.log_softmax(dim=1))
    log_p = F.log_softmax(alpha, dim=-1)
    while True:  # official: re-sample in the (rare) case of an infinite Gumbel draw
        # Eq. (3): o = -log(-log u) = -log(e), e = -log u ~ Exp(1)
        gumbel = -torch.empty_like(log_p).exponential_(generator=generator).log()
        if torch.isfinite(gumbel).all():
            break
    # ALGO LOGIC: Eq. (3): k* = argmax_k (log p^k + o^k)  (Gumbel-max: k* ~ Categorical(p))
    index = (log_p + gumbel).argmax(dim=-1)
    # ALGO LOGIC: Eq. (4): h~ = softmax((log p + o) / tau)
    soft = F.softmax((log_p + gumbel) / tau, dim=-1)
    hard = F.one_hot(index, alpha.shape[-1]).to(soft.dtype)
    # ALGO LOGIC: Eq. (5): h = one_hot(k*) - stopgrad(h~) + h~  (exactly one-hot in value: notebook section 3)
    return hard - soft.detach() + soft, index


def temperature(epoch, epochs, tau_max, tau_min):
    """Eq. (8): linear per epoch from tau_max (epoch 0) to tau_min (last epoch), as GDAS.py."""
    return tau_max - (tau_max - tau_min) * epoch / max(epochs - 1, 1)


class MixedOp(nn.Module):
    """All candidate ops on one edge; search ops have affine=False and pools get a BN (DARTS)."""

    def __init__(self, C, stride):
        super().__init__()
        self.ops = nn.ModuleList()
        for name in PRIMITIVES:
            op = OPS[name](C, stride, False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self.ops.append(op)

    def forward(self, x, weights, index):  # weights: (n_ops,) straight-through h, index: k* (int)
        # ALGO LOGIC: Eq. (6): h^{k*} * O^{k*}(x), the other ops are not run (value 1 * O^{k*}(x))
        return self.ops[index](x) * weights[index]


class SearchCell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.preprocess0, self.preprocess1 = common.cell_preprocess(C_prev_prev, C_prev, C, reduction_prev,
                                                                    affine=False)
        # edge order: node 0 <- states 0,1; node 1 <- 0,1,2; ... (2+3+4+5 = 14 edges for 4 steps)
        self.edges = nn.ModuleList(MixedOp(C, 2 if reduction and j < 2 else 1)
                                   for i in range(steps) for j in range(2 + i))

    def forward(self, s0, s1, weights, index):  # weights: (n_edges, n_ops), index: n_edges ints
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            # ALGO LOGIC: Eq. (1): x_j = sum_{i<j} h^{k*} O^{k*}(x_i), one op per edge
            node = sum(self.edges[offset + j](h, weights[offset + j], index[offset + j])
                       for j, h in enumerate(states))
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self.multiplier:], dim=1)  # (B, multiplier*C, H, W)


class FixedReductionCell(nn.Module):
    """GDAS (FRC) hand-designed reduction cell (official GDAS_Reduction_Cell; 2019 release Transition):
    two ReLU-Conv(1x3, s(1,2), g8)-Conv(3x1, s(2,1), g8)-BN-ReLU-Conv1x1-BN branches, on c_{k-2} and
    c_{k-1}, and two MaxPool3x3(s2)-BN branches on the same inputs; output: the 4 branches concatenated.
    The convs have a bias when the BNs are affine-free (official bias=not affine, Deviation 10)."""

    def __init__(self, C_prev_prev, C_prev, C, reduction_prev, affine=False):
        super().__init__()
        if C % 8:
            raise ValueError(f"the fixed reduction cell's grouped convs (8 groups) need C divisible by 8, got {C}")
        self.reduction, self.multiplier = True, 4
        self.preprocess0, self.preprocess1 = common.cell_preprocess(C_prev_prev, C_prev, C, reduction_prev, affine)
        self.convs = nn.ModuleList(nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, (1, 3), stride=(1, 2), padding=(0, 1), groups=8, bias=not affine),  # official bias
            nn.Conv2d(C, C, (3, 1), stride=(2, 1), padding=(1, 0), groups=8, bias=not affine),
            nn.BatchNorm2d(C, affine=affine), nn.ReLU(inplace=False),
            nn.Conv2d(C, C, 1, bias=not affine), nn.BatchNorm2d(C, affine=affine)) for _ in range(2))
        self.pools = nn.ModuleList(nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1),
                                                 nn.BatchNorm2d(C, affine=affine)) for _ in range(2))

    def forward(self, s0, s1, drop_prob=0.0):
        s0, s1 = self.preprocess0(s0), self.preprocess1(s1)
        out = [self.convs[0](s0), self.convs[1](s1), self.pools[0](s0), self.pools[1](s1)]
        if self.training and drop_prob > 0:  # used when retraining (official); not in the search
            out = [common.drop_path(x, drop_prob) for x in out]
        return torch.cat(out, dim=1)  # (B, 4C, H/2, W/2)


class Network(nn.Module):
    """The GDAS supernet: DARTS's stem, `layers` search cells, global pool, linear. One architecture
    is sampled per forward, shared by all normal cells, and one by all reduction cells (official).
    frc=True: the reduction cells are FixedReductionCells and only alphas_normal is searched."""

    def __init__(self, C, num_classes, layers, steps=4, multiplier=4, stem_multiplier=3, frc=False):
        super().__init__()
        self.tau = 10.0  # Eq. (8): set every epoch by the search loop
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in common.reduction_layers(layers)
            C_curr = C_curr * 2 if reduction else C_curr
            if reduction and frc:
                self.cells.append(FixedReductionCell(C_prev_prev, C_prev, C_curr, reduction_prev))
            else:
                self.cells.append(SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                                             reduction_prev))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.classifier = nn.Linear(C_prev, num_classes)
        n_edges = sum(2 + i for i in range(steps))
        # Deviation 1: official init 1e-3 * N(0, 1)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, len(PRIMITIVES)))
        self.alphas_reduce = None if frc else nn.Parameter(1e-3 * torch.randn(n_edges, len(PRIMITIVES)))

    def forward(self, x):
        # ALGO LOGIC: one sample per cell type and forward pass; indices to the host once (Deviation 5)
        samples = {"normal": gumbel_max_sample(self.alphas_normal, self.tau)}
        if self.alphas_reduce is not None:
            samples["reduce"] = gumbel_max_sample(self.alphas_reduce, self.tau)
        samples = {cell: (h, index.tolist()) for cell, (h, index) in samples.items()}
        self.last_index = {cell: index for cell, (_, index) in samples.items()}  # for touch_sampled_weights
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            if isinstance(cell, FixedReductionCell):
                s0, s1 = s1, cell(s0, s1)
            else:
                s0, s1 = s1, cell(s0, s1, *samples["reduce" if cell.reduction else "normal"])
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))

    def arch_parameters(self):
        return [a for a in (self.alphas_normal, self.alphas_reduce) if a is not None]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("alphas_")]

    def arch_weights(self):
        """softmax(A) per searched cell type, as lists (what alphas.jsonl and the figures show)."""
        return {cell: F.softmax(a, -1).tolist() for cell, a in
                (("normal", self.alphas_normal), ("reduce", self.alphas_reduce)) if a is not None}

    def sampled_weights(self):
        """The weights of the ops the last forward ran (the sampled op of every edge of every search cell)."""
        return [p for cell in self.cells if isinstance(cell, SearchCell)
                for edge, k in zip(cell.edges, self.last_index["reduce" if cell.reduction else "normal"])
                for p in edge.ops[k].parameters()]

    def genotype(self, rule="darts"):
        w_normal = F.softmax(self.alphas_normal, -1)
        w_reduce = None if self.alphas_reduce is None else F.softmax(self.alphas_reduce, -1)
        return derive_genotype(w_normal, w_reduce, rule=rule)


class NB201Edge(nn.Module):
    """The 5 NAS-Bench-201 ops of one edge (common.NB201_OPS, affine-free BN as the official search model)."""

    def __init__(self, C, track_running_stats):
        super().__init__()
        self.ops = nn.ModuleList(common.NB201_OPS[name](C, C, 1, False, track_running_stats)
                                 for name in common.NB201_PRIMITIVES)

    def forward(self, x, weights, index):  # weights: (5,) straight-through h, index: k* (int)
        # ALGO LOGIC: Eq. (6) as NAS201SearchCell.forward_gdas (search_cells.py lines 80-83): h^{k*} O^{k*}(x)
        # plus the other entries h^k themselves (value 0, broadcast), which give them a gradient too (Deviation 13)
        return sum(w * op(x) if k == index else w for k, (w, op) in enumerate(zip(weights, self.ops)))


class NB201SearchCell(nn.Module):
    """A NAS-Bench-201 search cell: node i = sum_{j<i} edge_(i,j)(node j) over common.NB201_EDGES."""

    def __init__(self, C, track_running_stats):
        super().__init__()
        self.edges = nn.ModuleList(NB201Edge(C, track_running_stats) for _ in common.NB201_EDGES)

    def forward(self, x, weights, index):  # weights: (6, 5), index: 6 ints
        nodes = [x]
        for i in range(1, common.NB201_NODES):
            # ALGO LOGIC: Eq. (1): x_i = sum_{j<i} h^{k*} O^{k*}(x_j), one sampled op per edge
            nodes.append(sum(self.edges[e](nodes[j], weights[e], index[e])
                             for e, (to, j) in enumerate(common.NB201_EDGES) if to == i))
        return nodes[-1]  # (B, C, H, W)


class NB201Network(nn.Module):
    """GDAS in the NAS-Bench-201 space (search_model_gdas.py TinyNetworkGDAS): stem, N search cells at C, 2C, 4C
    with residual blocks between the stages (common.nb201_layout), BN-ReLU, global pool, linear. ONE (6, 5)
    alpha, one sample per forward shared by every cell (lines 114-134); the derived cell is the argmax per edge."""

    def __init__(self, C, num_classes, N, track_running_stats=True):
        super().__init__()
        self.tau = 10.0  # Eq. (8): set every epoch by the search loop
        self.stem = common.nb201_stem(C)
        self.cells = nn.ModuleList(NB201SearchCell(c_in, track_running_stats) if kind == "cell"
                                   else common.NB201ResNetBlock(c_in, c_out)
                                   for kind, c_in, c_out in common.nb201_layout(C, N))
        self.lastact = common.nb201_lastact(4 * C)
        self.classifier = nn.Linear(4 * C, num_classes)
        # Deviation 1: official init 1e-3 * N(0, 1) (search_model_gdas.py lines 60-62)
        self.alphas_cell = nn.Parameter(1e-3 * torch.randn(len(common.NB201_EDGES), len(common.NB201_PRIMITIVES)))

    def forward(self, x):  # x: (B, 3, H, W)
        h, index = gumbel_max_sample(self.alphas_cell, self.tau)
        self.last_index = index.tolist()  # Deviation 5: to the host once per forward
        out = self.stem(x)
        for cell in self.cells:
            out = cell(out, h, self.last_index) if isinstance(cell, NB201SearchCell) else cell(out)
        return self.classifier(F.adaptive_avg_pool2d(self.lastact(out), 1).flatten(1))  # (B, num_classes)

    def arch_parameters(self):
        return [self.alphas_cell]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("alphas_")]

    def arch_weights(self):
        return {"cell": F.softmax(self.alphas_cell, -1).tolist()}

    def sampled_weights(self):
        return [p for cell in self.cells if isinstance(cell, NB201SearchCell)
                for edge, k in zip(cell.edges, self.last_index) for p in edge.ops[k].parameters()]

    def genotype(self, rule=None):  # search_model_gdas.py genotype(), lines 101-112: argmax per edge, 'none' allowed
        return common.nb201_derive(self.alphas_cell.detach().cpu())


# =====================================================================================
# Architecture update rule
# =====================================================================================
def arch_grad(model, x_val, y_val):
    """Eq. (7), architecture half: grad_A L_val(w, h') through the straight-through sample h' drawn in
    this forward pass (first order, no unrolling). Also returns the val loss and logits."""
    logits = model(x_val)
    loss = F.cross_entropy(logits.float(), y_val)
    return list(torch.autograd.grad(loss, model.arch_parameters())), loss.detach(), logits.detach()


# =====================================================================================
# Genotype derivation
# =====================================================================================
def derive_genotype(w_normal, w_reduce, steps=4, multiplier=4, rule="darts"):
    """rule "darts": for every intermediate node keep the 2 incoming edges whose strongest non-zero op
    is largest, and on each the argmax op with 'none' excluded (ties to the lower index).
    rule "pairs" (AutoDL genotype()): the 2 largest (op, input) pairs of the node, 'none' excluded,
    from any inputs (the same input may appear twice)."""
    none = PRIMITIVES.index("none")

    def parse(w):  # w: (n_edges, n_ops) softmax weights
        w = w.detach().cpu().clone()
        w[:, none] = -1.0  # 'none' can never win
        gene, start = [], 0
        for i in range(steps):
            rows = w[start:start + i + 2]  # edges into node i, from states 0 .. i+1
            if rule == "pairs":
                order = sorted(((j, k) for j in range(i + 2) for k in range(len(PRIMITIVES)) if k != none),
                               key=lambda jk: -rows[jk].item())[:2]
                gene += [(PRIMITIVES[k], j) for j, k in order]
            else:
                strength = rows.max(dim=1).values.tolist()
                keep = sorted(range(i + 2), key=lambda j: -strength[j])[:2]
                gene += [(PRIMITIVES[int(rows[j].argmax())], j) for j in keep]
            start += i + 2
        return gene

    concat = list(range(2 + steps - multiplier, steps + 2))
    if w_reduce is None:  # FRC: [] and [] stand for the fixed reduction cell (official GDAS_F1: reduce=None)
        return Genotype(normal=parse(w_normal), normal_concat=concat, reduce=[], reduce_concat=[])
    return Genotype(normal=parse(w_normal), normal_concat=concat, reduce=parse(w_reduce), reduce_concat=concat)


# =====================================================================================
# Search loop
# =====================================================================================
def touch_sampled_weights(model):
    """Deviation 12: the official architecture step's arch_loss.backward() also leaves a .grad on the weights of
    every op it ran, zero-filled by the next zero_grad(), so weight decay and momentum move them from then on.
    arch_grad computes only A's gradient: give those weights the zero .grad they would hold."""
    for p in model.sampled_weights():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def search_step(model, x, y, x_val, y_val, w_optimizer, a_optimizer, args):
    """Eq. (7), one iteration in the official order: a weight step on the train batch, then an architecture
    step on the val batch, each with its own freshly sampled architecture. Returns the train loss and logits
    and the val loss and logits, detached."""
    # ALGO LOGIC: Eq. (7) weight step: SGD on w, sampled architecture h, grad-norm clip 5. Deviation 12: the
    # gradients are zero-filled (official), so an op that is not sampled now still moves by weight decay and
    # Nesterov momentum; --freeze-unsampled sets them to None, and SGD then skips such an op
    w_optimizer.zero_grad(set_to_none=args.freeze_unsampled)
    with common.autocast(x.device, args.amp):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    common.clip_grad(model.weight_parameters(), args.grad_clip)
    w_optimizer.step()
    # ALGO LOGIC: Eq. (7) architecture step: Adam on A, a fresh sample h' on the val batch
    with common.autocast(x.device, args.amp):
        grads, val_loss, val_logits = arch_grad(model, x_val, y_val)
    for a, g in zip(model.arch_parameters(), grads):
        a.grad = g
    a_optimizer.step()
    if not args.freeze_unsampled:
        touch_sampled_weights(model)
    return loss.detach(), logits.detach(), val_loss, val_logits


def search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch):
    """One epoch of Eq. (7): a search_step per train batch. Returns common.Progress's summary (train loss and
    accuracy, seconds per step, peak GPU memory) with the val loss and accuracy of the architecture steps (what the
    official code logs: train-mode BN, one sample per batch)."""
    model.train()
    steps = min(len(train_data), args.steps_per_epoch or len(train_data))
    progress = common.Progress(log, "search", epoch, steps, args.report_freq, device)
    val_loss_sum, val_acc_sum = 0.0, 0.0
    for step, (x, y) in enumerate(train_data):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x_val, y_val = (t.to(device, non_blocking=True) for t in next(val_iter))
        loss, logits, val_loss, val_logits = search_step(model, x, y, x_val, y_val, w_optimizer, a_optimizer, args)
        val_loss_sum, val_acc_sum = val_loss_sum + val_loss.item(), val_acc_sum + common.accuracy(val_logits, y_val)
        progress.update(loss.item(), common.accuracy(logits, y))
    n = max(len(progress.step_seconds), 1)
    return {**progress.summary(), "val_loss": val_loss_sum / n, "val_acc": val_acc_sum / n}


def search(args, device, run_dir, log):
    """Run the search; returns (final genotype, summary). Writes per epoch: search_history.jsonl,
    alphas.jsonl, genotype.json, checkpoint_search.pt; at the end the figures."""
    generator = torch.Generator().manual_seed(args.seed)
    train_set, num_classes, _ = common.load_dataset(args.dataset, args.data, True, args.image_size)
    train_data, val_data = common.search_loaders(train_set, args.batch_size, args.train_portion, generator,
                                                 args.workers)
    nb201 = args.space == "nb201"
    if nb201:
        model = NB201Network(args.init_channels, num_classes, args.layers, args.track_running_stats).to(device)
    else:
        model = Network(args.init_channels, num_classes, args.layers, frc=args.frc).to(device)
    model = common.speed_up(model, args)  # --channels-last, --compile
    log.info("supernet: %.3f M weights, alphas %s%s", sum(p.numel() for p in model.weight_parameters()) / 1e6,
             [tuple(a.shape) for a in model.arch_parameters()], " (fixed reduction cell)" if args.frc else "")
    w_optimizer = torch.optim.SGD(model.weight_parameters(), args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay, nesterov=args.nesterov)
    # GDAS.py: Adam with betas (0.5, 0.999), weight decay 1e-3
    a_optimizer = torch.optim.Adam(model.arch_parameters(), args.arch_lr, betas=(0.5, 0.999),
                                   weight_decay=args.arch_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_optimizer, args.epochs, eta_min=args.lr_min)
    start = 0
    if args.resume:  # TRY NOT TO MODIFY: continue after the last finished epoch, bit for bit
        start = common.resume_from(run_dir / "checkpoint_search.pt", "gdas", generator, model=model,
                                   w_optimizer=w_optimizer, a_optimizer=a_optimizer, scheduler=scheduler)
        if start and not args.freeze_unsampled:  # Deviation 12: the weights that held a (zero-filled) .grad
            held = set(common.load_checkpoint(run_dir / "checkpoint_search.pt", "gdas").get("weights_with_grad", []))
            for name, p in model.named_parameters():
                if name in held:
                    p.grad = torch.zeros_like(p)
        log.info("resuming the search at epoch %d", start)
    history = common.keep_jsonl(run_dir / "search_history.jsonl", start)
    alpha_history = [r["softmax"] for r in common.keep_jsonl(run_dir / "alphas.jsonl", start)]
    for epoch in range(start, args.epochs):
        t0 = time.time()
        lr = w_optimizer.param_groups[0]["lr"]
        # ALGO LOGIC: Eq. (8): tau for this epoch
        model.tau = temperature(epoch, args.epochs, args.tau_max, args.tau_min)
        val_iter = common.forever(val_data)  # one pass of the val half per epoch at the 50/50 split
        train = search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch)
        scheduler.step()
        genotype = model.genotype(args.genotype_rule)
        weights = model.arch_weights()
        alpha_history.append(weights)
        row = {"epoch": epoch, "lr": lr, "tau": model.tau, **train, "seconds": time.time() - t0,
               "genotype": common.genotype_to_dict(genotype),
               **(common.nb201_epoch_row(args, genotype, log) if nb201 else {})}
        history.append(row)
        common.append_jsonl(run_dir / "search_history.jsonl", row)
        alphas = {n.removeprefix("alphas_"): a.tolist() for n, a in model.named_parameters() if n.startswith("alphas_")}
        common.append_jsonl(run_dir / "alphas.jsonl", {"epoch": epoch, "tau": model.tau, "softmax": weights,
                                                       "alpha": alphas})
        common.write_json(run_dir / "genotype.json", common.genotype_to_dict(genotype))
        log.info("search epoch %d lr %.5f tau %.3f train_acc %.2f val_acc %.2f %.1fs", epoch, lr, model.tau,
                 row["train_acc"], row["val_acc"], row["seconds"])
        log.info("genotype %s", genotype)
        # TRY NOT TO MODIFY: checkpoint with everything needed to resume, alphas and tau included
        common.save_checkpoint(run_dir / "checkpoint_search.pt", {
            **common.make_checkpoint("gdas", epoch, args, generator, model=model, w_optimizer=w_optimizer,
                                     a_optimizer=a_optimizer, scheduler=scheduler),
            "alphas": {cell: torch.tensor(a) for cell, a in alphas.items()}, "tau": model.tau,
            "genotype": common.genotype_to_dict(genotype),
            "weights_with_grad": [n for n, p in model.named_parameters() if p.grad is not None
                                  and not n.startswith("alphas_")]})
    genotype = model.genotype(args.genotype_rule)  # also when a resumed run had nothing left to search
    primitives = common.NB201_PRIMITIVES if nb201 else PRIMITIVES
    common.plot_alphas(alpha_history[-1], run_dir / "alphas.png", primitives=primitives)
    common.plot_alpha_evolution(alpha_history, run_dir / "alpha_evolution.png", primitives=primitives)
    if nb201 and args.nb201_benchmark:
        common.plot_nb201_history(history, run_dir / "nb201.png")
    common.plot_curves(history, ["train_acc", "val_acc"], run_dir / "search_curves.png", "GDAS search")
    common.plot_curves(history, ["tau"], run_dir / "tau.png", "Eq. (8): Gumbel-softmax temperature",
                       ylabel="tau")
    summary = {"epochs": len(history), "val_acc": history[-1]["val_acc"], "train_acc": history[-1]["train_acc"],
               "seconds": sum(r["seconds"] for r in history),
               "seconds_per_step": sum(r["seconds_per_step"] for r in history) / len(history),
               "tau": history[-1]["tau"], "frc": args.frc, "space": args.space}
    return genotype, summary


# =====================================================================================
# main: search -> derive -> retrain -> test
# =====================================================================================
def main(args):
    args, device = common.prepare(args, __file__)  # --resume's flags, the device, every flag's range
    if args.tau_min > args.tau_max:
        raise UsageError(f"Eq. (8) anneals tau from --tau-max down to --tau-min: --tau-min {args.tau_min} is above "
                         f"--tau-max {args.tau_max}")
    if args.nesterov and args.momentum == 0:
        raise UsageError("--nesterov needs --momentum > 0 (Nesterov momentum is a form of momentum); "
                         "add --no-nesterov or give a momentum")
    if args.space == "nb201" and args.frc:
        raise UsageError("--frc fixes the DARTS space's reduction cell: NAS-Bench-201 has none (drop --frc)")
    if args.frc and args.init_channels % 4:
        raise UsageError(f"--frc: the fixed reduction cell's grouped convs (8 groups at 2C and 4C channels) need "
                         f"--init-channels divisible by 4, got {args.init_channels}")
    if args.frc and (args.genotype or not args.no_retrain):
        raise UsageError("--frc searches the normal cell only and common.retrain cannot build the fixed "
                         "reduction cell yet: add --no-retrain (and no --genotype)")
    if args.space == "darts" and args.layers < 3:
        raise UsageError(f"--layers must be >=3, got {args.layers} (the DARTS space needs a normal cell; N of "
                         "--space nb201 may be smaller)")
    genotype = common.parse_genotype(args.genotype) if args.genotype else None  # fail before any work
    return common.run(args, __file__, "gdas", device, genotype, search)


if __name__ == "__main__":
    common.cli(main, Args)
