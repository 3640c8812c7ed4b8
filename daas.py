"""DAAS / DA2S: Discretization-Aware Architecture Search.

Yunjie Tian, Chang Liu, Lingxi Xie, Jianbin Jiao, Qixiang Ye. Pattern Recognition 2021.
arXiv:2007.03154, https://arxiv.org/abs/2007.03154. Official code: sunsmarterjie/DAAS @ d1970b5
(cnn/), checked against train_search.py, model_search.py, architect.py, MinEntropyLoss.py,
dimension.py, genotypes.py. This file is darts.py with what DAAS changed: `diff darts.py daas.py`.

DAAS is first-order DARTS plus edge weights beta and two losses that push the supernet towards the
cell that will be derived from it (one op per edge, two input edges per node), so that pruning it
at the end costs little accuracy. That accuracy drop (supernet vs derived cell with the inherited
weights) is logged every epoch (discretization_gap), and the same evaluator runs on a darts.py
supernet (notebooks/daas.ipynb, section 8).

Reproduce the paper (search, derive the cell, retrain 600 epochs, test on CIFAR-10):
    python daas.py                         # 50 epochs, alpha frozen in epochs 0-6 (train_search.py --interval 8)
    python daas.py --loss-weight 0         # ablation: the DAAS supernet without its losses

Equations implemented. Only the abstract and introduction of arXiv:2007.03154 were readable here, so the
numbers are ours (notebooks/daas.ipynb uses the same); the formulas are those of the official code
(MinEntropyLoss.py, dimension.py, model_search.py). Where the paper's formulas differ (as transcribed by
third-party summaries of its Sec. 3, not checked against the PDF), Deviation 2 says how:
    Eq. (1)  x_i = sum_{j<i} b_{j,i} o_bar^(j,i)(x_j), b = n_i softmax(min(beta_i, 1)) for the nodes
             3, 4, 5 (n_i = 3, 4, 5 inputs), b = 1 for node 2      -> SearchCell.forward, edge_weights
    Eq. (2)  o_bar(x) = sum_o softmax(S(alpha))_o o(x), S(t) = 2t if 2t >= -1 else (2t)^3
                                                                 -> MixedOp.forward, strengthen
    Eq. (3)  L_O(alpha) = sum_cells sum_edges H(softmax(S(alpha_e))), H(p) = -sum p log p -> op_loss
    Eq. (4)  L_E(beta) = sum_cells sum_nodes 3..5 [w (sum_j clip(beta_j, 0, 1) - 2)^2
                                                   + H(softmax(min(beta, 1)))]          -> edge_loss
    Eq. (5)  L = L_C + lambda_c(t) (lambda_alpha(t) L_O + lambda_beta L_E), L_C = cross-entropy;
             first-order DARTS: Adam on (alpha, beta) with L on a val batch, SGD on w -> arch_grad
    Eq. (6)  lambda_c(t) = lambda_0 (t - 1) / (T - 1), epochs t = 1..T         -> lambda_c
    Eq. (7)  lambda_alpha(t) = 0 for t < E, log(t - E + 1) / log(T - E) after -> lambda_alpha
    derived cell: nodes 3-5 keep their 2 inputs of largest beta, every kept edge its argmax op
                                                                         -> derive_genotype
    discretization gap: accuracy of the supernet minus that of the derived cell run with the
             supernet's own (inherited) weights                         -> discretization_gap

Deviations from the paper (each is what the official code does, unless marked "ours"):
    1. ours: the official forward weights the NORMAL cells with beta_reduce and the REDUCTION cells
       with beta_normal (model_search.py lines 123-134), while genotype() prunes the normal cell with
       beta_normal (line 229). Here each cell type uses its own beta. The losses are symmetric in the
       two, so the official search differs from ours only through which beta the val loss trains.
    2. The paper (as transcribed, see above) writes L_O as the entropy of softmax(alpha) and L_E per node
       as the entropy of softmax(beta) plus (sum_j beta_j - 2)^2 with weight 1. The official code, followed
       here, sharpens alpha with S in L_O and in the forward (MinEntropyLoss.py lines 22-26, model_search.py
       line 124), clips beta to min(beta, 1) and sums only its positive entries (MinEntropyLoss.py lines
       36-39), and weights the sum term with w = 0.2 (line 28); --edge-sum-weight 1 gives the paper's
       weight. Not readable here, taken from the code: lambda_0 = 0.1 (train_search.py --aux_weight), lambda_beta = 4
       (MinEntropyLoss.py line 46), the schedules of Eq. (6)-(7) (dimension.py lines 12-13 and 51-52) and
       b = n_i softmax(min(beta, 1)) (model_search.py lines 65-71).
    3. With w = 0.2 the global minimum of a node's L_E term is ONE active edge (value w), not two
       (value log 2): the two-edge point is only a local minimum (for w > 1/8), the one gradient
       descent reaches from the official init 2/n_i (notebook section 4; tests). Pass
       --edge-sum-weight above log 2 = 0.693 to make two edges the global minimum.
    4. alpha's Adam lr is 0 in 0-based epochs 0..6 (--warmup-epochs 7): train_search.py --interval 8
       (line 31) calls architect.set() when the 1-based epoch (line 116) equals 8 (lines 153-154), which
       gives alpha its lr from then on (architect.py lines 21, 46-49). alpha is frozen while its Adam
       moments still accumulate; beta trains from epoch 0.
    5. ours: T in Eq. (6)-(7) is --epochs and E = --warmup-epochs + 1 (the first 1-based epoch alpha
       moves); dimension.py hard-codes EP = 50 and E = 8 (lines 5, 40), the same at the defaults.
       max(T - 1, 1) and max(T - E, 2) only guard runs shorter than E + 2 epochs.
    6. The op set has no 'none' (official genotypes.py), 7 ops; alpha init 1e-4 N(0, 1), beta init
       2/n_i + 1e-4 N(0, 1) (official writes 0.666 for 2/3); node 2 has no beta (official).
    7. Genotype (official model_search.py lines 189-232): the 2 inputs of largest beta for nodes 3-5,
       the argmax op on each kept edge; within a node the two kept edges are listed by the strongest op
       weight of softmax(alpha) (lines 198-200 on line 231's softmax, no S), as here. The order decides
       which edge of a node is built first in the retrained cell (their random init) and how genotype.png
       draws it. Ties of beta go to the lower input index (official: to the higher).
    8. ours: H is computed as -sum p log_softmax(z), which stays finite when p underflows; the official
       torch.log(softmax) gives 0 * -inf = nan once S(alpha) < -104.
    9. First order only (official default; the official --unrolled path crashes: architect.py line 57
       calls model._loss without the epoch argument that model_search.py line 140 requires).
   10. ours, as darts.py: the scheduler steps at the end of each epoch (train_search.py lines 117-118
       step it first); each epoch walks the shuffled val half once (official: next(iter(valid_queue)) per
       step, line 149); alpha and beta are nn.Parameters, so checkpoints hold them; the weight step
       minimises L_C only, which has the same gradient in w as Eq. (5) (the losses of Eq. (3)-(4) do not
       depend on w).
   11. ours: the discretization gap is measured every epoch on the val half. The paper's protocol
       (BN statistics, data) could not be read; we log the derived cell with the supernet's BN
       running statistics (disc_val_acc, weights and statistics inherited as they are) and with BN
       statistics re-estimated on --bn-batches train batches (disc_val_acc_bn). Each kept edge has
       weight 1, as in the retrained cell; the DAAS supernet's own kept edges weigh n_i/2 at a
       two-edge optimum (Eq. (1)), a scale that only the re-estimated statistics absorb (notebook
       section 8 measures both).
   12. Retraining: the DARTS protocol of common.retrain (official cnn/train.py is DARTS's; auxiliary
       towers and cutout on, as the README command passes them).
   13. ours: the searched cell is derived after the last epoch; train_search.py logs model.genotype() at
       the start of each epoch (lines 121-122), so its last logged cell is the one before epoch 50 trains.
   14. --dataset imagenet retrains with DARTS's recipe (common.IMAGENET_RETRAIN_ARGS): the official
       cnn/train_imagenet.py is DARTS's (lines 24-42: batch 128, lr 0.1, weight decay 3e-5, StepLR gamma
       0.97 per epoch, label smoothing 0.1, auxiliary 0.4, grad clip 5, C=48, 14 cells, no drop path, and
       no BatchNorm in the auxiliary head, model.py lines 98-100), so Args has no IMAGENET of its own.
   Plus the deviations shared by every method file, listed in common.py's docstring (C1-C5).

Runs: --resume RUN_DIR continues a killed run (README.md, "Resume a killed run").
"""

