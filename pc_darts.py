"""PC-DARTS: Partial Channel Connections for Memory-Efficient Architecture Search.

Yuhui Xu, Lingxi Xie, Xiaopeng Zhang, Xin Chen, Guo-Jun Qi, Qi Tian, Hongkai Xiong. ICLR 2020.
arXiv:1907.05737, https://arxiv.org/abs/1907.05737. Official code: yuhuixu1993/PC-DARTS @ b74702f,
checked against model_search.py, train_search.py (main and V100_python1.0/), train.py, architect.py.
This file is darts.py with what PC-DARTS changed: `diff darts.py pc_darts.py`.

Reproduce the paper (search, derive the cell, retrain 600 epochs, test on CIFAR-10):
    python pc_darts.py --epochs 50          # 50 is the default: batch 256, 15 warm-up epochs
    python pc_darts.py --genotype PC_DARTS  # retrain the published cell only
    python pc_darts.py --space nb201        # search the NAS-Bench-201 cell (partial channels + edge normalisation)

NAS-Bench-201 (Dong & Yang, ICLR 2020, arXiv:2001.00326), --space nb201: partial channels and edge
normalisation apply cleanly. Every NB-201 edge keeps (C, H, W) (stride 1, C -> C), so Eq. (2) sends the first
C/K channels of each of the 6 edges through the 5 NB-201 ops (built at C/K channels) and the rest around them,
then shuffles with K groups, exactly as on a DARTS normal edge; C, 2C and 4C are multiples of K when C is.
Eq. (3) softmaxes beta over each node's incoming edges: node 1 has one (its softmax is 1, so that beta gets
no gradient), node 2 two, node 3 three. The derived cell keeps all 6 edges (argmax op per edge, 'none'
allowed, as the benchmark derives cells): softmax(beta) scales a whole edge, so it does not change that
argmax; beta acts on the search through Eq. (3) only. PC-DARTS released no NB-201 code and the benchmark
paper does not run it: the search schedule is the benchmark's DARTS protocol (Args.NB201, D-X-Y/
AutoDL-Projects @ f46486e configs/nas-benchmark/algos/DARTS.config, scripts-search/NAS-Bench-201-algos/
DARTS-V1.sh) with PC-DARTS's own K, warm-up and arch lr (ours).

Equations implemented (numbers of arXiv:1907.05737, also used in notebooks/pc_darts.ipynb):
    Eq. (1)  f^(i,j)(x) = sum_o softmax(alpha^(i,j))_o * o(x)          (DARTS's mixed op) -> MixedOp.forward
    Eq. (2)  f_PC^(i,j)(x_i; S) = sum_o softmax(alpha^(i,j))_o * o(S * x_i) + (1 - S) * x_i,
             S = the first C/K channels, then channel_shuffle (Deviation 1)  -> MixedOp.forward
    Eq. (3)  x_j = sum_{i<j} softmax_{i'<j}(beta_{i',j})_i * f_PC^(i,j)(x_i)  -> SearchCell.forward, edge_softmax
    Sec. 3.3 derived cell: rank edges by softmax(beta)_{i,j} * softmax(alpha^(i,j))_o (strongest
             non-zero op), keep the top 2 per node, argmax op on each   -> Network.genotype, derive_genotype
    Sec. 4.2 schedule: weights only for the first 15 epochs (warm-up), then the first-order
             architecture step of DARTS on alpha and beta together  -> search_epoch
    Sec. 3.2 memory: the ops hold about 1/K of the activations  -> tests/test_pc_darts.py, notebook

Deviations from the paper (each is what the official code does, unless marked "ours"):
    1. Partial channels are not sampled at random: every edge sends its *first* C/K channels
       through the ops, passes the other channels by (through MaxPool2d(2, 2) on stride-2 edges,
       so the shapes match), concatenates and applies a channel shuffle with K groups
       (model_search.py). The shuffle interleaves the K channel groups, so the first C/K channels
       of the next node mix op outputs with bypassed channels: at K=4, 44-59 % of a cell's input
       channels reach an op instead of 25 % (notebook §1), at zero cost. The paper text describes
       a random mask S_{i,j}; the README calls slice + shuffle its "efficient way to implement the
       channel sampling", and the repository's random variant (model_search_random.py) never
       applies its permutation (random_shuffle returns nothing), so the published cells come from
       slice + shuffle. We implement that: what produced the paper's cells, deterministic, free.
    2. alpha and beta are initialised as 1e-3 * N(0, 1) (official, as in DARTS).
    3. The search lr anneals by cosine to 0 (main branch --learning_rate_min 0.0; the
       V100_python1.0 copy uses 0.001: pass --lr-min 0.001 for it).
    4. ours: the scheduler steps at the end of each epoch (epoch 0 trains at lr 0.1); the official
       code steps it first, so epoch 0 trains at eta(1) (train_search.py lines 112-114), as in darts.py.
    5. ours: each epoch walks the shuffled val half once (one val batch per train batch), like the
       V100_python1.0 copy's persistent iterator; the main branch calls next(iter(valid_queue))
       every step (sampling with replacement).
    6. ours: alpha and beta are nn.Parameters, so they are in every checkpoint (official: plain
       tensors, absent from weights.pt).
    7. ours: the val half is evaluated after every epoch (official: last epoch only, train_search.py
       lines 128-130), for the curves; it adds one forward pass over the val half per epoch.
    8. First order only: train_search.py keeps DARTS's --unrolled flag, but PC-DARTS is built on
       first-order DARTS (author, yuhuixu1993/PC-DARTS#23) and its numbers use it; no --unrolled here.
    9. Retraining is the DARTS protocol of common.retrain with train.py's one change,
       --drop-path-prob 0.3; auxiliary towers and cutout on, as the README command passes them.
       Batch 96 as in train.py (line 23); we could not check whether the paper says 128.
   10. ours: the warm-up length is a flag (--warmup-epochs); train_search.py hard-codes
       `if epoch >= 15`. During warm-up alpha and beta do not move (no Adam step at all).
   11. ours: --amp (bfloat16 autocast, CUDA only), and the peak memory of each epoch is logged
       (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS).
   12. The equation and section numbers are those of the arXiv text as we recall it; we could not
       read the PDF here to re-check them (the formulas themselves match model_search.py).
   13. ours: odd feature-map sizes work (any --image-size >= 8): on stride-2 edges the bypass pool
       rounds up (MaxPool2d(2, 2, ceil_mode=True)) to ceil(H/2) like the ops; the official
       MaxPool2d(2, 2) (model_search.py line 30) rounds down and the concat fails. Even sizes: identical.
   14. ours: the searched cell is derived after the last epoch; train_search.py logs model.genotype() at
       the start of each epoch (lines 117-118), so its last logged cell is the one before epoch 49 trains.
   15. --space nb201, ours (no official PC-DARTS NB-201 code): see above; the lr anneals once per epoch (the
       benchmark's scripts: every step), the weights / alpha split is the 50/50 cut of darts.py, and the
       search BN tracks running statistics (--no-track-running-stats: the benchmark's BN 0 setting).
   16. --dataset imagenet search, ours: the subsets are drawn by the script from ImageNet's train/ folder with
       --seed (per class, rounded, at least one image each); the official code reads a copy prepared
       beforehand (imagenet_search/train and val, train_search_imagenet.py lines 62-64, 86-87). Both are
       augmented with RandomResizedCrop(224) + flip, no colour jitter (lines 94-105). The lr warm-up
       lr (e+1)/5 of the first 5 epochs (lines 155-158) is --lr-warmup-epochs; alpha and beta are clipped
       to norm 5 (line 204; the CIFAR search does not clip them), --arch-grad-clip. The val subset is
       evaluated every epoch (official: from epoch 47, line 170).
   Plus the deviations shared by every method file, listed in common.py's docstring (C1-C5).

ImageNet search (paper Sec. 4.3; train_search_imagenet.py and model_search_imagenet.py @ b74702f),
--dataset imagenet: random 10 % / 2.5 % of every class of the ImageNet train set train the weights / alpha
and beta (--imagenet-weights-portion, --imagenet-alpha-portion; README line 47), the supernet gets the
ImageNet stem (three stride-2 3x3 convs, so 224 px reach the cells at 28 px) and K=2, and the search
hyper-parameters are the official ones (Args.IMAGENET_SEARCH: batch 1024, lr 0.5, arch lr 6e-3, 35
warm-up epochs, ...). Run it data-parallel:
    torchrun --nproc_per_node 8 pc_darts.py --dataset imagenet --data /path/to/imagenet
Under torchrun the search is data-parallel (ours; the official code uses nn.DataParallel on 8 GPUs,
train_search_imagenet.py line 118): each process takes --batch-size / world images of every weight and
every alpha batch, the gradients of the weights and of alpha and beta are averaged over the processes
(all_reduce) before each step, so every process holds the same weights, alphas and betas; BN statistics
are per process (as per GPU under nn.DataParallel) and rank 0's running statistics are broadcast after
every step; rank 0 writes the run folder. The logged train loss and accuracy are rank 0's shard.

--k 1 gives DARTS's mixed op (all channels, no shuffle) with edge normalisation added.
Runs: --resume RUN_DIR continues a killed run (README.md, "Resume a killed run" and "Several GPUs"; a search
resumed under torchrun reads rank 0's checkpoint on every process, which no test covers yet).
"""

