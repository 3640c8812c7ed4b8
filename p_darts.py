"""P-DARTS: Progressive Differentiable Architecture Search.

Xin Chen, Lingxi Xie, Jun Wu, Qi Tian. "Progressive Differentiable Architecture Search: Bridging the
Depth Gap between Search and Evaluation". ICCV 2019. arXiv:1904.12760, https://arxiv.org/abs/1904.12760.
Official code: chenxin061/pdarts @ b880e87, checked against train_search.py, model_search.py,
train_cifar.py and the README commands.

Reproduce the paper (3-stage search, derive the cell with at most M=2 skip-connects, retrain 600 epochs,
test on CIFAR-10):
    python p_darts.py                    # = README: train_search.py --add_layers 6 --add_layers 12
                                         #   --dropout_rate 0.1 --dropout_rate 0.4 --dropout_rate 0.7,
                                         #   then train_cifar.py --auxiliary --cutout
    python p_darts.py --genotype PDARTS  # retrain the published cell only

P-DARTS is first-order DARTS searched in stages. Stage s builds a new supernet from scratch with
L + add_layers[s] cells whose edges carry only the ops that survived stage s-1: (5 cells, 8 ops) ->
(11, 5) -> (17, 3). Weights and alpha are new in every stage; only the op sets carry over.

Equations implemented. The paper states its own rules in prose; we label them (P1)-(P4), here and in
notebooks/p_darts.ipynb. DARTS Eq. (1)-(2) are numbered as in arXiv:1806.09055 v2 (darts.py):
    DARTS Eq. (1)  x_j = sum_{i<j} o_bar^(i,j)(x_i)                          -> SearchCell.forward
    DARTS Eq. (2)  o_bar(x) = sum_{o in O_s(i,j)} softmax(alpha)_o o(x), over the ops that survived
                   to stage s                                                 -> MixedOp.forward
    first order    grad_alpha L_val(w, alpha), its norm clipped to 5           -> first_order_arch_grad
    (P1) search space approximation: after stage s every edge keeps its k_s ops with the largest
         softmax(alpha) (k = 5, 3, 1); after the last stage 'none' is dropped first  -> prune_ops
    (P2) search space regularisation (i): Dropout(p) after every stride-1 skip-connect,
         p(e) = p0 (E - e - 1) / E for e < e_a,  p(e) = p0 exp(-0.2 (e - e_a)) for e >= e_a
         (E = 25 epochs, e_a = 10: the epoch the alpha updates start)        -> skip_dropout_rate
    (P3) derived cell: each edge takes its strongest non-'none' op; node 0 keeps both its edges,
         every later node the 2 edges whose op is strongest                  -> derive_genotype
    (P4) search space regularisation (ii): while the normal cell has more than M = 2 skip-connects,
         delete the weakest of them from alpha and derive again (P3)       -> derive_genotype

Deviations from the paper (each is what the official code does, unless marked "ours"):
    1. alpha is initialised as 1e-3 * N(0, 1) (official: numpy's randn; ours: torch's, so one seed
       drives everything).
    2. ours: the lr scheduler steps at the end of each epoch. The official code steps it first, so
       epoch 0 trains at eta(1) and, with lr_min = 0, the last epoch of every stage trains the
       weights with lr 0 (train_search.py lines 146-148).
    3. Skip-connect dropout p0 per stage, where the paper and the official code differ: the default
       0.1, 0.4, 0.7 is the README's search command, for CIFAR-10 and, with --cifar100 added, for
       CIFAR-100 too; train_search.py alone falls back to 0, 0, 0 unless --dropout_rate is given 3
       times (lines 119-122). The paper's experiments give 0.0, 0.4, 0.7 on CIFAR-10 and 0.1, 0.2,
       0.3 on CIFAR-100 (only a summary of that section was readable here: unverified). We follow
       the README on every dataset; for the paper's CIFAR-100 rates pass --dropout-rate 0.1,0.2,0.3.
    4. ours: the per-stage flags (--add-layers, --add-width, --num-to-keep, --dropout-rate) need one
       value per stage and are checked; the official code silently falls back to its defaults
       (and to no dropout at all) unless each is given exactly 3 times.
    5. The official script prints the genotype for every M = 8..0 and leaves the choice to the user;
       we retrain the one for --max-skip (2, the authors' advice in chenxin061/pdarts#21) and keep
       all of them in log.txt and results.json. Ties follow the official code (the later op and the
       later edge win; pruning drops the earlier op first) and each node lists its inputs in index order.
    6. ours: a genotype is derived after every epoch of every stage (same rules (P3)-(P4) on the
       current stage's weights) for genotype.json and the logs; the official code derives only at
       the end.
    7. ours: one device, no nn.DataParallel. As in the official code each epoch walks the val half
       once for the alpha steps (its iterator is rebuilt per epoch) and evaluates it only in the
       last 4 epochs of each stage (train_search.py line 164, `if epochs - epoch < 5`: epochs 21-24
       of 25; --eval-last 4). ours: --eval-last 0 evaluates every epoch.
    8. ours: alpha are nn.Parameters and every checkpoint holds the stage, the op sets of all stages
       so far, weights, alpha, optimisers, scheduler and RNGs, so a run killed in any stage resumes
       there (official: weights.pt at the end of each stage, no resume).
    9. Retraining is train_cifar.py with the README's --auxiliary --cutout: batch 128, drop path 0.3,
       600 epochs, C=36, 20 cells. ours: one --seed for search and retraining (official 2 and 0).
   10. ours: --amp (bfloat16 autocast, CUDA only) for weight and alpha steps and retraining.
   11. ours: the warm-up is a flag, --warmup-epochs 10 (alias --arch-start-epoch); train_search.py
       hard-codes eps_no_archs = [10, 10, 10] (line 123). Every stage has at least 3 cells (--layers
       >= 3, --add-layers >= 0): with fewer there is no normal cell and its alpha gets no gradient.
   12. --dataset imagenet retrains with P-DARTS's own train_imagenet.py (Args.IMAGENET, --help): batch 256,
       lr 0.1 falling linearly to 0 (slower in the last 5 epochs, adjust_lr lines 185-193), weight decay 3e-5,
       250 epochs, label smoothing 0.1, auxiliary 0.4 with a BatchNorm in its head (model.py line 95), grad
       clip 5, C=48, 14 cells, momentum 0.9, no drop path. Its 5-epoch warm-up (lines 155-158) applies only
       above batch 256: pass --retrain-warmup-epochs 5 with a larger --retrain-batch-size.
   Plus the deviations shared by every method file, listed in common.py's docstring (C1-C5).

Runs: --resume RUN_DIR continues a killed run; under torchrun only retraining is distributed
(README.md, "Resume a killed run" and "Several GPUs").
"""

