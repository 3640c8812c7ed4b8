"""iDARTS: Differentiable Architecture Search with Stochastic Implicit Gradients.

Miao Zhang, Steven Su, Shirui Pan, Xiaojun Chang, Ehsan Abbasnejad, Reza Haffari. ICML 2021
(PMLR 139). arXiv:2106.10784, https://arxiv.org/abs/2106.10784. Official code: MiaoZhang0525/iDARTS
@ 419a67b, checked against NAS_Bench201_codes/exps/algos/iDARTS_V2.ipynb (NAS-Bench-201) and
NAS-Bench-1Shot1-codes/optimizers/idarts_v2/{architect_approx.py, train_search.py}. The code for
the DARTS (CIFAR-10) search space was never released (github.com/miaozhang0525/iDARTS/issues/2):
this file is DARTS (darts.py, quark0/darts @ f276dd3) with the architecture gradient replaced.

Reproduce the paper (search, derive the cell, retrain 600 epochs, test on CIFAR-10):
    python idarts.py                          # T = 5 weight steps per alpha step, K = 2, gamma = lr
    python idarts.py --inner-steps 4          # T of the NAS-Bench-201 notebook
    python idarts.py --neumann-k 0            # hypergradient with H^-1 ~ gamma I (no Neumann terms)
    python idarts.py --space nb201            # NAS-Bench-201 cell, the official notebook's search protocol
    python idarts.py --space nb201 --nb201-benchmark NAS-Bench-201-v1_1-096897.pth  # + benchmark lookup per epoch

Equations implemented. The paper's text was not readable here, so the labels are ours (also used
in notebooks/idarts.ipynb; grep "Eq. (Neumann)" finds both); DARTS's are arXiv:1806.09055 v2's:
    DARTS Eq. (1)-(2) cell and mixed op o_bar(x) = sum_o softmax(alpha)_o o(x) -> SearchCell, MixedOp
    Eq. (bilevel)  min_alpha L_val(w*(alpha), alpha),  w*(alpha) = argmin_w L_train(w, alpha)
                   inner problem: T SGD steps on w per alpha step (path-agnostic) -> search_epoch
    Eq. (IFT)      dL_val/dalpha = d_alpha L_val - d2_{alpha,w} L_train . H^-1 . d_w L_val at w*,
                   H = d2_{w,w} L_train                                      -> neumann_hypergradient
    Eq. (Neumann)  H^-1 ~ gamma sum_{k=0..K} (I - gamma H)^k, exact as K -> inf for 0 < gamma < 2/lambda_max(H),
                   computed with K exact Hessian-vector products (double backward) -> neumann_hypergradient
    Eq. (iDARTS)   stochastic hypergradient on a val batch i and a train batch j:
                   d_alpha L^i_val - gamma d2_{alpha,w} L^j_train sum_{k=0..K} (I - gamma H^j)^k d_w L^i_val
                                                                             -> neumann_hypergradient
    DARTS Sec. 2.4 derived cell: top-2 incoming edges by strongest non-zero op -> derive_genotype
    --space nb201: the same mixed op on the 6 edges of the NAS-Bench-201 cell, one alpha (6, 5) for all
                   cells; derived cell = argmax op per edge, 'none' allowed    -> NB201Supernet, common.nb201_derive

Deviations from the paper (each is what the official code does, unless marked "ours"):
    1. ours: no DARTS-space code exists, so search space, supernet, schedule, optimisers, alpha init
       (1e-3 N(0, 1)), batch size 64, 8 cells, 50 epochs and the derivation rule are DARTS's (quark0/darts
       cnn/train_search.py and model_search.py); the 1Shot1 search (idarts_v2/train_search.py lines 42-63)
       shares lr, cosine floor, momentum, weight decay, clip, split, 50 epochs and the Adam settings, but
       its batch (96) and cells (9) belong to NAS-Bench-1Shot1's space. The paper's DARTS-space T and K
       could not be read and are not verified.
    2. T = 5 (--inner-steps) and K = 2 (--neumann-k) are the NAS-Bench-1Shot1 code's
       (idarts_v2/architect_approx.py line 34 `for step in range(5)`, line 69 terms 1 + (1 - eta g) +
       (1 - eta g)^2); the NAS-Bench-201 notebook (iDARTS_V2.ipynb, second cell, line 70) has T = 4 and
       the same K = 2 (v + g1 + g2 of line 34, two Hessian-vector products).
    3. gamma is the weight lr in use (both official variants pass eta = lr), unless --neumann-gamma > 0.
    4. ours: the T inner steps are real SGD steps (momentum, weight decay, grad-norm clip 5) with the
       search's own optimiser. The NAS-Bench-201 notebook steps a deepcopy of the optimiser
       (second cell, lines 67 and 80) whose parameters are copies, so its inner steps leave the
       supernet unchanged.
    5. ours: (I - gamma H)^k v uses exact Hessian-vector products and the mixed term
       d2_{alpha,w} L_train . s is exact too (double backward). NAS-Bench-201 uses exact HVPs but a
       central finite difference for the mixed term; NAS-Bench-1Shot1 replaces H by the diagonal
       proxy d||grad_w L_train|| / dw. Both official variants then restore w with v instead of s
       ("noise improves the result", NAS-Bench-201 notebook second cell line 59); ours leaves w untouched.
    6. As in the NAS-Bench-1Shot1 code (train_search.py line 199 loops over valid_queue), one epoch walks
       the val half once: every alpha step takes T train batches for the inner steps, one more train
       batch j for H^j and the mixed term (NAS-Bench-201: also a fresh batch) and one val batch i, so
       an epoch makes T times as many weight steps as a DARTS epoch. H is the Hessian of the
       cross-entropy only; the weight decay's lambda I (gamma lambda ~ 1e-5) is left out, as officially.
    7. ours: the train stream is walked in order (reshuffled each pass) instead of a fresh
       next(iter(loader)) per batch; gamma is the lr in use and the scheduler steps at the end of
       each epoch (darts.py Deviation 4; the 1Shot1 code steps it first, train_search.py lines 152-153);
       alpha are nn.Parameters, so they are in every checkpoint; the searched cell is derived after the
       last epoch. The 1Shot1 code saves alpha at the start of each epoch (lines 159-165) and evaluates
       that file after the epoch (line 184); quark0/darts logs the genotype at the start of each epoch
       (train_search.py lines 113-114): their last cell is the one before the last epoch trains.
    8. ours: --amp (bfloat16 autocast, CUDA only) covers the inner weight steps and retraining; the
       hypergradient always runs in float32. Retraining is the DARTS protocol (common.retrain); the official
       repository has no ImageNet retraining, so --dataset imagenet uses DARTS's train_imagenet.py recipe
       (common.IMAGENET_RETRAIN_ARGS) and Args has no IMAGENET of its own. --channels-last and --compile
       apply to the supernet (common.speed_up) as in darts.py.
    9. --space nb201 follows the official NAS-Bench-201 notebook (NAS_Bench201_codes/exps/algos/iDARTS_V2.ipynb):
       supernet TinyNetworkDartsV2 (lib/models/cell_searchs/search_model_darts_v2.py lines 21-45: C 16,
       N 5, alpha 1e-3 N(0, 1) of shape (6, 5); search_cells.py line 14: affine=False BN with running
       stats), Adam 3e-4, betas (0.5, 0.999), weight decay 1e-3 (notebook cell 3, lines 12-13 and 71), T = 4
       (cell 1 line 70), K = 2, clip 5 (cell 1 line 79), the 25K/25K cifar-split.txt halves (line 36). The
       notebook loads configs/nas-benchmark/algos/DARTS_wlr0p01.config (cell 3 line 47), which is not in
       the repository; its DARTS.config (lines 2-12) has the weight lr 0.01 that name says: SGD lr 0.01
       Nesterov momentum 0.9, cosine to 0.001, weight decay 5e-4, batch 64, 30 epochs; we use it. ours:
       the derived cell is the last epoch's argmax, as genotypes[total_epoch-1] the notebook reports
       (cell 3 line 158), not its 'best' by supernet val accuracy. The cell is retrained with the
       benchmark's 200-epoch recipe (common.NB201_RETRAIN_ARGS) or looked up with --nb201-benchmark.
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
from common import NB201_EDGES, NB201_PRIMITIVES, OPS, PRIMITIVES, Genotype, UsageError, arg


# =====================================================================================
# Args
# =====================================================================================
@dataclasses.dataclass
class Args(common.BaseArgs):
    exp_name: str = arg("idarts", "name of the method; prefix of the run folder", "run")
    # Algorithm specific arguments (DARTS protocol, Deviation 1: quark0/darts cnn/train_search.py defaults;
    # "1Shot1" = MiaoZhang0525/iDARTS NAS-Bench-1Shot1-codes/optimizers/idarts_v2/train_search.py)
    epochs: int = arg(50, "train_search.py --epochs 50 (also 1Shot1 line 49)", check=">=1")
    batch_size: int = arg(64, "train_search.py --batch_size 64, train and val streams (1Shot1 line 42: 96)",
                          check=">=2")
    lr: float = arg(0.025, "train_search.py --learning_rate 0.025, weights, SGD (also 1Shot1 line 43)", check=">0")
    lr_min: float = arg(0.001, "train_search.py --learning_rate_min 0.001, cosine floor (also 1Shot1 line 44)",
                        check=">=0")
    momentum: float = arg(0.9, "train_search.py --momentum 0.9 (also 1Shot1 line 45)", check="[0,1)")
    nesterov: bool = arg(False, "Nesterov momentum for the weights (train_search.py: off; the NAS-Bench-201 "
                         "DARTS.config line 10: on)")
    weight_decay: float = arg(3e-4, "train_search.py --weight_decay 3e-4 (also 1Shot1 line 46)", check=">=0")
    init_channels: int = arg(16, "train_search.py --init_channels 16 (also 1Shot1 line 50)", check=">=1")
    layers: int = arg(8, "train_search.py --layers 8, cells in the supernet (1Shot1 line 51: 9); at least 3: "
                      "reduction cells sit at layers//3 and 2*layers//3, so fewer cells have no normal cell and "
                      "alphas_normal gets no gradient (--space nb201: N, cells per stage, at least 1)", check=">=1")
    grad_clip: float = arg(5.0, "train_search.py --grad_clip 5, weights only, also the iDARTS inner steps (1Shot1 "
                           "line 59); 0 = no clipping", check=">=0")
    train_portion: float = arg(0.5, "train_search.py --train_portion 0.5, weights / alpha split (also 1Shot1 "
                               "line 60)", check="(0,1)")
    arch_lr: float = arg(3e-4, "train_search.py --arch_learning_rate 3e-4, Adam (also 1Shot1 line 62)", check=">0",
                         aliases=("--arch-learning-rate",))
    arch_weight_decay: float = arg(1e-3, "train_search.py --arch_weight_decay 1e-3 (also 1Shot1 line 63)",
                                   check=">=0")
    # iDARTS (MiaoZhang0525/iDARTS @ 419a67b; see Deviations 2-3)
    inner_steps: int = arg(5, "T: weight steps per alpha step (1Shot1 architect_approx.py line 34: range(5); "
                           "NAS-Bench-201 notebook: 4)", check=">=1")
    neumann_k: int = arg(2, "K: Neumann terms k = 0..K, K Hessian-vector products (both official variants: 2)",
                         check=">=0")
    neumann_gamma: float = arg(0.0, "gamma of Eq. (Neumann); 0 = the weight lr in use (official: eta = lr)",
                               check=">=0")
    space: str = arg("darts", "darts | nb201: the NAS-Bench-201 cell (4 nodes, 6 edges, 5 ops) in the benchmark's "
                     "macro network; defaults then follow the official iDARTS_V2.ipynb and its DARTS.config "
                     "(Deviation 9; see [--space nb201: ...])", check=("darts", "nb201"))
    nb201_benchmark: str = arg("", common.NB201_BENCHMARK_HELP)

    # Deviation 9: MiaoZhang0525/iDARTS NAS_Bench201_codes, exps/algos/iDARTS_V2.ipynb (cell 3 lines 7-13 C 16,
    # N 5, arch Adam 3e-4 / 1e-3; cell 1 line 70 T = 4, line 79 clip 5) and configs/nas-benchmark/algos/DARTS.config
    # lines 2-12 (SGD lr 0.01 Nesterov, cosine to 0.001, decay 5e-4, 30 epochs, batch 64)
    NB201 = {"epochs": 30, "batch_size": 64, "lr": 0.01, "lr_min": 0.001, "momentum": 0.9, "nesterov": True,
             "weight_decay": 5e-4, "init_channels": 16, "layers": 5, "grad_clip": 5.0, "train_portion": 0.5,
             "arch_lr": 3e-4, "arch_weight_decay": 1e-3, "inner_steps": 4, "neumann_k": 2}


# =====================================================================================
# Search space: mixed op, search cell, supernet
# =====================================================================================
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

    def forward(self, x, weights):  # weights: (n_ops,) = softmax(alpha^(i,j))
        # ALGO LOGIC: DARTS Eq. (2): o_bar(x) = sum_o softmax(alpha)_o * o(x)
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
            # ALGO LOGIC: DARTS Eq. (1): x_j = sum_{i<j} o_bar^(i,j)(x_i)
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
        # Deviation 1: DARTS's official init 1e-3 * N(0, 1)
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

    def alphas(self):  # {cell type: alpha}, what alphas.jsonl and the checkpoint hold
        return {"normal": self.alphas_normal, "reduce": self.alphas_reduce}


class NB201MixedOp(nn.Module):
    """--space nb201: the benchmark's 5 ops on one edge (search_cells.py SearchCell line 26: affine=False BN
    with running statistics); the same weighted sum as MixedOp."""

    def __init__(self, C):
        super().__init__()
        self.ops = nn.ModuleList(common.NB201_OPS[name](C, C, 1, False, True) for name in NB201_PRIMITIVES)

    def forward(self, x, weights):  # weights: (5,) = softmax(alpha^(i,j))
        # ALGO LOGIC: DARTS Eq. (2) on an NB-201 edge
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class NB201Supernet(nn.Module):
    """--space nb201 (search_model_darts_v2.py TinyNetworkDartsV2): stem, common.nb201_layout(C, N) with a
    6-edge search cell per "cell" entry and NB201ResNetBlock between stages, BN-ReLU, pool, linear; ONE
    alpha (6 edges, 5 ops) shared by every cell."""

    def __init__(self, C, num_classes, N):
        super().__init__()
        self.stem = common.nb201_stem(C)
        self.cells = nn.ModuleList(nn.ModuleList(NB201MixedOp(c) for _ in NB201_EDGES) if kind == "cell"
                                   else common.NB201ResNetBlock(c_in, c) for kind, c_in, c in common.nb201_layout(C, N))
        self.lastact = common.nb201_lastact(4 * C)
        self.classifier = nn.Linear(4 * C, num_classes)
        self.alphas_cell = nn.Parameter(1e-3 * torch.randn(len(NB201_EDGES), len(NB201_PRIMITIVES)))  # Deviation 9

    def forward(self, x):  # x: (B, 3, H, W)
        weights = F.softmax(self.alphas_cell, dim=-1)  # (6, 5)
        h = self.stem(x)
        for cell in self.cells:
            if isinstance(cell, nn.ModuleList):  # a search cell: node i = sum_{j<i} o_bar^(i,j)(node j)
                nodes = [h]
                for i in range(1, common.NB201_NODES):
                    nodes.append(sum(cell[e](nodes[j], weights[e]) for e, (to, j) in enumerate(NB201_EDGES) if to == i))
                h = nodes[-1]
            else:
                h = cell(h)  # (B, 2C, H/2, W/2) after the first resblock, (B, 4C, H/4, W/4) after the second
        return self.classifier(F.adaptive_avg_pool2d(self.lastact(h), 1).flatten(1))

    def arch_parameters(self):
        return [self.alphas_cell]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("alphas_")]

    def genotype(self):  # an arch string: argmax op per edge, 'none' allowed (search_model_darts_v2.py lines 65-76)
        return common.nb201_derive(self.alphas_cell.detach().cpu())

    def alphas(self):
        return {"cell": self.alphas_cell}


# =====================================================================================
# Architecture update rule
# =====================================================================================
def _zeros_for_none(grads, params):
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def neumann_hypergradient(train_loss, val_loss, weights, alphas, gamma, K):
    """Eq. (iDARTS): the implicit-function-theorem hypergradient with a K-term Neumann series,
        g = d_alpha L_val - gamma * (d2 L_train / dalpha dw) . s,   s = sum_{k=0..K} (I - gamma H)^k v,
        v = d_w L_val,  H = d2 L_train / dw2,
    all at the weights as they are now (w_T after the inner steps). train_loss() and val_loss()
    evaluate the losses at the current `weights` and `alphas` (lists of tensors that require
    grad), so a model, a ridge regression or any closure fits. Costs one val forward-backward,
    one train forward-backward with create_graph, K Hessian-vector products and one mixed
    product (each a backward pass through the train graph). Returns (gradient for each alpha,
    the val loss, the implicit term gamma (d2 L_train / dalpha dw) . s)."""
    val = val_loss()
    # Eq. (IFT), the val-side factors: d_alpha L_val and v = d_w L_val at the current weights
    g_all = torch.autograd.grad(val, alphas + weights, allow_unused=True)
    d_alpha = _zeros_for_none(g_all[:len(alphas)], alphas)  # d_alpha L_val^i
    v = _zeros_for_none(g_all[len(alphas):], weights)  # v = d_w L_val^i
    g_w = torch.autograd.grad(train_loss(), weights, create_graph=True)  # d_w L_train^j, graph kept
    p, s = v, list(v)
    for _ in range(K):
        hp = torch.autograd.grad(g_w, weights, grad_outputs=p, retain_graph=True, allow_unused=True)
        hp = _zeros_for_none(hp, weights)  # H p (exact Hessian-vector product)
        # ALGO LOGIC: Eq. (Neumann): p_k = (I - gamma H) p_{k-1}, s = sum_{k=0..K} p_k
        p = [pi - gamma * hi for pi, hi in zip(p, hp)]
        s = [si + pi for si, pi in zip(s, p)]
    mixed = torch.autograd.grad(g_w, alphas, grad_outputs=s, allow_unused=True)  # (d2 L_train / dalpha dw) . s
    implicit = [gamma * m for m in _zeros_for_none(mixed, alphas)]
    # ALGO LOGIC: Eq. (iDARTS): g = d_alpha L_val - gamma (d2 L_train / dalpha dw) sum_k (I - gamma H)^k v
    return [da - im for da, im in zip(d_alpha, implicit)], val.detach(), implicit


# =====================================================================================
# Genotype derivation
# =====================================================================================
def derive_genotype(w_normal, w_reduce, steps=4, multiplier=4):
    """DARTS Sec. 2.4: for every intermediate node keep the 2 incoming edges whose strongest non-zero
    op is largest, and on each the argmax op with 'none' excluded (both steps skip 'none'). Ties go
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