import dataclasses
import math
import time
from itertools import islice

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import OPS, PRIMITIVES as DARTS_PRIMITIVES, Genotype, UsageError, arg

PRIMITIVES = [p for p in DARTS_PRIMITIVES if p != "none"]  # official genotypes.py comments out 'none'


# =====================================================================================
# Args
# =====================================================================================
@dataclasses.dataclass
class Args(common.BaseArgs):
    exp_name: str = arg("daas", "name of the method; prefix of the run folder", "run")
    # Algorithm specific arguments (sunsmarterjie/DAAS cnn/train_search.py defaults, lines 27-51)
    epochs: int = arg(50, "train_search.py --epochs 50 (also EP of dimension.py's schedules)", check=">=1")
    batch_size: int = arg(64, "train_search.py --batch_size 64 (train and val streams)", check=">=2")
    lr: float = arg(0.025, "train_search.py --learning_rate 0.025 (weights, SGD)", check=">0")
    lr_min: float = arg(0.001, "train_search.py --learning_rate_min 0.001 (cosine floor)", check=">=0")
    momentum: float = arg(0.9, "train_search.py --momentum 0.9", check="[0,1)")
    weight_decay: float = arg(3e-4, "train_search.py --weight_decay 3e-4", check=">=0")
    init_channels: int = arg(16, "train_search.py --init_channels 16", check=">=1")
    layers: int = arg(8, "train_search.py --layers 8 (cells in the supernet; at least 3: reduction cells sit at "
                      "layers//3 and 2*layers//3, so fewer cells have no normal cell and its alpha and beta would "
                      "be trained by the losses alone)", check=">=3")
    grad_clip: float = arg(5.0, "train_search.py --grad_clip 5 (weights only); 0 = no clipping", check=">=0")
    train_portion: float = arg(0.5, "train_search.py --train_portion 0.5 (weights / arch split)", check="(0,1)")
    arch_lr: float = arg(3e-4, "train_search.py --arch_lr_alpha 3e-4 (Adam on alpha, after --warmup-epochs)",
                         check=">0", aliases=("--arch-lr-alpha",))
    arch_lr_beta: float = arg(3e-4, "train_search.py --arch_lr_beta 3e-4 (Adam on beta, from epoch 0)", check=">0")
    arch_weight_decay: float = arg(1e-3, "train_search.py --arch_weight_decay 1e-3", check=">=0")
    warmup_epochs: int = arg(7, "alpha is not updated in 0-based epochs 0..N-1 (train_search.py --interval 8: "
                             "alpha's lr is set in 1-based epoch 8, lines 153-154); E = N + 1 in Eq. (7)",
                             check=">=0")
    loss_weight: float = arg(0.1, "lambda_0 of Eq. (6) (train_search.py --aux_weight 0.1); 0 turns the DAAS "
                             "losses off", check=">=0")
    lambda_beta: float = arg(4.0, "lambda_beta of Eq. (5) (MinEntropyLoss.py line 46: 4 * loss3)", check=">=0")
    edge_sum_weight: float = arg(0.2, "w of Eq. (4) (MinEntropyLoss.py line 28: w = 0.2; the paper: 1); > log 2 "
                                 "makes two edges the global minimum (Deviations 2-3)", check=">=0")
    bn_batches: int = arg(20, "ours: train batches that re-estimate BN statistics for disc_val_acc_bn; 0 = skip",
                          check=">=0")