import dataclasses
import hashlib
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import common
from common import OPS, PRIMITIVES, Genotype, UsageError, arg


# =====================================================================================
# Args
# =====================================================================================
@dataclasses.dataclass
class Args(common.BaseArgs):
    exp_name: str = arg("pc_darts", "name of the method; prefix of the run folder", "run")
    # Algorithm specific arguments (yuhuixu1993/PC-DARTS train_search.py defaults)
    epochs: int = arg(50, "train_search.py --epochs 50", check=">=1")
    batch_size: int = arg(256, "train_search.py --batch_size 256 (train and val streams)", check=">=2")
    lr: float = arg(0.1, "train_search.py --learning_rate 0.1 (weights, SGD)", check=">0")
    lr_min: float = arg(0.0, "train_search.py --learning_rate_min 0.0 (cosine floor; V100 copy: 0.001)",
                        check=">=0")
    momentum: float = arg(0.9, "train_search.py --momentum 0.9", check="[0,1)")
    nesterov: bool = arg(False, "Nesterov momentum for the weights (train_search.py: off; NAS-Bench-201's "
                         "DARTS.config line 10: on)")
    weight_decay: float = arg(3e-4, "train_search.py --weight_decay 3e-4", check=">=0")
    init_channels: int = arg(16, "train_search.py --init_channels 16 (a multiple of --k)", check=">=1")
    layers: int = arg(8, "train_search.py --layers 8 (cells in the supernet; at least 3, or there is no normal "
                      "cell and alphas_normal gets no gradient); --space nb201: N, search cells per stage (>=1)",
                      check=">=1")
    grad_clip: float = arg(5.0, "train_search.py --grad_clip 5 (weights only); 0 = no clipping", check=">=0")
    train_portion: float = arg(0.5, "train_search.py --train_portion 0.5 (weights / alpha split)", check="(0,1)")
    arch_lr: float = arg(6e-4, "train_search.py --arch_learning_rate 6e-4 (Adam, alpha and beta)", check=">0",
                         aliases=("--arch-learning-rate",))
    arch_weight_decay: float = arg(1e-3, "train_search.py --arch_weight_decay 1e-3", check=">=0")
    k: int = arg(4, "Eq. (2): 1/K of the channels go through the ops (model_search.py self.k = 4; "
                 "ImageNet search: 2)", check=">=1")
    warmup_epochs: int = arg(15, "train weights only in 0-based epochs 0..N-1, alpha and beta from epoch N on "
                             "(train_search.py `if epoch >= 15`)", check=">=0")
    # NAS-Bench-201 (issue 15)
    space: str = arg("darts", "darts | nb201: the NAS-Bench-201 cell (4 nodes, 6 edges, 5 ops) in the benchmark's "
                     "macro network, partial channels on all 6 edges; defaults then follow configs/nas-benchmark/"
                     "algos/DARTS.config and scripts-search/NAS-Bench-201-algos/DARTS-V1.sh with PC-DARTS's K, "
                     "warm-up and arch lr (see [--space nb201: ...])", check=("darts", "nb201"))
    nb201_benchmark: str = arg("", common.NB201_BENCHMARK_HELP)
    track_running_stats: bool = arg(True, "--space nb201: BN running statistics in the search cells (the "
                                    "benchmark's BN argument, 1 in docs/NAS-Bench-201.md lines 227-228)")
    # ImageNet search (paper Sec. 4.3, train_search_imagenet.py)
    imagenet_weights_portion: float = arg(0.1, "--dataset imagenet search: the share of every class of the train "
                                          "set, drawn at random, that trains the weights (README line 47: 10 percent)",
                                          check="(0,1)")
    imagenet_alpha_portion: float = arg(0.025, "--dataset imagenet search: the share of every class, disjoint from "
                                        "the weights' share, that trains alpha and beta (README line 47: 2.5 percent)",
                                        check="(0,1)")
    lr_warmup_epochs: int = arg(0, "the search lr is lr (e+1)/N in the first N epochs, then the cosine "
                                "(train_search_imagenet.py lines 155-158, batch > 256)", check=">=0")
    arch_grad_clip: float = arg(0.0, "clip the gradient norm of alpha and beta (train_search_imagenet.py line 204: "
                                "5; train_search.py: none); 0 = no clipping", check=">=0")
    # retraining: train.py differs from DARTS's only here (train.py line 37)
    drop_path_prob: float = arg(0.3, "train.py --drop_path_prob 0.3 (DARTS: 0.2; linear ramp from 0)", "retrain",
                                "[0,1)")


    # The benchmark's DARTS protocol (AutoDL-Projects @ f46486e configs/nas-benchmark/algos/DARTS.config lines
    # 2-12: cosine 0.025 -> 0.001, 50 epochs, SGD wd 5e-4, momentum 0.9, Nesterov, batch 64; DARTS-V1.sh lines
    # 20-21: C=16, N=5); K=4, 15 warm-up epochs, arch Adam 6e-4 / 1e-3 stay PC-DARTS's (train_search.py).
    NB201 = {"epochs": 50, "batch_size": 64, "lr": 0.025, "lr_min": 0.001, "momentum": 0.9, "nesterov": True,
             "weight_decay": 5e-4, "init_channels": 16, "layers": 5, "grad_clip": 5.0, "k": 4, "warmup_epochs": 15,
             "arch_lr": 6e-4, "arch_weight_decay": 1e-3}
    # ImageNet retraining, the mobile setting of the official train_imagenet.py (@ b74702f): batch 1024 (line 24),
    # lr 0.5 (25), momentum 0.9 (26), weight decay 3e-5 (27), 250 epochs (29), C=48 (30), 14 cells (31), the
    # auxiliary tower (README line 69 passes --auxiliary; weight 0.4, line 33), drop path 0 (34), grad clip 5
    # (38), label smoothing 0.1 (39) on the main and auxiliary losses (lines 100, 209-212), the linear schedule
    # (40, adjust_lr lines 186-194) and 5 warm-up epochs lr0 (e+1)/5 (lines 156-159, applied there only when the
    # batch exceeds 256: pass --retrain-warmup-epochs 0 with a smaller --retrain-batch-size); no cutout.
    IMAGENET_RETRAIN = {"retrain_epochs": 250, "retrain_batch_size": 1024, "retrain_lr": 0.5, "retrain_momentum": 0.9,
                "retrain_weight_decay": 3e-5, "retrain_schedule": "linear", "retrain_warmup_epochs": 5,
                "label_smoothing": 0.1, "auxiliary": True, "auxiliary_weight": 0.4, "drop_path_prob": 0.0,
                "retrain_grad_clip": 5.0, "retrain_init_channels": 48, "retrain_layers": 14, "cutout": False}
    # The ImageNet search, train_search_imagenet.py @ b74702f: batch 1024 (line 26, over 8 GPUs), lr 0.5 (27),
    # cosine to 0 (28, 146-147), momentum 0.9 (29), weight decay 3e-4 (30), 50 epochs (32), C=16 (33), 8 cells
    # (34), weight grad clip 5 (41, 213), arch Adam lr 6e-3 (43), wd 1e-3 (44), arch steps from epoch 35 (--begin,
    # lines 45 and 199), alpha/beta clipped to 5 (204), lr warm-up 5 epochs (155-158); K=2 (model_search_imagenet.py
    # lines 34, 42-43, 59: C//2 channels through the ops, channel_shuffle(ans, 2)).
    IMAGENET_SEARCH = {"batch_size": 1024, "lr": 0.5, "lr_min": 0.0, "momentum": 0.9, "weight_decay": 3e-4,
                       "epochs": 50, "init_channels": 16, "layers": 8, "grad_clip": 5.0, "arch_lr": 6e-3,
                       "arch_weight_decay": 1e-3, "warmup_epochs": 35, "arch_grad_clip": 5.0, "lr_warmup_epochs": 5,
                       "k": 2}
    IMAGENET = {**IMAGENET_RETRAIN, **IMAGENET_SEARCH}  # --dataset imagenet: both (common.apply_recipes)