# =====================================================================================
# Search loop
# =====================================================================================
def weight_step(model, x, y, w_optimizer, device, args):
    """One SGD step on w (grad-norm clip 5; alpha are not clipped), as in DARTS."""
    w_optimizer.zero_grad(set_to_none=True)
    with common.autocast(device, args.amp):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    common.clip_grad(model.weight_parameters(), args.grad_clip)
    w_optimizer.step()
    return loss.item(), common.accuracy(logits, y)


def search_epoch(model, train_iter, val_data, w_optimizer, a_optimizer, device, args, log, epoch):
    """One epoch of Eq. (bilevel): per val batch i, T weight steps on train batches (the inner
    problem), then one Adam step on alpha with the Eq. (iDARTS) hypergradient on batch i and a
    fresh train batch j. Returns Progress.summary() (one step = one alpha step, its loss and accuracy
    the mean of its T weight steps), the mean seconds per hypergradient, the weight steps made and the
    mean norms of the two hypergradient terms."""
    model.train()
    steps = min(len(val_data), args.steps_per_epoch or len(val_data))
    progress = common.Progress(log, "search", epoch, steps, args.report_freq, device)
    n, t_hyper = 0, 0.0
    norms = {"direct_norm": 0.0, "implicit_norm": 0.0}  # |d_alpha L_val|, |gamma A s| summed over steps
    for step, (x_val, y_val) in enumerate(val_data):
        if step >= steps:
            break
        x_val, y_val = x_val.to(device, non_blocking=True), y_val.to(device, non_blocking=True)
        loss_sum = acc_sum = 0.0
        # ALGO LOGIC: Eq. (bilevel), inner problem: T SGD steps on w; only the end point w_T matters
        for _ in range(args.inner_steps):
            x, y = (t.to(device, non_blocking=True) for t in next(train_iter))
            loss, acc = weight_step(model, x, y, w_optimizer, device, args)
            loss_sum, acc_sum, n = loss_sum + loss, acc_sum + acc, n + 1
        x_j, y_j = (t.to(device, non_blocking=True) for t in next(train_iter))  # train batch j for H^j
        gamma = args.neumann_gamma or w_optimizer.param_groups[0]["lr"]  # Deviation 3: the lr in use
        t1 = time.time()
        grads, _, implicit = neumann_hypergradient(
            lambda: F.cross_entropy(model(x_j), y_j), lambda: F.cross_entropy(model(x_val), y_val),
            model.weight_parameters(), model.arch_parameters(), gamma, args.neumann_k)
        t_hyper += time.time() - t1
        norms["implicit_norm"] += torch.cat([g.flatten() for g in implicit]).norm().item()
        norms["direct_norm"] += torch.cat([(g + i).flatten() for g, i in zip(grads, implicit)]).norm().item()
        for a, g in zip(model.arch_parameters(), grads):
            a.grad = g
        a_optimizer.step()
        progress.update(loss_sum / args.inner_steps, acc_sum / args.inner_steps)
    k = max(steps, 1)
    return progress.summary(), t_hyper / k, {"weight_steps": n, **{key: val / k for key, val in norms.items()}}