# =====================================================================================
# Search space: mixed op, search cell, supernet
# =====================================================================================
def strengthen(alpha):
    """S(t) = 2t if 2t >= -1 else (2t)^3 (MinEntropyLoss.py streng_func): sharper softmax, and weak
    ops pushed down faster. Continuous at 2t = -1 and increasing, so argmax is unchanged."""
    x = 2 * alpha
    return torch.where(x >= -1, x, x ** 3)


def edge_weights(beta):
    """Eq. (1): b = n softmax(min(beta, 1)) for a node with n inputs (streng_func2 is min(., 1));
    a uniform beta gives every edge weight 1, as in DARTS."""
    clipped = torch.where(beta < 1, beta, torch.ones_like(beta))
    return len(beta) * F.softmax(clipped, dim=-1)


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

    def forward(self, x, weights):  # weights: (n_ops,) = softmax(S(alpha^(i,j)))
        # ALGO LOGIC: Eq. (2): o_bar(x) = sum_o softmax(S(alpha))_o * o(x)
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

    def forward(self, s0, s1, weights, betas):  # weights: (n_edges, n_ops); betas[i-1]: (i+2,) for node i >= 1
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for i in range(self.steps):
            b = edge_weights(betas[i - 1]) if i > 0 else [1.0] * len(states)
            # ALGO LOGIC: Eq. (1): x_i = sum_{j<i} b_{j,i} o_bar^(j,i)(x_j)
            node = sum(b[j] * self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self.multiplier:], dim=1)  # (B, multiplier*C, H, W)