# =====================================================================================
# Search space: partial-channel mixed op, search cell with edge normalisation, supernet
# =====================================================================================
def channel_shuffle(x, groups):
    """ShuffleNet's channel shuffle: view the C channels as (groups, C/groups), transpose, flatten,
    so channel g * C/groups + i moves to i * groups + g. channel_shuffle(., C/groups) undoes it."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)


class MixedOp(nn.Module):
    """All candidate ops on one edge, built for C/K channels; search ops have affine=False and
    pools get a BN (official). Channels C/K.. bypass the ops (Deviation 1)."""

    def __init__(self, C, stride, k, space="darts", track_running_stats=True):
        super().__init__()
        self.k = k
        self.ops = nn.ModuleList()
        if space == "nb201":  # NB-201's five ops at C/K -> C/K, pools without a BN (search_cells.py)
            self.ops.extend(common.NB201_OPS[name](C // k, C // k, stride, False, track_running_stats)
                            for name in common.NB201_PRIMITIVES)
        else:
            for name in PRIMITIVES:
                op = OPS[name](C // k, stride, False)
                if "pool" in name:
                    op = nn.Sequential(op, nn.BatchNorm2d(C // k, affine=False))
                self.ops.append(op)
        # the bypassed channels must shrink like the op outputs on stride-2 edges (official self.mp);
        # Deviation 13: ceil_mode gives ceil(H/2) as the ops do, also at odd H (same as official at even H)
        self.bypass = nn.MaxPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()

    def forward(self, x, weights):  # x: (B, C, H, W), weights: (n_ops,) = softmax(alpha^(i,j))
        c = x.shape[1] // self.k
        x_ops, x_bypass = x[:, :c], x[:, c:]  # S * x: (B, C/K, H, W), (1 - S) * x: (B, C - C/K, H, W)
        # ALGO LOGIC: Eq. (1)-(2): f_PC(x) = sum_o softmax(alpha)_o * o(S * x) + (1 - S) * x
        out = sum(w * op(x_ops) for w, op in zip(weights, self.ops))
        if self.k == 1:  # every channel went through the ops: DARTS's mixed op
            return out
        out = torch.cat([out, self.bypass(x_bypass)], dim=1)  # (B, C, H/stride, W/stride)
        # ALGO LOGIC: Deviation 1: shuffle, so the next edge's first C/K channels mix all K groups
        return channel_shuffle(out, self.k)


class SearchCell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, k):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.preprocess0, self.preprocess1 = common.cell_preprocess(C_prev_prev, C_prev, C, reduction_prev,
                                                                    affine=False)
        # edge order: node 0 <- states 0,1; node 1 <- 0,1,2; ... (2+3+4+5 = 14 edges for 4 steps)
        self.edges = nn.ModuleList(MixedOp(C, 2 if reduction and j < 2 else 1, k)
                                   for i in range(steps) for j in range(2 + i))

    def forward(self, s0, s1, weights, edge_weights):  # weights: (n_edges, n_ops), edge_weights: (n_edges,)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            # ALGO LOGIC: Eq. (3): x_j = sum_{i<j} softmax_{i'<j}(beta)_i * f_PC^(i,j)(x_i)
            node = sum(edge_weights[offset + j] * self.edges[offset + j](h, weights[offset + j])
                       for j, h in enumerate(states))
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self.multiplier:], dim=1)  # (B, multiplier*C, H, W)


def edge_softmax(beta, steps=4, first=2):
    """Eq. (3): softmax of beta over the incoming edges of each node, i.e. over the slices
    [0:2], [2:5], [5:9], [9:14] of the (n_edges,) vector (official: weights2 / betas). first=1, steps=3:
    NAS-Bench-201's nodes 1, 2, 3 with 1, 2, 3 incoming edges, slices [0:1], [1:3], [3:6]."""
    out, start = [], 0
    for i in range(steps):
        out.append(F.softmax(beta[start:start + i + first], dim=-1))
        start += i + first
    return torch.cat(out)  # (n_edges,)