import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import OPS, PRIMITIVES, Genotype, UsageError, arg

CELLS = ("normal", "reduce")
N_EDGES = 14  # 2 + 3 + 4 + 5 edges into the 4 intermediate nodes


# =====================================================================================
# Args
# =====================================================================================
@dataclasses.dataclass
class Args(common.BaseArgs):
    exp_name: str = arg("p_darts", "name of the method; prefix of the run folder", "run")
    # Algorithm specific arguments (chenxin061/pdarts train_search.py defaults and README command)
    epochs: int = arg(25, "train_search.py --epochs 25 (per stage)", check=">=1")
    batch_size: int = arg(96, "train_search.py --batch_size 96 (train and val streams)", check=">=2")
    lr: float = arg(0.025, "train_search.py --learning_rate 0.025 (weights, SGD)", check=">0")
    lr_min: float = arg(0.0, "train_search.py --learning_rate_min 0.0 (cosine floor, per stage)", check=">=0")
    momentum: float = arg(0.9, "train_search.py --momentum 0.9", check="[0,1)")
    weight_decay: float = arg(3e-4, "train_search.py --weight_decay 3e-4", check=">=0")
    init_channels: int = arg(16, "train_search.py --init_channels 16", check=">=1")
    layers: int = arg(5, "train_search.py --layers 5 (cells in the stage-1 supernet; at least 3, or a stage has no "
                      "normal cell and alphas_normal gets no gradient)", check=">=3")
    grad_clip: float = arg(5.0, "train_search.py --grad_clip 5 (weights); 0 = no clipping", check=">=0")
    arch_grad_clip: float = arg(5.0, "train_search.py clips the alpha gradient with --grad_clip 5 too; "
                                "0 = no clipping", check=">=0")
    train_portion: float = arg(0.5, "train_search.py --train_portion 0.5 (weights / alpha split)", check="(0,1)")
    arch_lr: float = arg(6e-4, "train_search.py --arch_learning_rate 6e-4 (Adam, betas 0.5, 0.999)", check=">0",
                         aliases=("--arch-learning-rate",))
    arch_weight_decay: float = arg(1e-3, "train_search.py --arch_weight_decay 1e-3", check=">=0")
    warmup_epochs: int = arg(10, "(P2) train_search.py eps_no_archs 10: weights only in 0-based epochs 0..N-1 of "
                             "each stage, alpha from epoch N on", check=">=0", aliases=("--arch-start-epoch",))
    add_layers: str = arg("0,6,12", "(P1) cells added to --layers in each stage, each >= 0: 5, 11, 17 cells "
                          "(README --add_layers 6 --add_layers 12; also the code's fallback)")
    add_width: str = arg("0,0,0", "channels added to --init-channels in each stage, each >= 0 "
                         "(train_search.py --add_width)")
    num_to_keep: str = arg("5,3,1", "(P1) ops kept per edge after each stage, so stages search 8, 5, 3 ops "
                           "(train_search.py num_to_keep); the last must be 1")
    dropout_rate: str = arg("0.1,0.4,0.7", "(P2) initial skip-connect dropout p0 per stage, each in [0, 1) (README "
                            "--dropout_rate 0.1 / 0.4 / 0.7; the paper's CIFAR-100 rates: 0.1,0.2,0.3, Deviation 3)")
    dropout_decay: float = arg(0.2, "(P2) p0 exp(-decay (e - e_a)) once alpha is updated (train_search.py "
                               "scale_factor 0.2)", check=">=0")
    max_skip: int = arg(2, "(P4) at most M skip-connects in the normal cell (authors' advice, pdarts#21); "
                        "8 = no limit", check="[0,8]")
    eval_last: int = arg(4, "evaluate the val half in the last N epochs of each stage (train_search.py line 164: "
                         "4); 0 = every epoch", check=">=0")
    # Retraining: train_cifar.py differs from DARTS's train.py in these two defaults (train_cifar.py lines 22, 34)
    retrain_batch_size: int = arg(128, "train_cifar.py --batch_size 128", "retrain", ">=2")
    drop_path_prob: float = arg(0.3, "train_cifar.py --drop_path_prob 0.3 (linear ramp from 0)", "retrain", "[0,1)")

    # --dataset imagenet: chenxin061/pdarts train_imagenet.py (Deviation 12), for flags not typed
    IMAGENET = {"retrain_batch_size": 256,        # line 24 --batch_size 256
                "retrain_lr": 0.1,                # line 25
                "retrain_weight_decay": 3e-5,     # line 27
                "retrain_epochs": 250,            # line 29
                "retrain_init_channels": 48,      # line 30
                "retrain_layers": 14,             # line 31
                "auxiliary": True,                # line 32 flag; the README command passes --auxiliary
                "auxiliary_weight": 0.4,          # line 33
                "drop_path_prob": 0.0,            # line 34
                "retrain_grad_clip": 5.0,         # line 38
                "label_smoothing": 0.1,           # line 39
                "retrain_schedule": "linear",     # line 40 --lr_scheduler linear, adjust_lr lines 185-193
                "retrain_warmup_epochs": 0,       # lines 155-158: warm-up only for batch > 256
                "aux_batchnorm": True}            # model.py line 95: BatchNorm after the 768-channel conv