class Network(nn.Module):
    """The DARTS supernet without 'none', plus edge weights beta for the nodes with > 2 inputs: all
    normal cells share alphas_normal and betas_normal, all reduction cells the _reduce ones."""

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
        # Deviation 6: official init 1e-4 * N(0, 1) for alpha, 2/n + 1e-4 * N(0, 1) for beta (sum = 2)
        self.alphas_normal = nn.Parameter(1e-4 * torch.randn(n_edges, len(PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-4 * torch.randn(n_edges, len(PRIMITIVES)))
        self.betas_normal = nn.ParameterList(2 / n + 1e-4 * torch.randn(n) for n in range(3, steps + 2))
        self.betas_reduce = nn.ParameterList(2 / n + 1e-4 * torch.randn(n) for n in range(3, steps + 2))

    def forward(self, x):
        w_normal = F.softmax(strengthen(self.alphas_normal), dim=-1)
        w_reduce = F.softmax(strengthen(self.alphas_reduce), dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            # ALGO LOGIC: Deviation 1: each cell type with its own beta (official: swapped)
            if cell.reduction:
                s0, s1 = s1, cell(s0, s1, w_reduce, self.betas_reduce)
            else:
                s0, s1 = s1, cell(s0, s1, w_normal, self.betas_normal)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))

    def arch_parameters(self):
        return [self.alphas_normal, self.alphas_reduce]

    def beta_parameters(self):
        return [*self.betas_normal, *self.betas_reduce]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith(("alphas_", "betas_"))]

    def op_weights(self):
        return {"normal": F.softmax(strengthen(self.alphas_normal), -1),
                "reduce": F.softmax(strengthen(self.alphas_reduce), -1)}

    def genotype(self):
        # Deviation 7: official genotype() parses softmax(alpha), not the forward's softmax(S(alpha)):
        # the same argmax op, but S can change which kept edge of a node is listed first
        return derive_genotype(F.softmax(self.alphas_normal, -1), F.softmax(self.alphas_reduce, -1),
                               [b.detach() for b in self.betas_normal], [b.detach() for b in self.betas_reduce])


# =====================================================================================
# Architecture update rule: the discretization losses and their schedules
# =====================================================================================
def entropy(z):
    """H(softmax(z)) = -sum_k p_k log p_k along the last dim, with log p from log_softmax (Deviation 8)."""
    return -(F.softmax(z, dim=-1) * F.log_softmax(z, dim=-1)).sum(-1)


def op_loss(alphas):
    """Eq. (3): L_O = sum_cells sum_edges H(softmax(S(alpha_e))); 0 iff every edge is one-hot."""
    # ALGO LOGIC: Eq. (3): L_O = sum_e H(softmax(S(alpha_e))), alphas: [(n_edges, n_ops)] per cell type
    return sum(entropy(strengthen(a)).sum() for a in alphas)


def edge_loss(betas, w=0.2, target=2):
    """Eq. (4): L_E = sum_nodes [w (sum_j clip(beta_j, 0, 1) - 2)^2 + H(softmax(min(beta, 1)))] over the
    beta vectors of nodes 3-5 of both cells. sum_j clip(beta_j, 0, 1) is the official
    torch.sum(Beta[Beta > 0]) of Beta = min(beta, 1)."""
    total = 0.0
    for beta in betas:
        clipped = torch.where(beta < 1, beta, torch.ones_like(beta))  # min(beta, 1), official streng_func2
        # ALGO LOGIC: Eq. (4): w (sum_j clip(beta_j, 0, 1) - 2)^2 + H(softmax(min(beta, 1)))
        total = total + w * (clipped.relu().sum() - target) ** 2 + entropy(clipped)
    return total