class Network(nn.Module):
    """The PC-DARTS supernet: stem, `layers` search cells (all normal cells share alphas_normal and
    betas_normal, all reduction cells alphas_reduce and betas_reduce), global pool, linear."""

    def __init__(self, C, num_classes, layers, k=4, steps=4, multiplier=4, stem_multiplier=3, imagenet=False):
        super().__init__()
        self.steps, self.imagenet = steps, imagenet
        C_curr = stem_multiplier * C
        if imagenet:  # model_search_imagenet.py lines 113-125: three stride-2 convs, 224 px -> 56 (s0), 28 (s1)
            self.stem0 = nn.Sequential(nn.Conv2d(3, C_curr // 2, 3, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(C_curr // 2), nn.ReLU(inplace=True),
                                       nn.Conv2d(C_curr // 2, C_curr, 3, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(C_curr))
            self.stem1 = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(C_curr, C_curr, 3, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(C_curr))
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = imagenet  # line 130: s0 is twice s1's size, so cell 0 reduces it (FactorizedReduce)
        for i in range(layers):
            reduction = i in common.reduction_layers(layers)
            C_curr = C_curr * 2 if reduction else C_curr
            self.cells.append(SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                                         k))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.classifier = nn.Linear(C_prev, num_classes)
        n_edges = sum(2 + i for i in range(steps))
        # Deviation 2: official init 1e-3 * N(0, 1) for alpha (n_edges, n_ops) and beta (n_edges,)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, len(PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, len(PRIMITIVES)))
        self.betas_normal = nn.Parameter(1e-3 * torch.randn(n_edges))
        self.betas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges))

    def forward(self, x):
        w_normal = F.softmax(self.alphas_normal, dim=-1)
        w_reduce = F.softmax(self.alphas_reduce, dim=-1)
        e_normal, e_reduce = edge_softmax(self.betas_normal, self.steps), edge_softmax(self.betas_reduce, self.steps)
        if self.imagenet:
            s0 = self.stem0(x)  # (B, 3C, H/4, W/4)
            s1 = self.stem1(s0)  # (B, 3C, H/8, W/8)
        else:
            s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, (cell(s0, s1, w_reduce, e_reduce) if cell.reduction else cell(s0, s1, w_normal, e_normal))
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))

    def arch_parameters(self):
        return [self.alphas_normal, self.alphas_reduce, self.betas_normal, self.betas_reduce]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith(("alphas_", "betas_"))]

    def edge_weights(self):
        """Sec. 3.3: softmax(beta)_{i,j} * softmax(alpha^(i,j))_o, (n_edges, n_ops) per cell type."""
        return {cell: F.softmax(getattr(self, "alphas_" + cell), -1)
                * edge_softmax(getattr(self, "betas_" + cell), self.steps)[:, None] for cell in ("normal", "reduce")}

    def genotype(self):
        w = self.edge_weights()
        # ALGO LOGIC: Sec. 3.3: DARTS's rule on softmax(beta) * softmax(alpha) instead of softmax(alpha)
        return derive_genotype(w["normal"], w["reduce"], self.steps)