def stage_settings(args):
    """The per-stage flags -> one dict per stage: cells, channels, ops kept after it, dropout p0.
    Raises UsageError (one line) for lists of different lengths or op counts that cannot work."""
    lists = {}
    for name, kind in (("add_layers", int), ("add_width", int), ("num_to_keep", int), ("dropout_rate", float)):
        flag, text = "--" + name.replace("_", "-"), getattr(args, name)
        try:
            lists[name] = [kind(v) for v in text.split(",")]
        except ValueError:
            raise UsageError(f"{flag} takes comma-separated numbers, one per stage; got {text!r}") from None
        if len(lists[name]) != len(lists["add_layers"]):
            raise UsageError(f"{flag} has {len(lists[name])} values but --add-layers has "
                             f"{len(lists['add_layers'])}: give one value per stage")
    for name, what in (("add_layers", "cells"), ("add_width", "channels")):
        if min(lists[name]) < 0:  # so every stage has >= --layers >= 3 cells
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: each stage adds >= 0 {what}")
    keep = lists["num_to_keep"]
    counts = [len(PRIMITIVES)] + keep  # ops per edge searched in each stage, then kept after the last
    if keep[-1] != 1 or any(not 3 <= k <= n for n, k in zip(counts, keep[:-1])):
        raise UsageError(f"--num-to-keep {args.num_to_keep}: each stage keeps at most the ops it searched "
                         "and at least 3, and the last keeps 1 (official 5,3,1)")
    if any(not 0 <= p < 1 for p in lists["dropout_rate"]):
        raise UsageError(f"--dropout-rate {args.dropout_rate}: rates must be in [0, 1)")
    if args.warmup_epochs >= args.epochs:
        raise UsageError(f"--warmup-epochs {args.warmup_epochs} must be < --epochs {args.epochs}: otherwise "
                         "alpha is never updated")
    stages = [{"cells": args.layers + a, "channels": args.init_channels + w, "keep": k, "dropout": p}
              for a, w, k, p in zip(*lists.values())]
    return stages