def lambda_c(t, epochs, lambda_0=0.1):
    """Eq. (6): lambda_c(t) = lambda_0 (t - 1) / (T - 1), linear 0 -> lambda_0 over epochs t = 1..T."""
    # ALGO LOGIC: Eq. (6): lambda_0 (t - 1) / (T - 1)   (dimension.py linear)
    return lambda_0 * (t - 1) / max(epochs - 1, 1)


def lambda_alpha(t, epochs, start=8):
    """Eq. (7): 0 before epoch E, then log(t - E + 1) / log(T - E): 0 at E, log 43 / log 42 = 1.0063 at
    t = T = 50, E = 8 (dimension.py log_ as written)."""
    # ALGO LOGIC: Eq. (7): 0 for t < E, else log(t - E + 1) / log(T - E)
    return 0.0 if t < start else math.log(t - start + 1) / math.log(max(epochs - start, 2))


def alpha_lr(epoch, args):
    """Deviation 4: alpha's Adam lr in the 0-based epoch; 0 during the warm-up (official architect.set())."""
    return args.arch_lr if epoch >= args.warmup_epochs else 0.0


def arch_grad(model, x_val, y_val, coef_alpha, coef_beta, w=0.2):
    """Eq. (5) on a val batch, first order: grad_(alpha, beta) of
    L_C + lambda_c lambda_alpha L_O + lambda_c lambda_beta L_E, with coef_alpha = lambda_c lambda_alpha
    and coef_beta = lambda_c lambda_beta. Returns (grads for alphas + betas, (L_C, L_O, L_E))."""
    params = model.arch_parameters() + model.beta_parameters()
    loss_c = F.cross_entropy(model(x_val), y_val)  # float32 under --amp autocast
    loss_o, loss_e = op_loss(model.arch_parameters()), edge_loss(model.beta_parameters(), w)
    # ALGO LOGIC: Eq. (5): L = L_C + lambda_c (lambda_alpha L_O + lambda_beta L_E)
    loss = loss_c + coef_alpha * loss_o + coef_beta * loss_e
    return list(torch.autograd.grad(loss, params)), (loss_c.detach(), loss_o.detach(), loss_e.detach())


# =====================================================================================
# Genotype derivation and the discretization gap
# =====================================================================================
def derive_genotype(w_normal, w_reduce, b_normal, b_reduce, steps=4, multiplier=4):
    """Official genotype(): node 2 keeps both inputs; nodes 3-5 keep the 2 inputs with the largest
    beta; every kept edge gets its argmax op (no 'none' in the op set). The two kept edges are listed
    by their strongest op weight, as DARTS lists them (model_search.py lines 198-200). w_*: (n_edges,
    n_ops) op weights, softmax(alpha) in the official rule (line 231); b_*: beta vectors of nodes 3..5."""
    def parse(w, betas):
        w, betas = w.detach().cpu(), [b.tolist() for b in betas]
        gene, start = [], 0
        for i in range(steps):
            rows = w[start:start + i + 2]  # edges into node i, from states 0 .. i+1
            # ALGO LOGIC: top-2 inputs by beta (node 2 has exactly 2); stable sort: ties to the lower index
            kept = range(2) if i == 0 else sorted(range(i + 2), key=lambda j: -betas[i - 1][j])[:2]
            strength = rows.max(dim=1).values.tolist()
            keep = sorted(kept, key=lambda j: -strength[j])
            gene += [(PRIMITIVES[int(rows[j].argmax())], j) for j in keep]
            start += i + 2
        return gene

    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=parse(w_normal, b_normal), normal_concat=concat, reduce=parse(w_reduce, b_reduce),
                    reduce_concat=concat)


def discrete_forward(model, x, genotype, primitives=PRIMITIVES):
    """The derived cell run with the supernet's own modules (inherited weights): every node is the
    sum of its two kept edges, each the chosen op with weight 1, i.e. op weights one-hot on the kept
    edges and zero elsewhere, no beta. Only reads stem / cells / classifier and each cell's
    preprocess0/1, edges[k].ops, steps, multiplier, reduction, so it also runs on darts.Network
    (pass primitives=common.PRIMITIVES there)."""
    s0 = s1 = model.stem(x)
    for cell in model.cells:
        edges = genotype.reduce if cell.reduction else genotype.normal
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        offset = 0
        for i in range(cell.steps):
            node = sum(cell.edges[offset + j].ops[primitives.index(op)](states[j]) for op, j in edges[2 * i:2 * i + 2])
            offset += len(states)
            states.append(node)
        s0, s1 = s1, torch.cat(states[-cell.multiplier:], dim=1)  # (B, multiplier*C, H, W)
    return model.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