class NB201SearchCell(nn.Module):
    """The NAS-Bench-201 cell with partial channels on its 6 edges (common.NB201_EDGES order) and Eq. (3)
    edge weights: node i = sum_{j<i} softmax(beta)_(i,j) * f_PC^(i,j)(node j), output node 3."""

    def __init__(self, C, k, track_running_stats=True):
        super().__init__()
        self.edges = nn.ModuleList(MixedOp(C, 1, k, "nb201", track_running_stats) for _ in common.NB201_EDGES)

    def forward(self, x, weights, edge_weights):  # x: (B, C, H, W), weights: (6, 5), edge_weights: (6,)
        nodes = [x]
        for i in range(1, common.NB201_NODES):
            # ALGO LOGIC: Eq. (3) on the NB-201 DAG
            nodes.append(sum(edge_weights[e] * self.edges[e](nodes[j], weights[e])
                             for e, (to, j) in enumerate(common.NB201_EDGES) if to == i))
        return nodes[-1]


class NB201Network(nn.Module):
    """The PC-DARTS supernet in the NAS-Bench-201 space: the benchmark's search skeleton (stem, 3 stages of
    N cells at C, 2C, 4C, residual blocks between, BN-ReLU, pool, linear; search_model_darts.py) with
    NB201SearchCell; one alpha (6, 5) and one beta (6,) shared by all cells."""

    def __init__(self, C, num_classes, N, k=4, track_running_stats=True):
        super().__init__()
        self.stem = common.nb201_stem(C)
        self.cells = nn.ModuleList(NB201SearchCell(c_in, k, track_running_stats) if kind == "cell"
                                   else common.NB201ResNetBlock(c_in, c_out) for kind, c_in, c_out in common.nb201_layout(C, N))
        self.lastact = common.nb201_lastact(4 * C)
        self.classifier = nn.Linear(4 * C, num_classes)
        # Deviation 2: 1e-3 * N(0, 1)
        self.alphas = nn.Parameter(1e-3 * torch.randn(len(common.NB201_EDGES), len(common.NB201_PRIMITIVES)))
        self.betas = nn.Parameter(1e-3 * torch.randn(len(common.NB201_EDGES)))

    def forward(self, x):
        w, e = F.softmax(self.alphas, dim=-1), edge_softmax(self.betas, 3, first=1)  # (6, 5), (6,)
        h = self.stem(x)
        for cell in self.cells:
            h = cell(h, w, e) if isinstance(cell, NB201SearchCell) else cell(h)
        return self.classifier(F.adaptive_avg_pool2d(self.lastact(h), 1).flatten(1))

    def arch_parameters(self):
        return [self.alphas, self.betas]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if n not in ("alphas", "betas")]

    def edge_weights(self):
        return {"cell": F.softmax(self.alphas, -1) * edge_softmax(self.betas, 3, first=1)[:, None]}

    def genotype(self):
        # argmax op per edge, 'none' allowed; the per-edge factor softmax(beta) leaves the argmax unchanged
        return common.nb201_derive(self.edge_weights()["cell"])