# =====================================================================================
# Search space: mixed op over the surviving ops, search cell, supernet of one stage
# =====================================================================================
class MixedOp(nn.Module):
    """The ops of one edge that survived to this stage (names in PRIMITIVES order); search ops have
    affine=False, pools get a BN (official), and a stride-1 skip-connect gets a Dropout (P2)."""

    def __init__(self, C, stride, op_names, p):
        super().__init__()
        self.ops = nn.ModuleList()
        for name in op_names:
            op = OPS[name](C, stride, False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            if name == "skip_connect" and stride == 1 and p > 0:
                # ALGO LOGIC: (P2) operation-level Dropout after the identity (not on stride-2 FactorizedReduce)
                op = nn.Sequential(op, nn.Dropout(p))
            self.ops.append(op)

    def forward(self, x, weights):  # weights: (n_ops,) = softmax(alpha^(i,j)) over the surviving ops
        # ALGO LOGIC: DARTS Eq. (2): o_bar(x) = sum_{o in O_s} softmax(alpha)_o * o(x)
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, ops, p):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.preprocess0, self.preprocess1 = common.cell_preprocess(C_prev_prev, C_prev, C, reduction_prev,
                                                                    affine=False)
        # edge order: node 0 <- states 0,1; node 1 <- 0,1,2; ... (2+3+4+5 = 14 edges for 4 steps)
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):  # ops: the surviving op names of each edge, in edge order
                self.edges.append(MixedOp(C, 2 if reduction and j < 2 else 1, ops[len(self.edges)], p))

    def forward(self, s0, s1, weights):  # weights: (n_edges, n_ops)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            # ALGO LOGIC: DARTS Eq. (1): x_j = sum_{i<j} o_bar^(i,j)(x_i)
            node = sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self.multiplier:], dim=1)  # (B, multiplier*C, H, W)


class Network(nn.Module):
    """The supernet of one stage: stem, `layers` search cells whose edges carry only the surviving
    ops (ops_normal / ops_reduce: 14 lists of op names), global pool, linear. All normal cells
    share alphas_normal (14, n_ops), all reduction cells alphas_reduce."""

    def __init__(self, C, num_classes, layers, ops_normal, ops_reduce, p=0.0, steps=4, multiplier=4,
                 stem_multiplier=3):
        super().__init__()
        self.ops = {"normal": [list(o) for o in ops_normal], "reduce": [list(o) for o in ops_reduce]}
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in common.reduction_layers(layers)
            C_curr = C_curr * 2 if reduction else C_curr
            self.cells.append(SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev,
                                         ops_reduce if reduction else ops_normal, p))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.classifier = nn.Linear(C_prev, num_classes)
        # Deviation 1: 1e-3 * N(0, 1), one column per surviving op (the same number on every edge)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(len(ops_normal), len(ops_normal[0])))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(len(ops_reduce), len(ops_reduce[0])))

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

    def set_skip_dropout(self, p):
        """(P2) the Dropout after every stride-1 skip-connect (the only Dropouts in the supernet)."""
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p

    def weights(self):
        """softmax(alpha) per cell type, (14, n_ops), columns in the order of self.ops[cell][edge]; on the
        CPU, as a resumed run computes them from the checkpoint, so pruning sees the same numbers."""
        return {cell: F.softmax(a.detach().cpu(), -1) for cell, a in zip(CELLS, self.arch_parameters())}

    def genotype(self, max_skip=2):
        w = self.weights()
        return derive_genotype(dense(w["normal"], self.ops["normal"]), dense(w["reduce"], self.ops["reduce"]), max_skip)