def search(args, device, run_dir, log):
    """Run the search; returns (final genotype, summary). Writes per epoch: search_history.jsonl,
    alphas.jsonl, genotype.json, checkpoint_search.pt; at the end the figures."""
    generator = torch.Generator().manual_seed(args.seed)
    train_set, num_classes, _ = common.load_dataset(args.dataset, args.data, True, args.image_size)
    train_data, val_data = common.search_loaders(train_set, args.batch_size, args.train_portion, generator,
                                                 args.workers)
    nb201 = args.space == "nb201"
    model = NB201Supernet(args.init_channels, num_classes, args.layers) if nb201 else \
        Network(args.init_channels, num_classes, args.layers)
    model = common.speed_up(model.to(device), args)
    primitives = NB201_PRIMITIVES if nb201 else PRIMITIVES
    log.info("supernet: %.3f M weights, alphas %s", sum(p.numel() for p in model.weight_parameters()) / 1e6,
             [tuple(a.shape) for a in model.arch_parameters()])
    w_optimizer = torch.optim.SGD(model.weight_parameters(), args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay, nesterov=args.nesterov)
    # architect.py: Adam with betas (0.5, 0.999), weight decay 1e-3 (also both iDARTS variants)
    a_optimizer = torch.optim.Adam(model.arch_parameters(), args.arch_lr, betas=(0.5, 0.999),
                                   weight_decay=args.arch_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_optimizer, args.epochs, eta_min=args.lr_min)
    start = 0
    if args.resume:  # TRY NOT TO MODIFY: continue after the last finished epoch, bit for bit
        start = common.resume_from(run_dir / "checkpoint_search.pt", "idarts", generator, model=model,
                                   w_optimizer=w_optimizer, a_optimizer=a_optimizer, scheduler=scheduler)
        log.info("resuming the search at epoch %d", start)
    history = common.keep_jsonl(run_dir / "search_history.jsonl", start)
    alpha_history = [r["softmax"] for r in common.keep_jsonl(run_dir / "alphas.jsonl", start)]
    for epoch in range(start, args.epochs):
        t0 = time.time()
        lr = w_optimizer.param_groups[0]["lr"]
        train_iter = common.forever(train_data)  # T + 1 train batches per alpha step (Deviation 6)
        train, s_hyper, stats = search_epoch(
            model, train_iter, val_data, w_optimizer, a_optimizer, device, args, log, epoch)
        val_loss, val_acc = common.evaluate(model, val_data, device, args.amp, args.steps_per_epoch)
        scheduler.step()
        genotype = model.genotype()
        weights = {k: F.softmax(a, -1).tolist() for k, a in model.alphas().items()}
        alpha_history.append(weights)
        row = {"epoch": epoch, "lr": lr, **train, "val_loss": val_loss, "val_acc": val_acc,
               "seconds": time.time() - t0, "seconds_per_hypergradient": s_hyper, **stats,
               "genotype": common.genotype_to_dict(genotype), **(common.nb201_epoch_row(args, genotype, log)
                                                                 if nb201 else {})}
        history.append(row)
        common.append_jsonl(run_dir / "search_history.jsonl", row)
        common.append_jsonl(run_dir / "alphas.jsonl", {"epoch": epoch, "softmax": weights,
                                                       "alpha": {k: a.tolist() for k, a in model.alphas().items()}})
        common.write_json(run_dir / "genotype.json", common.genotype_to_dict(genotype))
        log.info("search epoch %d lr %.5f train_acc %.2f val_acc %.2f %.1fs (%.3f s hypergradient per step), "
                 "|d_alpha L_val| %.3g, |implicit term| %.3g", epoch, lr, row["train_acc"], val_acc, row["seconds"],
                 s_hyper, stats["direct_norm"], stats["implicit_norm"])
        log.info("genotype %s", genotype)
        # TRY NOT TO MODIFY: checkpoint with everything needed to resume, alphas included
        common.save_checkpoint(run_dir / "checkpoint_search.pt", {
            **common.make_checkpoint("idarts", epoch, args, generator, model=model, w_optimizer=w_optimizer,
                                     a_optimizer=a_optimizer, scheduler=scheduler),
            "alphas": {k: a.detach().cpu() for k, a in model.alphas().items()},
            "genotype": common.genotype_to_dict(genotype)})
    genotype = model.genotype()  # also when a resumed run had nothing left to search
    common.plot_alphas(alpha_history[-1], run_dir / "alphas.png", primitives)
    common.plot_alpha_evolution(alpha_history, run_dir / "alpha_evolution.png", primitives)
    if nb201 and args.nb201_benchmark:
        common.plot_nb201_history(history, run_dir / "nb201.png")
    common.plot_curves(history, ["train_acc", "val_acc"], run_dir / "search_curves.png", "iDARTS search")
    common.plot_curves(history, ["direct_norm", "implicit_norm"], run_dir / "hypergradient.png",
                       "iDARTS hypergradient: |d_alpha L_val| and |gamma A s| (mean per step)", ylabel="norm")
    summary = {"epochs": len(history), "val_acc": history[-1]["val_acc"], "train_acc": history[-1]["train_acc"],
               "seconds": sum(r["seconds"] for r in history),
               "seconds_per_step": sum(r["seconds_per_step"] for r in history) / len(history),
               "inner_steps": args.inner_steps, "neumann_k": args.neumann_k}
    return genotype, summary


# =====================================================================================
# main: search -> derive -> retrain -> test
# =====================================================================================
def main(args):
    args, device = common.prepare(args, __file__)  # --resume's flags, the device, every flag's range
    if args.space == "darts" and args.layers < 3:  # NB-201's N may be 1 or 2
        raise UsageError(f"--layers must be >=3, got {args.layers} (the DARTS space; --space nb201 allows N >= 1)")
    genotype = common.parse_genotype(args.genotype) if args.genotype else None  # fail before any work
    return common.run(args, __file__, "idarts", device, genotype, search)


if __name__ == "__main__":
    common.cli(main, Args)