def arch_state(model):
    """(softmax(alpha), Eq. (3) softmax(beta), raw alpha, raw beta) per cell type, as lists for alphas.jsonl."""
    if isinstance(model, NB201Network):
        return ({"cell": F.softmax(model.alphas, -1).tolist()},
                {"cell": edge_softmax(model.betas, 3, first=1).tolist()},
                {"cell": model.alphas.tolist()}, {"cell": model.betas.tolist()})
    return ({c: F.softmax(getattr(model, "alphas_" + c), -1).tolist() for c in ("normal", "reduce")},
            {c: edge_softmax(getattr(model, "betas_" + c)).tolist() for c in ("normal", "reduce")},
            {c: getattr(model, "alphas_" + c).tolist() for c in ("normal", "reduce")},
            {c: getattr(model, "betas_" + c).tolist() for c in ("normal", "reduce")})


# =====================================================================================
# Data-parallel search (torchrun) and the ImageNet search subsets
# =====================================================================================
def world():
    """(rank, world size) of the running process group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def average_across_processes(tensors):
    """In place: every tensor becomes its mean over the processes (one all_reduce of the flattened lot)."""
    _, n = world()
    if n == 1 or not tensors:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= n
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


def broadcast_from_rank_0(tensors):
    if world()[1] > 1:
        for t in tensors:
            dist.broadcast(t, 0)


def imagenet_search_subsets(train_set, weights_portion, alpha_portion, seed):
    """Paper Sec. 4.3 / README line 47: from every class a random weights_portion of its images for the
    weights and a disjoint alpha_portion for alpha and beta (rounded, at least one each). Returns two
    index lists into train_set (an ImageFolder: .targets)."""
    g = torch.Generator().manual_seed(seed)  # its own generator: the same subsets on every rank and on resume
    targets = torch.as_tensor(train_set.targets)
    w_idx, a_idx = [], []
    for c in range(len(train_set.classes)):
        idx = (targets == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_w, n_a = max(1, round(weights_portion * len(idx))), max(1, round(alpha_portion * len(idx)))
        if n_w + n_a > len(idx):
            raise UsageError(f"--dataset imagenet: class {train_set.classes[c]} has {len(idx)} images, too few for "
                             f"disjoint {weights_portion:g} / {alpha_portion:g} subsets")
        w_idx += idx[:n_w].tolist()
        a_idx += idx[n_w:n_w + n_a].tolist()
    return w_idx, a_idx


def search_data(args, generator):
    """(weights loader, alpha loader, num_classes). CIFAR and the others: the official 50/50 cut of the
    training set (common.search_loaders); --dataset imagenet: imagenet_search_subsets with the search
    augmentation of train_search_imagenet.py lines 94-105. Under torchrun every process reads its
    1/world share of each (DistributedSampler, reshuffled per epoch), batches of --batch-size / world."""
    rank, n = world()
    if args.dataset == "imagenet":
        train_set, num_classes, size = common.load_dataset("imagenet", args.data, True, args.image_size, augment=False)
        train_set.transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                                         T.Normalize(*common.IMAGENET_STATS)])
        w_idx, a_idx = imagenet_search_subsets(train_set, args.imagenet_weights_portion, args.imagenet_alpha_portion,
                                               args.seed)
    else:
        train_set, num_classes, _ = common.load_dataset(args.dataset, args.data, True, args.image_size)
        if n == 1:
            return (*common.search_loaders(train_set, args.batch_size, args.train_portion, generator, args.workers),
                    num_classes)
        split = int(np.floor(args.train_portion * len(train_set)))
        w_idx, a_idx = list(range(split)), list(range(split, len(train_set)))
    if n == 1:
        return (common.loader(train_set, args.batch_size, True, generator, args.workers, w_idx),
                common.loader(train_set, args.batch_size, True, generator, args.workers, a_idx), num_classes)
    return tuple(common.loader(subset, args.batch_size // n, True, generator, args.workers,
                               sampler=torch.utils.data.DistributedSampler(subset, n, rank, seed=args.seed))
                 for subset in (torch.utils.data.Subset(train_set, w_idx), torch.utils.data.Subset(train_set, a_idx))) \
        + (num_classes,)


def search_scheduler(w_optimizer, args):
    """Cosine from lr to lr_min over the epochs (train_search.py); with --lr-warmup-epochs W the first W
    epochs run at lr (e+1)/W instead (train_search_imagenet.py lines 155-158)."""
    if args.lr_warmup_epochs == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(w_optimizer, args.epochs, eta_min=args.lr_min)

    def factor(e):
        if e < args.lr_warmup_epochs:
            return (e + 1) / args.lr_warmup_epochs
        return (args.lr_min + (args.lr - args.lr_min) * (1 + np.cos(np.pi * e / args.epochs)) / 2) / args.lr

    return torch.optim.lr_scheduler.LambdaLR(w_optimizer, factor)


# =====================================================================================
# Architecture update rule (first-order DARTS, on alpha and beta together)
# =====================================================================================
def first_order_arch_grad(model, x_val, y_val):
    """First order (xi = 0): grad_{alpha,beta} L_val(w, alpha, beta) at the current weights."""
    loss = F.cross_entropy(model(x_val), y_val)
    return list(torch.autograd.grad(loss, model.arch_parameters())), loss.detach()


# =====================================================================================
# Genotype derivation
# =====================================================================================
def derive_genotype(w_normal, w_reduce, steps=4, multiplier=4):
    """DARTS Sec. 2.4 on the given (n_edges, n_ops) weights: for every intermediate node keep the 2
    incoming edges whose strongest non-zero op is largest, and on each the argmax op with 'none'
    excluded (both steps skip 'none'). Ties go to the lower index (stable sort), as in the official
    Network.genotype(). PC-DARTS passes softmax(beta) * softmax(alpha) (Sec. 3.3)."""
    none = PRIMITIVES.index("none")

    def parse(w):  # w: (n_edges, n_ops) edge weights
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


# =====================================================================================
# Search loop
# =====================================================================================
def search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch):
    """One epoch of the alternating bilevel optimisation: per train batch, first an architecture
    step on a val batch (from epoch args.warmup_epochs on), then a weight step on the train batch
    (official order)."""
    model.train()
    steps = min(len(train_data), args.steps_per_epoch or len(train_data))
    progress = common.Progress(log, "search", epoch, steps, args.report_freq, device)
    for step, (x, y) in enumerate(train_data):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x_val, y_val = (t.to(device, non_blocking=True) for t in next(val_iter))
        # ALGO LOGIC: warm-up: weights only for the first warmup_epochs epochs (train_search.py epoch >= 15)
        if epoch >= args.warmup_epochs:
            with common.autocast(device, args.amp):
                grads, _ = first_order_arch_grad(model, x_val, y_val)
            average_across_processes(grads)  # torchrun: the mean over every process's share of the batch
            for a, g in zip(model.arch_parameters(), grads):
                a.grad = g
            common.clip_grad(model.arch_parameters(), args.arch_grad_clip)  # ImageNet search only
            a_optimizer.step()  # Adam on alpha and beta together
        # weight step (SGD on w, grad-norm clip 5; alpha and beta are not clipped)
        w_optimizer.zero_grad(set_to_none=True)
        with common.autocast(device, args.amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        average_across_processes([p.grad for p in model.weight_parameters() if p.grad is not None])
        common.clip_grad(model.weight_parameters(), args.grad_clip)
        w_optimizer.step()
        broadcast_from_rank_0(list(model.buffers()))  # one set of BN running statistics (DDP does the same)
        progress.update(loss.item(), common.accuracy(logits, y))
    return progress.summary()


def peak_memory_mb(device):
    """CUDA: the peak of torch.cuda.max_memory_allocated since the last reset (per epoch); CPU: the
    process's peak resident set size so far (ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # Unix only
    except ImportError:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_beta_evolution(history, path):
    """softmax(beta) of every edge per epoch, one panel per cell type; colour = target node."""
    plt = common.pyplot()
    styles = ["-", "--", ":", "-.", (0, (6, 2, 1, 2, 1, 2))]  # line style = source state 0..4
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for ax, cell in zip(axes, ("normal", "reduce")):
        w = np.asarray([h[cell] for h in history])  # (epochs, n_edges)
        for e, (node, i) in enumerate(common.edge_names(w.shape[1])):
            ax.plot(range(1, len(w) + 1), w[:, e], color=f"C{node - 2}", ls=styles[i], label=f"{i}->{node}",
                    marker="." if len(w) < 30 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("softmax over the node's incoming edges")
        ax.set_title(f"{cell} cell: softmax(beta), Eq. (3)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="edge i->j", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def search(args, device, run_dir, log):
    """Run the search; returns (final genotype, summary). Writes per epoch: search_history.jsonl,
    alphas.jsonl, genotype.json, checkpoint_search.pt; at the end the figures."""
    rank, n_proc = world()
    generator = torch.Generator().manual_seed(args.seed)
    train_data, val_data, num_classes = search_data(args, generator)
    nb201 = args.space == "nb201"
    net = NB201Network(args.init_channels, num_classes, args.layers, args.k, args.track_running_stats) if nb201 \
        else Network(args.init_channels, num_classes, args.layers, args.k, imagenet=args.dataset == "imagenet")
    net.to(device)
    broadcast_from_rank_0(list(net.state_dict().values()))  # torchrun: every process starts from rank 0's supernet
    model = common.speed_up(net, args)
    log.info("supernet: %.3f M weights, K=%d, arch parameters %s",
             sum(p.numel() for p in model.weight_parameters()) / 1e6, args.k,
             [tuple(a.shape) for a in model.arch_parameters()])
    w_optimizer = torch.optim.SGD(model.weight_parameters(), args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay, nesterov=args.nesterov)
    # architect.py: Adam with betas (0.5, 0.999), weight decay 1e-3, on [alphas, betas]
    a_optimizer = torch.optim.Adam(model.arch_parameters(), args.arch_lr, betas=(0.5, 0.999),
                                   weight_decay=args.arch_weight_decay)
    scheduler = search_scheduler(w_optimizer, args)
    start = 0
    if args.resume:  # TRY NOT TO MODIFY: continue after the last finished epoch, bit for bit
        start = common.resume_from(run_dir / "checkpoint_search.pt", "pc_darts", generator, model=model,
                                   w_optimizer=w_optimizer, a_optimizer=a_optimizer, scheduler=scheduler)
        log.info("resuming the search at epoch %d", start)
    history = common.keep_jsonl(run_dir / "search_history.jsonl", start) if rank == 0 else []
    alpha_rows = common.keep_jsonl(run_dir / "alphas.jsonl", start) if rank == 0 else []
    alpha_history, beta_history = [r["softmax"] for r in alpha_rows], [r["beta_softmax"] for r in alpha_rows]
    for epoch in range(start, args.epochs):
        t0 = time.time()
        lr = w_optimizer.param_groups[0]["lr"]
        for data in (train_data, val_data):
            if hasattr(data.sampler, "set_epoch"):  # torchrun: DistributedSampler reshuffles per epoch
                data.sampler.set_epoch(epoch)
        val_iter = common.forever(val_data)  # one pass of the val half per epoch at the 50/50 split
        train = search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch)
        memory = peak_memory_mb(device)  # Progress reset the CUDA peak at the start of the epoch
        val = torch.tensor(common.evaluate(model, val_data, device, args.amp, args.steps_per_epoch), device=device)
        average_across_processes([val])  # torchrun: the mean over the processes' equal shares
        val_loss, val_acc = val.tolist()
        scheduler.step()
        genotype = model.genotype()
        weights, betas, raw_alpha, raw_beta = arch_state(model)
        alpha_history.append(weights)
        beta_history.append(betas)
        row = {"epoch": epoch, "lr": lr, "arch_step": epoch >= args.warmup_epochs, **train,
               "val_loss": val_loss, "val_acc": val_acc, "seconds": time.time() - t0, "peak_memory_MB": memory,
               "genotype": common.genotype_to_dict(genotype), **(common.nb201_epoch_row(args, genotype, log) if nb201 else {})}
        history.append(row)
        if rank != 0:  # rank 0 writes the run folder
            continue
        common.append_jsonl(run_dir / "search_history.jsonl", row)
        common.append_jsonl(run_dir / "alphas.jsonl", {"epoch": epoch, "softmax": weights, "beta_softmax": betas,
                                                       "alpha": raw_alpha, "beta": raw_beta})
        common.write_json(run_dir / "genotype.json", common.genotype_to_dict(genotype))
        log.info("search epoch %d lr %.5f %s train_acc %.2f val_acc %.2f peak memory %.0f MB %.1fs", epoch, lr,
                 "arch+weights" if row["arch_step"] else "warm-up (weights only)", row["train_acc"], val_acc, memory,
                 row["seconds"])
        log.info("genotype %s", genotype)
        # TRY NOT TO MODIFY: checkpoint with everything needed to resume, alphas and betas included
        common.save_checkpoint(run_dir / "checkpoint_search.pt", {
            **common.make_checkpoint("pc_darts", epoch, args, generator, model=model, w_optimizer=w_optimizer,
                                     a_optimizer=a_optimizer, scheduler=scheduler),
            "alphas": {c: torch.tensor(a) for c, a in raw_alpha.items()},
            "betas": {c: torch.tensor(b) for c, b in raw_beta.items()},
            "genotype": common.genotype_to_dict(genotype)})
    genotype = model.genotype()  # also when a resumed run had nothing left to search
    if n_proc > 1:  # the test of the data-parallel search compares these lines across ranks
        flat = torch.cat([a.detach().cpu().flatten() for a in model.arch_parameters()])
        print(f"rank {rank}: arch parameters sha256 {hashlib.sha256(flat.numpy().tobytes()).hexdigest()}", flush=True)
    if rank != 0:
        return genotype, None
    primitives = common.NB201_PRIMITIVES if nb201 else PRIMITIVES
    common.plot_alphas(alpha_history[-1], run_dir / "alphas.png", primitives=primitives)
    common.plot_alpha_evolution(alpha_history, run_dir / "alpha_evolution.png", primitives=primitives)
    if not nb201:  # the NB-201 betas are in alphas.jsonl; the figure's edge labels are the DARTS cell's
        plot_beta_evolution(beta_history, run_dir / "beta_evolution.png")
    if nb201 and "nb201" in history[-1]:
        common.plot_nb201_history(history, run_dir / "nb201.png")
    common.plot_curves(history, ["train_acc", "val_acc"], run_dir / "search_curves.png", "PC-DARTS search")
    summary = {"epochs": len(history), "val_acc": history[-1]["val_acc"], "train_acc": history[-1]["train_acc"],
               "seconds": sum(r["seconds"] for r in history),
               "seconds_per_step": sum(r["seconds_per_step"] for r in history) / len(history),
               "order": "first", "k": args.k, "warmup_epochs": args.warmup_epochs,
               "peak_memory_MB": max(r["peak_memory_MB"] for r in history)}
    return genotype, summary


# =====================================================================================
# main: search -> derive -> retrain -> test
# =====================================================================================
def main(args):
    args, device = common.prepare(args, __file__)  # --resume's flags, the device, every flag's range
    genotype = common.parse_genotype(args.genotype) if args.genotype else None  # fail before any work
    if genotype is None and args.space == "darts" and args.layers < 3:
        raise UsageError(f"--layers must be >=3, got {args.layers} (the DARTS supernet needs a normal cell)")
    if genotype is None and args.init_channels % args.k:
        raise UsageError(f"--init-channels {args.init_channels} must be a multiple of --k {args.k} (the ops get "
                         "C/K channels and the channel shuffle needs K equal groups)")
    if genotype is None and args.warmup_epochs >= args.epochs:
        raise UsageError(f"--warmup-epochs {args.warmup_epochs} leaves no architecture step in --epochs "
                         f"{args.epochs}: the cell would be read off the random initial alpha")
    if genotype is None and args.space == "nb201" and args.dataset == "imagenet":
        raise UsageError("--space nb201 searches the benchmark's CIFAR-size network; the ImageNet search "
                         "(--dataset imagenet) is in the DARTS space")
    n_proc = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun
    if genotype is None and args.batch_size % n_proc:
        raise UsageError(f"--batch-size {args.batch_size} does not split over {n_proc} processes")
    return common.run(args, __file__, "pc_darts", device, genotype, search, distributed_search=True)


if __name__ == "__main__":
    common.cli(main, Args)