def skip_dropout_rate(p0, epoch, epochs, arch_start, decay=0.2):
    """(P2) the skip-connect dropout rate in epoch `epoch` (0-based) of a stage of `epochs` epochs:
    linear decay while only the weights train, then exponential decay once alpha trains. It jumps
    back to p0 at epoch arch_start (train_search.py)."""
    if epoch < arch_start:
        # ALGO LOGIC: (P2) p(e) = p0 (E - e - 1) / E before the alpha updates start
        return p0 * (epochs - epoch - 1) / epochs
    # ALGO LOGIC: (P2) p(e) = p0 exp(-0.2 (e - e_a)) from epoch e_a on
    return p0 * math.exp(-decay * (epoch - arch_start))


# =====================================================================================
# Architecture update rule (first order, as in the official train_search.py)
# =====================================================================================
def first_order_arch_grad(model, x_val, y_val):
    """First order (xi = 0): grad_alpha L_val(w, alpha) at the current weights."""
    loss = F.cross_entropy(model(x_val), y_val)
    return list(torch.autograd.grad(loss, model.arch_parameters())), loss.detach()


# =====================================================================================
# Op pruning between stages and genotype derivation
# =====================================================================================
def prune_ops(ops, weights, keep, drop_none=False):
    """(P1) After a stage, every edge keeps its `keep` ops with the largest softmax weight, listed in
    PRIMITIVES order. ops: 14 lists of op names; weights: (14, n_ops) aligned with them. 'none' may
    survive, except with drop_none (after the last stage: get_min_k_no_zero drops it first). Ties
    drop the earlier op first, as the official repeated np.argmin does."""
    out = []
    for names, row in zip(ops, torch.as_tensor(weights).tolist()):
        candidates = [j for j, name in enumerate(names) if not (drop_none and name == "none")]
        # ALGO LOGIC: (P1) drop the len - k weakest ops of the edge (stable ascending sort)
        dropped = sorted(candidates, key=lambda j: row[j])[:max(0, len(candidates) - keep)]
        out.append([names[j] for j in candidates if j not in dropped])
    return out


def dense(weights, ops):
    """(14, n_ops) weights of one stage -> (14, 8) over PRIMITIVES, NaN where an op was pruned."""
    out = torch.full((len(ops), len(PRIMITIVES)), float("nan"))
    for k, names in enumerate(ops):
        out[k, [PRIMITIVES.index(n) for n in names]] = torch.as_tensor(weights[k], dtype=torch.float32).cpu()
    return out


def edge_index(node, j):
    """Row of the edge from state j into intermediate node `node` (0..3): 0-1, 2-4, 5-8, 9-13."""
    return node * (node + 3) // 2 + j