@torch.no_grad()
def discretization_gap(model, genotype, val_data, device, primitives=PRIMITIVES, amp=False, max_steps=0,
                       calib_data=None, bn_batches=0):
    """Accuracy (%) on val_data of the supernet and of its derived cell with inherited weights:
    val_loss, val_acc (supernet), disc_val_acc (derived cell, BN running statistics as the supernet left them),
    disc_val_acc_bn (the same after re-estimating every BN's statistics on bn_batches batches of
    calib_data, then put back), gap = val_acc - disc_val_acc. Leaves the model as it found it."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [({k: v.clone() for k, v in m.state_dict().items()}, m.momentum) for m in bns]
    val_loss, val_acc = common.evaluate(model, val_data, device, amp, max_steps)
    out = {"val_loss": val_loss, "val_acc": val_acc}
    for key, n in (("disc_val_acc", 0), ("disc_val_acc_bn", bn_batches)):
        if key == "disc_val_acc_bn":
            if not n or calib_data is None:
                continue
            model.train()
            for m in bns:  # cumulative average over the calibration batches
                m.reset_running_stats()
                m.momentum = None
            for x, _ in islice(calib_data, n):
                with common.autocast(device, amp):
                    discrete_forward(model, x.to(device, non_blocking=True), genotype, primitives)
        model.eval()
        correct, total = 0, 0
        for step, (x, y) in enumerate(val_data):
            if max_steps and step >= max_steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with common.autocast(device, amp):
                logits = discrete_forward(model, x, genotype, primitives)
            correct, total = correct + (logits.argmax(1) == y).sum().item(), total + y.numel()
        out[key] = 100.0 * correct / max(total, 1)
    for m, (state, momentum) in zip(bns, saved):
        m.load_state_dict(state)
        m.momentum = momentum
    out["gap"] = out["val_acc"] - out["disc_val_acc"]
    return out


@torch.no_grad()
def discreteness(model):
    """How close the supernet is to its derived cell, per cell type: op_onehot = mean over edges of
    max_o softmax(S(alpha))_o (1 = one-hot), edge_top2 = mean over nodes 3-5 of the share of the two
    largest edge weights b / n (2/n at init, 1 = exactly two active edges)."""
    w = model.op_weights()
    out = {}
    for cell, betas in (("normal", model.betas_normal), ("reduce", model.betas_reduce)):
        share = [edge_weights(b).topk(2).values.sum().item() / len(b) for b in betas]
        out[cell] = {"op_onehot": w[cell].max(-1).values.mean().item(), "edge_top2": sum(share) / len(share)}
    return out


# =====================================================================================
# Search loop
# =====================================================================================
def search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch):
    """One epoch of first-order DARTS with the DAAS loss: per train batch, an architecture step on a
    val batch (Adam on alpha and beta, Eq. (5)), then a weight step on the train batch."""
    model.train()
    lam_c = lambda_c(epoch + 1, args.epochs, args.loss_weight)  # the official schedules count epochs from 1
    coef_alpha = lam_c * lambda_alpha(epoch + 1, args.epochs, args.warmup_epochs + 1)  # E = N + 1
    coef_beta = lam_c * args.lambda_beta
    steps = min(len(train_data), args.steps_per_epoch or len(train_data))
    progress = common.Progress(log, "search", epoch, steps, args.report_freq, device)
    for step, (x, y) in enumerate(train_data):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x_val, y_val = (t.to(device, non_blocking=True) for t in next(val_iter))
        # ALGO LOGIC: architecture step (Adam on alpha and beta) with the DAAS loss of Eq. (5)
        with common.autocast(device, args.amp):
            grads, _ = arch_grad(model, x_val, y_val, coef_alpha, coef_beta, args.edge_sum_weight)
        for a, g in zip(model.arch_parameters() + model.beta_parameters(), grads):
            a.grad = g
        a_optimizer.step()
        # weight step (SGD on w, grad-norm clip 5): Eq. (5) in w is L_C alone (Deviation 10)
        w_optimizer.zero_grad(set_to_none=True)
        with common.autocast(device, args.amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        common.clip_grad(model.weight_parameters(), args.grad_clip)
        w_optimizer.step()
        progress.update(loss.item(), common.accuracy(logits, y))
    return progress.summary()


def plot_discretization(history, path):
    """Per epoch: how one-hot the op weights are and how much of each node's edge weight its top-2
    inputs hold (1 = the derived cell), and each node's edge weights b / n, per cell type."""
    plt = common.pyplot()
    epochs = [r["epoch"] + 1 for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for cell, style in (("normal", "-"), ("reduce", "--")):
        for key in ("op_onehot", "edge_top2"):
            axes[0].plot(epochs, [r["discreteness"][cell][key] for r in history], style, marker=".",
                         label=f"{cell}: {key}")
    axes[0].set_ylim(0, 1.02)
    axes[0].set_title("1 = supernet equals its derived cell")
    for ax, cell in zip(axes[1:], ("normal", "reduce")):
        for i, node in enumerate(history[0]["edge_weights"][cell]):
            for j in range(len(node)):
                ax.plot(epochs, [r["edge_weights"][cell][i][j] / len(node) for r in history], f"C{i}",
                        alpha=0.8, label=f"node {i + 3}" if j == 0 else None)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{cell} cell: edge weights b / n of nodes 3-5 (kept: 0.5)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def search(args, device, run_dir, log):
    """Run the search; returns (final genotype, summary). Writes per epoch: search_history.jsonl,
    alphas.jsonl, genotype.json, checkpoint_search.pt; at the end the figures."""
    generator = torch.Generator().manual_seed(args.seed)
    train_set, num_classes, _ = common.load_dataset(args.dataset, args.data, True, args.image_size)
    train_data, val_data = common.search_loaders(train_set, args.batch_size, args.train_portion, generator,
                                                 args.workers)
    model = common.speed_up(Network(args.init_channels, num_classes, args.layers).to(device), args)
    log.info("supernet: %.3f M weights, alphas %s, betas %s", sum(p.numel() for p in model.weight_parameters()) / 1e6,
             [tuple(a.shape) for a in model.arch_parameters()], [tuple(b.shape) for b in model.betas_normal])
    w_optimizer = torch.optim.SGD(model.weight_parameters(), args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay)
    # architect.py: Adam with betas (0.5, 0.999), weight decay 1e-3; alpha and beta in two groups
    a_optimizer = torch.optim.Adam([{"params": model.arch_parameters(), "lr": alpha_lr(0, args)},
                                    {"params": model.beta_parameters(), "lr": args.arch_lr_beta}],
                                   betas=(0.5, 0.999), weight_decay=args.arch_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_optimizer, args.epochs, eta_min=args.lr_min)
    start = 0
    if args.resume:  # TRY NOT TO MODIFY: continue after the last finished epoch, bit for bit
        start = common.resume_from(run_dir / "checkpoint_search.pt", "daas", generator, model=model,
                                   w_optimizer=w_optimizer, a_optimizer=a_optimizer, scheduler=scheduler)
        log.info("resuming the search at epoch %d", start)
    history = common.keep_jsonl(run_dir / "search_history.jsonl", start)
    alpha_history = [r["softmax"] for r in common.keep_jsonl(run_dir / "alphas.jsonl", start)]
    for epoch in range(start, args.epochs):
        t0 = time.time()
        lr = w_optimizer.param_groups[0]["lr"]
        # ALGO LOGIC: Deviation 4: alpha's lr is 0 in the warm-up epochs 0..N-1 (official architect.set())
        a_optimizer.param_groups[0]["lr"] = alpha_lr(epoch, args)
        val_iter = common.forever(val_data)  # one pass of the val half per epoch at the 50/50 split
        train = search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch)
        genotype = model.genotype()
        # ALGO LOGIC: supernet vs derived cell with inherited weights on the val half
        gap = discretization_gap(model, genotype, val_data, device, PRIMITIVES, args.amp, args.steps_per_epoch,
                                 train_data, args.bn_batches)
        scheduler.step()
        with torch.no_grad():
            loss_o, loss_e = op_loss(model.arch_parameters()).item(), edge_loss(model.beta_parameters(),
                                                                                  args.edge_sum_weight).item()
            weights = {k: v.tolist() for k, v in model.op_weights().items()}
            b = {"normal": [edge_weights(x).tolist() for x in model.betas_normal],
                 "reduce": [edge_weights(x).tolist() for x in model.betas_reduce]}
        alpha_history.append(weights)
        t = epoch + 1
        row = {"epoch": epoch, "lr": lr, "alpha_lr": a_optimizer.param_groups[0]["lr"],
               "lambda_c": lambda_c(t, args.epochs, args.loss_weight),
               "lambda_alpha": lambda_alpha(t, args.epochs, args.warmup_epochs + 1),
               **train, **gap,
               "loss_O": loss_o, "loss_E": loss_e, "discreteness": discreteness(model), "edge_weights": b,
               "seconds": time.time() - t0,
               "genotype": common.genotype_to_dict(genotype)}
        history.append(row)
        common.append_jsonl(run_dir / "search_history.jsonl", row)
        common.append_jsonl(run_dir / "alphas.jsonl", {
            "epoch": epoch, "softmax": weights, "edge_weights": b,
            "alpha": {"normal": model.alphas_normal.tolist(), "reduce": model.alphas_reduce.tolist()},
            "beta": {"normal": [x.tolist() for x in model.betas_normal],
                     "reduce": [x.tolist() for x in model.betas_reduce]}})
        common.write_json(run_dir / "genotype.json", common.genotype_to_dict(genotype))
        log.info("search epoch %d lr %.5f train_acc %.2f val_acc %.2f disc_val_acc %.2f (BN re-estimated %s) "
                 "gap %.2f %.1fs", epoch, lr, row["train_acc"], gap["val_acc"], gap["disc_val_acc"],
                 "%.2f" % gap["disc_val_acc_bn"] if "disc_val_acc_bn" in gap else "-", gap["gap"], row["seconds"])
        d = row["discreteness"]
        log.info("discreteness: op one-hot %.3f / %.3f, top-2 edge share %.3f / %.3f (normal / reduce); "
                 "L_O %.3f L_E %.3f lambda_c %.4f lambda_alpha %.3f", d["normal"]["op_onehot"],
                 d["reduce"]["op_onehot"], d["normal"]["edge_top2"], d["reduce"]["edge_top2"], loss_o, loss_e,
                 row["lambda_c"], row["lambda_alpha"])
        log.info("genotype %s", genotype)
        # TRY NOT TO MODIFY: checkpoint with everything needed to resume, alphas and betas included
        common.save_checkpoint(run_dir / "checkpoint_search.pt", {
            **common.make_checkpoint("daas", epoch, args, generator, model=model, w_optimizer=w_optimizer,
                                     a_optimizer=a_optimizer, scheduler=scheduler),
            "alphas": {"normal": model.alphas_normal.detach().cpu(), "reduce": model.alphas_reduce.detach().cpu()},
            "betas": {"normal": [x.detach().cpu() for x in model.betas_normal],
                      "reduce": [x.detach().cpu() for x in model.betas_reduce]},
            "genotype": common.genotype_to_dict(genotype)})
    genotype = model.genotype()  # also when a resumed run had nothing left to search
    common.plot_alphas(alpha_history[-1], run_dir / "alphas.png", PRIMITIVES, "softmax(S(alpha))")
    common.plot_alpha_evolution(alpha_history, run_dir / "alpha_evolution.png", PRIMITIVES)
    keys = ["train_acc", "val_acc", "disc_val_acc"] + ["disc_val_acc_bn"] * ("disc_val_acc_bn" in history[-1])
    common.plot_curves(history, keys, run_dir / "search_curves.png", "DAAS search: supernet vs derived cell")
    plot_discretization(history, run_dir / "discretization.png")
    summary = {"epochs": len(history), **{k: history[-1].get(k) for k in ("val_acc", "train_acc", "disc_val_acc",
                                                                          "disc_val_acc_bn", "gap")},
               "seconds": sum(r["seconds"] for r in history),
               "seconds_per_step": sum(r["seconds_per_step"] for r in history) / len(history)}
    return genotype, summary


# =====================================================================================
# main: search -> derive -> retrain -> test
# =====================================================================================
def main(args):
    args, device = common.prepare(args, __file__)  # --resume's flags, the device, every flag's range
    genotype = common.parse_genotype(args.genotype) if args.genotype else None  # fail before any work
    if genotype is None and args.warmup_epochs >= args.epochs:
        raise UsageError(f"--warmup-epochs {args.warmup_epochs} leaves alpha no step in --epochs {args.epochs} "
                         "(it is frozen in epochs 0..N-1); short runs need e.g. --warmup-epochs 0")
    return common.run(args, __file__, "daas", device, genotype, search)


if __name__ == "__main__":
    common.cli(main, Args)