def derive_genotype(w_normal, w_reduce, max_skip=2, steps=4, multiplier=4):
    """(P3) each edge takes its strongest op that is not 'none' (pruned ops, NaN, never win); node 0
    keeps both its edges, every later node the 2 edges whose op is strongest; genes list each node's
    inputs in index order (official parse_network). Ties go to the later op and the later edge, as
    in the official get_min_k_no_zero and keep_2_branches. (P4) then, in the normal cell only: while
    it has more than max_skip skip-connects, set the weight of its weakest skip-connect to -1 and
    derive again (official delete_min_sk_prob + keep_1_on + keep_2_branches): that edge falls back
    to its next op or loses its place to another edge, whose best op may be another skip-connect.
    w_*: (14, 8) softmax weights over PRIMITIVES."""
    none, skip = PRIMITIVES.index("none"), PRIMITIVES.index("skip_connect")

    def clean(w):
        w = torch.nan_to_num(torch.as_tensor(w, dtype=torch.float64).detach().cpu().clone(), nan=-1.0)
        w[:, none] = -1.0  # 'none' can never win
        return w

    def parse(w):  # w: (n_edges, 8)
        gene, start = [], 0
        for i in range(steps):
            rows = w[start:start + i + 2]  # edges into node i, from states 0 .. i+1
            strength = rows.max(dim=1).values.tolist()
            # ALGO LOGIC: (P3) the 2 strongest incoming edges (node 0 has exactly 2), in input order
            keep = sorted(sorted(range(i + 2), key=lambda j: strength[j])[-2:])
            # each kept edge's strongest op; a tie goes to the later op (the official np.argmin drops the earlier)
            gene += [(PRIMITIVES[len(PRIMITIVES) - 1 - int(rows[j].flip(0).argmax())], j) for j in keep]
            start += i + 2
        return gene

    w_n = clean(w_normal)
    normal = parse(w_n)
    while sum(op == "skip_connect" for op, _ in normal) > max_skip:
        skips = sorted(edge_index(k // 2, j) for k, (op, j) in enumerate(normal) if op == "skip_connect")
        # ALGO LOGIC: (P4) delete the weakest skip-connect of the derived normal cell, then derive again
        w_n[min(skips, key=lambda e: w_n[e, skip].item()), skip] = -1.0
        normal = parse(w_n)
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=normal, normal_concat=concat, reduce=parse(clean(w_reduce)), reduce_concat=concat)


# =====================================================================================
# Search loop
# =====================================================================================
def search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch, train_arch):
    """One epoch of a stage: per train batch, first (from --warmup-epochs on) a first-order alpha
    step on a val batch with its gradient norm clipped, then a weight step on the train batch."""
    model.train()
    steps = min(len(train_data), args.steps_per_epoch or len(train_data))
    progress = common.Progress(log, "search", epoch, steps, args.report_freq, device)
    for step, (x, y) in enumerate(train_data):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if train_arch:
            x_val, y_val = (t.to(device, non_blocking=True) for t in next(val_iter))
            with common.autocast(device, args.amp):
                grads, _ = first_order_arch_grad(model, x_val, y_val)
            for a, g in zip(model.arch_parameters(), grads):
                a.grad = g
            # ALGO LOGIC: P-DARTS clips the alpha gradient too (norm 5); DARTS does not
            common.clip_grad(model.arch_parameters(), args.arch_grad_clip)
            a_optimizer.step()
        # weight step (SGD on w, grad-norm clip 5)
        w_optimizer.zero_grad(set_to_none=True)
        with common.autocast(device, args.amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        common.clip_grad(model.weight_parameters(), args.grad_clip)
        w_optimizer.step()
        progress.update(loss.item(), common.accuracy(logits, y))
    return progress.summary()


def evaluates(epoch, epochs, eval_last):
    """Is the val half evaluated after 0-based epoch `epoch` of a stage? In the last eval_last epochs
    (train_search.py line 164, `if epochs - epoch < 5`, is eval_last = 4); eval_last 0: every epoch."""
    return not eval_last or epoch >= epochs - eval_last


def log_op_sets(log, ops, title):
    """One line per cell type: on how many of the 14 edges each op survives, and the per-edge sets."""
    for cell in CELLS:
        counts = {name: sum(name in e for e in ops[cell]) for name in PRIMITIVES}
        log.info("%s, %s cell: %s", title, cell, ", ".join(f"{k} {v}/14" for k, v in counts.items()))
        log.info("  per edge: %s", ops[cell])


def search(args, device, run_dir, log):
    """Run the stages; returns (final genotype, summary). Writes per epoch: search_history.jsonl,
    alphas.jsonl, genotype.json, checkpoint_search.pt; at the end the figures."""
    stages = stage_settings(args)
    E, S = args.epochs, len(stages)
    generator = torch.Generator().manual_seed(args.seed)
    train_set, num_classes, _ = common.load_dataset(args.dataset, args.data, True, args.image_size)
    train_data, val_data = common.search_loaders(train_set, args.batch_size, args.train_portion, generator,
                                                 args.workers)
    ckpt_path = run_dir / "checkpoint_search.pt"
    stage_ops = [{cell: [list(PRIMITIVES) for _ in range(N_EDGES)] for cell in CELLS}]  # stage 1: all 8 ops
    start, weights = 0, None
    if args.resume and ckpt_path.exists():  # TRY NOT TO MODIFY: the stage's op sets define the network to load
        ckpt = common.load_checkpoint(ckpt_path, "p_darts")
        start, stage_ops = ckpt["epoch"] + 1, ckpt["stage_ops"]
        weights = {cell: F.softmax(a, -1) for cell, a in ckpt["alphas"].items()}
        if start % E == 0:  # killed between two stages: RNGs now, the next stage is built fresh below
            common.resume_from(ckpt_path, "p_darts", generator)
        log.info("resuming the search at epoch %d (stage %d)", start, min(start // E, S - 1) + 1)
    history = common.keep_jsonl(run_dir / "search_history.jsonl", start)
    alpha_rows = common.keep_jsonl(run_dir / "alphas.jsonl", start)
    for stage in range(start // E, S):
        cfg = stages[stage]
        if stage == len(stage_ops):  # ALGO LOGIC: (P1) the previous stage has finished: prune its ops
            stage_ops.append({cell: prune_ops(stage_ops[-1][cell], weights[cell], stages[stage - 1]["keep"])
                              for cell in CELLS})
            log_op_sets(log, stage_ops[-1], f"after stage {stage}")
        ops = stage_ops[stage]
        # ALGO LOGIC: (P1) a new supernet: deeper, only the surviving ops, new weights and alpha
        model = common.speed_up(Network(cfg["channels"], num_classes, cfg["cells"], ops["normal"], ops["reduce"],
                                        cfg["dropout"]).to(device), args)
        w_optimizer = torch.optim.SGD(model.weight_parameters(), args.lr, momentum=args.momentum,
                                      weight_decay=args.weight_decay)
        a_optimizer = torch.optim.Adam(model.arch_parameters(), args.arch_lr, betas=(0.5, 0.999),
                                       weight_decay=args.arch_weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_optimizer, E, eta_min=args.lr_min)
        if start > stage * E:  # TRY NOT TO MODIFY: killed during this stage, continue bit for bit
            common.resume_from(ckpt_path, "p_darts", generator, model=model, w_optimizer=w_optimizer,
                               a_optimizer=a_optimizer, scheduler=scheduler)
        log.info("stage %d/%d: %d cells, C=%d, %d ops per edge, skip dropout p0 %.2f, %.3f M weights", stage + 1, S,
                 cfg["cells"], cfg["channels"], len(ops["normal"][0]), cfg["dropout"],
                 sum(p.numel() for p in model.weight_parameters()) / 1e6)
        for epoch in range(max(start, stage * E), (stage + 1) * E):
            t0, e = time.time(), epoch - stage * E
            lr = w_optimizer.param_groups[0]["lr"]
            p = skip_dropout_rate(cfg["dropout"], e, E, args.warmup_epochs, args.dropout_decay)
            model.set_skip_dropout(p)
            train_arch = e >= args.warmup_epochs  # (P2) weights only for the first epochs of each stage
            val_iter = common.forever(val_data)  # one pass of the val half per epoch at the 50/50 split
            train = search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch,
                                 train_arch)
            val_loss = val_acc = None
            if evaluates(e, E, args.eval_last):
                val_loss, val_acc = common.evaluate(model, val_data, device, args.amp, args.steps_per_epoch)
            scheduler.step()
            weights = model.weights()
            genotype = model.genotype(args.max_skip)
            row = {"epoch": epoch, "stage": stage + 1, "stage_epoch": e, "cells": cfg["cells"], "lr": lr,
                   "skip_dropout": p, "arch_update": train_arch, **train, "val_loss": val_loss, "val_acc": val_acc,
                   "seconds": time.time() - t0, "genotype": common.genotype_to_dict(genotype)}
            history.append(row)
            common.append_jsonl(run_dir / "search_history.jsonl", row)
            full = {cell: [[None if math.isnan(v) else v for v in r] for r in dense(weights[cell], ops[cell]).tolist()]
                    for cell in CELLS}
            alpha_rows.append({"epoch": epoch, "stage": stage + 1, "ops": ops,
                               "softmax": {cell: weights[cell].tolist() for cell in CELLS}, "softmax_full": full,
                               "alpha": {cell: a.tolist() for cell, a in zip(CELLS, model.arch_parameters())}})
            common.append_jsonl(run_dir / "alphas.jsonl", alpha_rows[-1])
            common.write_json(run_dir / "genotype.json", common.genotype_to_dict(genotype))
            log.info("stage %d epoch %d (search epoch %d) lr %.5f skip dropout %.3f%s train_acc %.2f val_acc %s %.1fs",
                     stage + 1, e, epoch, lr, p, " alpha on" if train_arch else "", row["train_acc"],
                     "-" if val_acc is None else f"{val_acc:.2f}", row["seconds"])
            log.info("genotype %s", genotype)
            # TRY NOT TO MODIFY: checkpoint with everything needed to resume, stage and op sets included
            common.save_checkpoint(ckpt_path, {
                **common.make_checkpoint("p_darts", epoch, args, generator, model=model, w_optimizer=w_optimizer,
                                         a_optimizer=a_optimizer, scheduler=scheduler),
                "stage": stage, "stage_epoch": e, "stage_ops": stage_ops,
                "alphas": {"normal": model.alphas_normal.detach().cpu(), "reduce": model.alphas_reduce.detach().cpu()},
                "genotype": common.genotype_to_dict(genotype)})
    # (P1) after the last stage one op per edge is left ('none' dropped first); (P3)-(P4) pick the cell
    final_ops = {cell: prune_ops(stage_ops[-1][cell], weights[cell], stages[-1]["keep"], drop_none=True)
                 for cell in CELLS}
    log_op_sets(log, final_ops, f"after stage {S} (final)")
    w_final = {cell: dense(weights[cell], stage_ops[-1][cell]) for cell in CELLS}
    by_max_skip = {}
    for m in range(8, -1, -1):  # the official menu of genotypes, M = 8 .. 0
        by_max_skip[str(m)] = common.genotype_to_dict(derive_genotype(w_final["normal"], w_final["reduce"], m))
        log.info("at most %d skip-connects: %s", m, by_max_skip[str(m)]["normal"])
    genotype = derive_genotype(w_final["normal"], w_final["reduce"], args.max_skip)
    log.info("final genotype (at most %d skip-connects): %s", args.max_skip, genotype)
    plot_stage_alphas([r["softmax_full"] for r in alpha_rows if (r["epoch"] + 1) % E == 0], genotype, stages,
                      run_dir / "alphas.png")
    common.plot_alpha_evolution([{c: np.nan_to_num(np.array(r["softmax_full"][c], dtype=float)) for c in CELLS}
                                 for r in alpha_rows], run_dir / "alpha_evolution.png")
    common.plot_curves(history, ["train_acc", "val_acc"], run_dir / "search_curves.png",
                       f"P-DARTS search ({S} stages of {E} epochs)")
    summary = {"epochs": len(history), "val_acc": history[-1]["val_acc"], "train_acc": history[-1]["train_acc"],
               "seconds": sum(r["seconds"] for r in history),
               "seconds_per_step": sum(r["seconds_per_step"] for r in history) / len(history),
               "stages": [{"stage": s + 1, "cells": cfg["cells"], "channels": cfg["channels"],
                           "ops_per_edge": len(stage_ops[s]["normal"][0]), "skip_dropout_p0": cfg["dropout"],
                           "val_acc": [r["val_acc"] for r in history if r["stage"] == s + 1][-1],
                           "seconds": sum(r["seconds"] for r in history if r["stage"] == s + 1),
                           "ops": stage_ops[s]} for s, cfg in enumerate(stages)],
               "final_ops": final_ops, "max_skip": args.max_skip, "genotypes_by_max_skip": by_max_skip}
    return genotype, summary


def plot_stage_alphas(stage_weights, genotype, stages, path):
    """The op set shrinking: per stage (columns) and cell type (rows), the final softmax(alpha) of
    that stage over all 8 ops; ops pruned before the stage are blank; boxes mark the derived cell."""
    plt = common.pyplot()
    fig, axes = plt.subplots(2, len(stage_weights), figsize=(4.6 * len(stage_weights), 11), squeeze=False)
    names = [f"{i}->{n}" for n, i in common.edge_names(N_EDGES)]
    for s, w in enumerate(stage_weights):
        for ax, cell in zip(axes[:, s], CELLS):
            m = np.array(w[cell], dtype=float)  # (14, 8), NaN = pruned
            ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=np.nanmin(m), vmax=np.nanmax(m), aspect="auto")
            ax.set_facecolor("0.93")
            if s == len(stage_weights) - 1:  # the values the cell is derived from, and the derived cell
                for (r, c), v in np.ndenumerate(m):
                    if not np.isnan(v):
                        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
                for k, (op, j) in enumerate(getattr(genotype, cell)):
                    ax.add_patch(plt.Rectangle((PRIMITIVES.index(op) - 0.5, edge_index(k // 2, j) - 0.5), 1, 1,
                                               fill=False, ec="red", lw=2))
            ax.set_xticks(range(len(PRIMITIVES)), PRIMITIVES, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(N_EDGES), names, fontsize=7)
            n_ops = int((~np.isnan(m[0])).sum())
            ax.set_title(f"stage {s + 1}: {stages[s]['cells']} cells, {n_ops} ops\n{cell} cell", fontsize=9)
    fig.suptitle("softmax(alpha) at the end of each stage (colours relative per panel; blank: pruned; "
                 "red: derived cell)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# =====================================================================================
# main: search -> derive -> retrain -> test
# =====================================================================================
def main(args):
    args, device = common.prepare(args, __file__)  # --resume's flags, the device, every flag's range
    genotype = common.parse_genotype(args.genotype) if args.genotype else None  # fail before any work
    if genotype is None:
        stage_settings(args)  # inconsistent per-stage flags fail before any work
    return common.run(args, __file__, "p_darts", device, genotype, search)


if __name__ == "__main__":
    common.cli(main, Args)
