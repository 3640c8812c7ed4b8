"""VIM-NAS: Variational Information Maximization Neural Architecture Search.

Yaoming Wang, Yuchen Liu, Wenrui Dai, Chenglin Li, Junni Zou, Hongkai Xiong. "Learning Latent
Architectural Distribution in Differentiable Neural Architecture Search via Variational Information
Maximization". ICCV 2021, pp. 12312-12321, DOI 10.1109/ICCV48922.2021.01209,
https://openaccess.thecvf.com/content/ICCV2021/html/Wang_Learning_Latent_Architectural_Distribution_in_Differentiable_Neural_Architecture_Search_via_ICCV_2021_paper.html
No arXiv version was found. No official code exists (Papers-with-Code: "No code implementations
yet"). The PDF was not readable here; what we used: the abstract (CVF page), the DNAS survey of
Heuillet et al. (its Eq. 41-42), and a blog summary of the paper that quotes Algorithm 1, the
generator "ConvReLUBN(3,14,3)-ConvReLUBN(14,1,3)" and the captions of Fig. 1-9. Every detail these
leave open is ours and listed below. The search space, supernet and retraining are DARTS's
(darts.py, quark0/darts @ f276dd3).

Reproduce the paper (search one epoch, derive the cell, retrain 600 epochs, test on CIFAR-10):
    python vim_nas.py
    python vim_nas.py --epochs 10       # watch the alphas settle (alpha_evolution.png, anytime_weights.png)
    python vim_nas.py --space nb201     # NAS-Bench-201 cell, DARTS's NB-201 protocol (Deviation 13)
    python vim_nas.py --space nb201 --nb201-benchmark NAS-Bench-201-v1_1-096897.pth  # + benchmark lookup per epoch

Equations implemented. The paper's own equation numbers were not readable here, so V1-V5 are ours,
used identically in notebooks/vim_nas.ipynb:
    Eq. (V1) I_phi(D; A) = H(D) - H_phi(D | A),  p_phi(D, A) = p(D) p_phi(A | D)
    Eq. (V2) I(D; A) = H(D) + E_p[log q(D | A)] + E_A KL(p(D | A) || q(D | A))
                    >= H(D) + E_p[log q(D | A)]   (for any q; = when q = p(D | A))
                                                                         -> mutual_information_bound
    Eq. (V3) max_{theta, phi} L = sum_d E_{p_phi(A | d)}[log q_theta(d | A)],
             log q_theta(d | A) = -CE(supernet_theta(x; softmax(A)), y)  -> search_epoch
    Eq. (V4) A = phi(eps) + xi, xi ~ N(0, I)  (Algorithm 1, line 3)    -> sample_noise, Network.forward
    Eq. (V5) phi = ConvReLUBN(3, 14, 3) -> ConvReLUBN(14, 1, 3) on a 14 x |O| map   -> ArchGenerator
    DARTS Eq. (1)-(2) mixed op o_bar(x) = sum_o softmax(A)_o o(x)      -> MixedOp, SearchCell
    Algorithm 1, line 7: final cell from the learned phi: DARTS rule on softmax(phi(eps)) -> derive_genotype
    ours: how many epochs the architecture takes to settle (any alphas.jsonl, darts.py's too) -> settling
    --space nb201: one generator phi maps its eps to the (6 edges, 5 ops) A of the NAS-Bench-201 cell, shared
             by every cell; derived cell = argmax op per edge of phi(eps), 'none' allowed -> NB201Supernet

Deviations from the paper (everything not in the paper text we could read is ours):
    1. ours: the generator input eps of Algorithm 1 is one tensor of shape (1, 3, 14, |O|) drawn from
       N(0, 1) once, at initialisation, and kept (a buffer in every checkpoint). Its shape follows
       from ConvReLUBN(3, 14, 3) and Fig. 1 ("14 channels of feature maps, each the size of candidate
       operations x edges"); the paper's exact shape was not readable.
    2. ours: two generators, one per cell type (normal, reduce), each mapping its own eps to a
       (14, |O|) map; the paper's "alpha map of one cell" does not say whether they share one.
    3. ours: ConvReLUBN = Conv2d (with bias, 3x3, padding 1, so the map keeps its 14 x |O| size) ->
       ReLU -> BatchNorm2d. BN always normalises with the statistics of the single map
       (track_running_stats=False), so phi(eps) is the same in train and eval mode. With the
       last ReLU -> BN the initial softmax(phi(eps)) is already peaked (mean max weight ~0.43 per
       edge, DARTS's is a uniform 0.125): at a low phi lr most of the final cell is fixed by the
       random initialisation of phi (notebooks/vim_nas.ipynb, sec. 6).
    4. ours: one draw xi ~ N(0, noise_std^2 I) per step (noise_std = 1, Algorithm 1's N(0, 1)),
       shared by the whole batch and by all cells of a type, used for both updates of the step.
    5. ours: q_theta(D | A) is the DARTS supernet with mixed ops weighted by softmax(A) per edge;
       log q_theta(d | A) = -CE(y | x, A) (log p(x) is a constant of the bound).
    6. ours: theta descends the loss on the DARTS train half, phi on the val half (first-order
       alternation, DARTS's split); the paper writes one objective over D (Eq. (V3)), and what we
       could read of Algorithm 1 does not say which data each update uses. Algorithm 1's order is
       kept: the weight step first, then the phi step with the same xi (DARTS steps alpha first).
    7. ours: phi is trained with Adam, lr 0.025, betas (0.5, 0.999), weight decay 1e-3. The lr is the
       "high learning rate (0.025)" the paper gives its DARTS baseline in the ablation of Fig. 6
       ("DARTS with high learning rate and added noise"), which we read as VIM-NAS's own setting;
       betas and weight decay are DARTS's architect.py. --arch-lr 3e-4 gives DARTS's lr.
    8. ours: 1 search epoch ("converging with one epoch", abstract); weights as in DARTS
       train_search.py (SGD 0.025, momentum 0.9, wd 3e-4, cosine to 0.001 over the search epochs,
       so constant for one epoch), batch 64, 16 channels, 8 cells, 50/50 split, grad clip 5.
    9. ours: the final cell applies the DARTS rule (top-2 incoming edges by strongest non-'none'
       op, argmax non-'none' op) to softmax(phi(eps)), the mean of p_phi(A | D) without xi.
   10. Retraining is the DARTS protocol (common.retrain); the paper's retraining settings were not
       readable (it reports 3.9 M parameters, consistent with DARTS's 20 cells x 36 channels).
   11. ours: the search's val accuracy is the supernet's under the mean architecture phi(eps).
   12. ours: alpha_steps.jsonl records softmax(phi(eps)) every --report-freq steps for the
       "anytime architectural weights" figure (anytime_weights.png, the paper's Fig. 2);
       `settling` measures in epochs how fast the derived cell stops changing (notebook sec. 6).
   13. --space nb201: the paper reports NAS-Bench-201 results, but its NB-201 settings were not readable and
       there is no official code, so the protocol is DARTS's on the benchmark (D-X-Y/AutoDL-Projects @ f46486e,
       configs/nas-benchmark/algos/DARTS.config lines 2-12, scripts-search/NAS-Bench-201-algos/DARTS-V1.sh
       lines 20-21): SGD lr 0.025 Nesterov momentum 0.9, cosine to 0.001, weight decay 5e-4, batch 64, C 16,
       N 5, the 25K/25K halves; search ops affine=False BN with running statistics (search_cells.py line 14,
       the default; DARTS-V1.sh takes it as its BN argument). ours: VIM-NAS's own settings stay, not DARTS's:
       1 search epoch (DARTS.config: 50; pass --epochs 50 for DARTS's length), phi's Adam lr 0.025
       (DARTS-V1.sh line 42: 3e-4), xi ~ N(0, 1); one generator phi for the single cell type (Deviation 2
       has one per cell type), its eps (1, 3, 6, 5). The derived cell is the argmax op per edge of
       softmax(phi(eps)), 'none' allowed (common.nb201_derive, as search_model_darts.py genotype()); it is
       retrained with the benchmark's 200-epoch recipe (common.NB201_RETRAIN_ARGS) or looked up with
       --nb201-benchmark. `settling` is not computed in this space (it reads DARTS cells).
   14. No ImageNet retraining recipe of VIM-NAS was readable: --dataset imagenet uses DARTS's train_imagenet.py
       recipe (common.IMAGENET_RETRAIN_ARGS); Args has no IMAGENET of its own. --channels-last and --compile
       apply to the supernet (common.speed_up), as in darts.py.
    Plus the deviations shared by every method file, listed in common.py's docstring (C1-C5).

Runs: --resume RUN_DIR continues a killed run (README.md, "Resume a killed run").
"""

import dataclasses
import json
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
    exp_name: str = arg("vim_nas", "name of the method; prefix of the run folder", "run")
    # Algorithm specific arguments (no official code: DARTS train_search.py values, Deviations 6-8)
    epochs: int = arg(1, "abstract: converges within one epoch (ours: search exactly one, Deviation 8)", check=">=1")
    batch_size: int = arg(64, "ours: DARTS train_search.py --batch_size 64 (train and val streams)", check=">=2")
    lr: float = arg(0.025, "ours: DARTS --learning_rate 0.025 (weights, SGD)", check=">0")
    lr_min: float = arg(0.001, "ours: DARTS --learning_rate_min 0.001 (cosine floor)", check=">=0")
    momentum: float = arg(0.9, "ours: DARTS --momentum 0.9", check="[0,1)")
    nesterov: bool = arg(False, "Nesterov momentum for the weights (DARTS train_search.py: off; the NAS-Bench-201 "
                         "DARTS.config line 10: on)")
    weight_decay: float = arg(3e-4, "ours: DARTS --weight_decay 3e-4", check=">=0")
    init_channels: int = arg(16, "ours: DARTS --init_channels 16", check=">=1")
    layers: int = arg(8, "ours: DARTS --layers 8 (cells in the supernet; at least 3: reduction cells sit at "
                      "layers//3 and 2*layers//3, so fewer cells have no normal cell and its generator gets no "
                      "gradient; --space nb201: N, cells per stage, at least 1)", check=">=1")
    grad_clip: float = arg(5.0, "ours: DARTS --grad_clip 5 (weights only); 0 = no clipping", check=">=0")
    train_portion: float = arg(0.5, "ours: DARTS --train_portion 0.5 (weights / phi split, Deviation 6)",
                               check="(0,1)")
    arch_lr: float = arg(0.025, "Adam lr of the generator phi: the 'high learning rate (0.025)' of the "
                         "paper's Fig. 6 ablation (ours, Deviation 7)", check=">0")
    arch_weight_decay: float = arg(1e-3, "ours: DARTS --arch_weight_decay 1e-3 (on phi)", check=">=0")
    noise_std: float = arg(1.0, "Algorithm 1: std of xi ~ N(0, 1) in A = phi(eps) + xi; 0 = point estimate "
                           "(the paper's VIM-NAS-P ablation)", check=">=0")
    noise_channels: int = arg(3, "paper (via a summary): ConvReLUBN(3, 14, 3), the channels of eps", check=">=1")
    gen_channels: int = arg(14, "paper (via a summary): ConvReLUBN(3,14,3) -> ConvReLUBN(14,1,3), hidden maps",
                            check=">=1")
    space: str = arg("darts", "darts | nb201: the NAS-Bench-201 cell (4 nodes, 6 edges, 5 ops) in the benchmark's "
                     "macro network; defaults then follow DARTS's NB-201 protocol, AutoDL-Projects DARTS.config "
                     "(no VIM-NAS code; Deviation 13; see [--space nb201: ...])", check=("darts", "nb201"))
    nb201_benchmark: str = arg("", common.NB201_BENCHMARK_HELP)

    # Deviation 13: D-X-Y/AutoDL-Projects configs/nas-benchmark/algos/DARTS.config lines 2-12 and
    # scripts-search/NAS-Bench-201-algos/DARTS-V1.sh lines 20-21 (C 16, N 5); VIM-NAS's epochs and phi lr stay
    NB201 = {"batch_size": 64, "lr": 0.025, "lr_min": 0.001, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
             "init_channels": 16, "layers": 5, "grad_clip": 5.0, "train_portion": 0.5}


# =====================================================================================
# Search space: mixed op, search cell, architecture generator, supernet
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

    def forward(self, x, weights):  # weights: (n_ops,) = softmax(A^(i,j))
        # ALGO LOGIC: DARTS Eq. (2) with a sampled A: o_bar(x) = sum_o softmax(A)_o * o(x)
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


class ArchGenerator(nn.Module):
    """phi of one cell type: a fixed Gaussian noise map eps -> mu_phi = phi(eps), the (n_edges, n_ops)
    mean of p_phi(A | D). Every alpha is computed from all of them by shared convolutions, so edges
    and ops are no longer independent (the paper's point against DARTS's per-edge alphas)."""

    def __init__(self, n_edges, n_ops, noise_channels=3, hidden=14, kernel=3):
        super().__init__()
        # ALGO LOGIC: Eq. (V5): phi = ConvReLUBN(3, 14, 3) -> ConvReLUBN(14, 1, 3) (Deviation 3)
        self.net = nn.Sequential(
            nn.Conv2d(noise_channels, hidden, kernel, padding=kernel // 2), nn.ReLU(),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.Conv2d(hidden, 1, kernel, padding=kernel // 2), nn.ReLU(),
            nn.BatchNorm2d(1, track_running_stats=False))
        # Algorithm 1 input: Gaussian noise eps, drawn once (Deviation 1)
        self.register_buffer("eps", torch.randn(1, noise_channels, n_edges, n_ops))

    def forward(self):
        return self.net(self.eps)[0, 0]  # (1, 1, n_edges, n_ops) -> (n_edges, n_ops)


class Network(nn.Module):
    """The DARTS supernet q_theta(D | A): stem, `layers` search cells (all normal cells share the A of
    arch_normal, all reduction cells that of arch_reduce), global pool, linear."""

    def __init__(self, C, num_classes, layers, steps=4, multiplier=4, stem_multiplier=3, noise_channels=3,
                 gen_channels=14):
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
        # Deviation 2: one generator per cell type, in place of DARTS's alphas_normal / alphas_reduce
        self.arch_normal = ArchGenerator(n_edges, len(PRIMITIVES), noise_channels, gen_channels)
        self.arch_reduce = ArchGenerator(n_edges, len(PRIMITIVES), noise_channels, gen_channels)

    def forward(self, x, xi=None):
        """xi: {"normal": (E, n_ops), "reduce": (E, n_ops)} noise of this step, or None for the mean
        architecture phi(eps) (evaluation, derivation)."""
        mu = self.arch_means()
        # ALGO LOGIC: Eq. (V4): A = phi(eps) + xi (reparameterised sample of p_phi(A | D))
        A = {cell: m + xi[cell] for cell, m in mu.items()} if xi is not None else mu
        w_normal, w_reduce = F.softmax(A["normal"], dim=-1), F.softmax(A["reduce"], dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))

    def arch_means(self):
        return {"normal": self.arch_normal(), "reduce": self.arch_reduce()}  # mu_phi, each (E, n_ops)

    def arch_parameters(self):
        return [p for n, p in self.named_parameters() if n.startswith("arch_")]

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("arch_")]

    def genotype(self):
        mu = self.arch_means()
        return derive_genotype(F.softmax(mu["normal"], -1), F.softmax(mu["reduce"], -1))

    def generators(self):
        return {"normal": self.arch_normal, "reduce": self.arch_reduce}


class NB201MixedOp(nn.Module):
    """--space nb201: the benchmark's 5 ops on one edge (search_cells.py line 14: affine=False BN with
    running statistics), weighted by softmax(A) as MixedOp."""

    def __init__(self, C):
        super().__init__()
        self.ops = nn.ModuleList(common.NB201_OPS[name](C, C, 1, False, True) for name in NB201_PRIMITIVES)

    def forward(self, x, weights):  # weights: (5,) = softmax(A^(i,j))
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class NB201Supernet(nn.Module):
    """--space nb201, q_theta(D | A) on the benchmark: stem, common.nb201_layout(C, N) with a 6-edge search
    cell per "cell" entry and NB201ResNetBlock between stages, BN-ReLU, pool, linear; ONE generator phi whose
    (6, 5) A every cell shares (Deviation 13). Same interface as Network."""

    def __init__(self, C, num_classes, N, noise_channels=3, gen_channels=14):
        super().__init__()
        self.stem = common.nb201_stem(C)
        self.cells = nn.ModuleList(nn.ModuleList(NB201MixedOp(c) for _ in NB201_EDGES) if kind == "cell"
                                   else common.NB201ResNetBlock(c_in, c) for kind, c_in, c in common.nb201_layout(C, N))
        self.lastact = common.nb201_lastact(4 * C)
        self.classifier = nn.Linear(4 * C, num_classes)
        self.arch_cell = ArchGenerator(len(NB201_EDGES), len(NB201_PRIMITIVES), noise_channels, gen_channels)

    def forward(self, x, xi=None):  # xi: {"cell": (6, 5)} or None for the mean architecture phi(eps)
        mu = self.arch_cell()
        # ALGO LOGIC: Eq. (V4): A = phi(eps) + xi
        weights = F.softmax(mu + xi["cell"] if xi is not None else mu, dim=-1)  # (6, 5)
        h = self.stem(x)
        for cell in self.cells:
            if isinstance(cell, nn.ModuleList):  # node i = sum_{j<i} o_bar^(i,j)(node j)
                nodes = [h]
                for i in range(1, common.NB201_NODES):
                    nodes.append(sum(cell[e](nodes[j], weights[e]) for e, (to, j) in enumerate(NB201_EDGES) if to == i))
                h = nodes[-1]
            else:
                h = cell(h)  # (B, 2C, H/2, W/2) after the first resblock, (B, 4C, H/4, W/4) after the second
        return self.classifier(F.adaptive_avg_pool2d(self.lastact(h), 1).flatten(1))

    def arch_means(self):
        return {"cell": self.arch_cell()}

    def arch_parameters(self):
        return list(self.arch_cell.parameters())

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("arch_")]

    def genotype(self):  # argmax op per edge of phi(eps), 'none' allowed
        return common.nb201_derive(self.arch_cell().detach().cpu())

    def generators(self):
        return {"cell": self.arch_cell}


# =====================================================================================
# Architecture update rule: reparameterised samples and the variational lower bound
# =====================================================================================
def sample_noise(model, noise_std):
    """Algorithm 1, line 2: xi ~ N(0, noise_std^2 I), one (E, n_ops) draw per cell type (Deviation 4)."""
    return {cell: noise_std * torch.randn(g.eps.shape[2:], device=g.eps.device)  # (E, n_ops)
            for cell, g in model.generators().items()}


def phi_grad(model, x_val, y_val, xi):
    """Gradient of -L in phi on a val batch, through the reparameterised A = phi(eps) + xi: the
    Monte-Carlo estimate (one draw) of grad_phi E_xi[CE(q_theta(. | x, phi(eps) + xi), y)]."""
    # ALGO LOGIC: Eq. (V3): -log q_theta(d | A) = CE(supernet(x; softmax(A)), y)
    loss = F.cross_entropy(model(x_val, xi).float(), y_val)
    return list(torch.autograd.grad(loss, model.arch_parameters())), loss.detach()


def mutual_information_bound(p_joint, q_cond):
    """Eq. (V2) on a discrete joint p(D, A) (rows: values of D, columns: values of A, sums to 1) and
    a variational decoder q(D | A) (columns sum to 1). Returns (I(D; A), H(D) + E_p[log q(D | A)]);
    the difference is E_A KL(p(D | A) || q(D | A)) >= 0, zero when q(D | A) = p(D, A) / p(A)."""
    p_d, p_a = p_joint.sum(1, keepdim=True), p_joint.sum(0, keepdim=True)  # (|D|, 1), (1, |A|)
    m = p_joint > 0
    # Eq. (V1): I(D; A) = sum p(d, a) log p(d, a) / (p(d) p(a)) = H(D) - H(D | A)
    mi = (p_joint[m] * torch.log(p_joint[m] / (p_d * p_a)[m])).sum()
    h_d = -(p_d[p_d > 0] * torch.log(p_d[p_d > 0])).sum()
    # Eq. (V2): H(D) + E_{p(D, A)}[log q(D | A)]
    return mi, h_d + (p_joint[m] * torch.log(q_cond[m])).sum()


# =====================================================================================
# Genotype derivation, and how fast it settles
# =====================================================================================
def derive_genotype(w_normal, w_reduce, steps=4, multiplier=4):
    """Algorithm 1, line 7 with DARTS Sec. 2.4 (Deviation 9): for every intermediate node keep the 2
    incoming edges whose strongest non-zero op is largest, and on each the argmax op with 'none'
    excluded. Ties go to the lower index (stable sort), as in the official DARTS Network.genotype()."""
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


def settling(alpha_rows):
    """ours: how fast an architecture distribution settles, from the rows of an alphas.jsonl written
    by this file or by darts.py (per epoch {"softmax": {"normal": (E, K), "reduce": (E, K)}}):
      genotype_epochs  the first n such that the cells derived after epochs n, n+1, ..., last are all
                       the same (1 = final right after the first epoch; n = len(rows): not settled);
      argmax_epochs    the same for the argmax op of every edge of both cells ('none' included);
      change           per epoch from the 2nd on, the mean over edges of both cells of the total
                       variation 0.5 * |softmax_e - softmax_(e-1)|_1;
      max_weight       per epoch, the mean over edges of the largest softmax weight (1 = one-hot);
      agreement        per epoch, the fraction of the last epoch's (node, op, input) choices of both
                       cells already in that epoch's cell (1 = the final cell)."""
    w = [{c: torch.as_tensor(r["softmax"][c], dtype=torch.float64) for c in ("normal", "reduce")}
         for r in alpha_rows]

    def cell(x):  # a derived cell as per-node sets of (op, input), so a reordering is no change
        g = derive_genotype(x["normal"], x["reduce"])
        return [sorted(gene[k:k + 2]) for gene in (g.normal, g.reduce) for k in range(0, len(gene), 2)]

    genotypes = [cell(x) for x in w]
    argmaxes = [(x["normal"].argmax(1).tolist(), x["reduce"].argmax(1).tolist()) for x in w]

    def first_final(seq):  # 1-based epoch from which seq never changes again
        n = len(seq)
        while n > 1 and seq[n - 2] == seq[-1]:
            n -= 1
        return n

    change = [0.5 * torch.cat([(b[c] - a[c]).abs().sum(1) for c in a]).mean().item() for a, b in zip(w, w[1:])]
    max_weight = [torch.cat([x[c].max(1).values for c in x]).mean().item() for x in w]
    final = [(k, pair) for k, node in enumerate(genotypes[-1]) for pair in node]
    agreement = [sum(pair in g[k] for k, pair in final) / len(final) for g in genotypes]
    return {"epochs": len(w), "genotype_epochs": first_final(genotypes), "argmax_epochs": first_final(argmaxes),
            "change": change, "max_weight": max_weight, "agreement": agreement}


def plot_anytime_weights(steps_rows, path, primitives=PRIMITIVES):
    """softmax(phi(eps)) on the first edge of each cell type against training steps (the paper's Fig. 2)."""
    plt = common.pyplot()
    cells = list(steps_rows[0]["softmax"])
    fig, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4), squeeze=False)
    axes = axes[0]
    x = [r["step"] for r in steps_rows]
    for ax, cell in zip(axes, cells):
        for k, name in enumerate(primitives):
            ax.plot(x, [r["softmax"][cell][0][k] for r in steps_rows], label=name, marker="." if len(x) < 30 else None)
        for a, b in zip(steps_rows, steps_rows[1:]):
            if a["epoch"] != b["epoch"]:
                ax.axvline(a["step"], color="0.7", lw=0.8)  # end of an epoch
        ax.set_xlabel("training step")
        ax.set_ylabel("softmax(phi(eps)) on the first edge" + (" (0->1)" if cell == "cell" else " (0->2)"))
        ax.set_title(f"{cell} cell, first edge")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# =====================================================================================
# Search loop
# =====================================================================================
def search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch, steps_path):
    """One epoch of Algorithm 1: per train batch, draw xi, take a weight step on the train batch and
    then a phi step on a val batch, both with A = phi(eps) + xi (Deviation 6)."""
    model.train()
    steps = min(len(train_data), args.steps_per_epoch or len(train_data))
    progress = common.Progress(log, "search", epoch, steps, args.report_freq, device)
    for step, (x, y) in enumerate(train_data):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x_val, y_val = (t.to(device, non_blocking=True) for t in next(val_iter))
        # ALGO LOGIC: Algorithm 1, line 2: xi ~ N(0, I), one draw for both steps
        xi = sample_noise(model, args.noise_std)
        # Algorithm 1, line 4: descend grad_theta of -L, Eq. (V3), on the train half (SGD, grad-norm clip 5)
        w_optimizer.zero_grad(set_to_none=True)
        with common.autocast(device, args.amp):
            logits = model(x, xi)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        common.clip_grad(model.weight_parameters(), args.grad_clip)  # 0 = no clipping
        w_optimizer.step()
        # ALGO LOGIC: Algorithm 1, line 5: descend grad_phi of -L, Eq. (V3), on the val half (Adam)
        with common.autocast(device, args.amp):
            grads, _ = phi_grad(model, x_val, y_val, xi)
        for p, g in zip(model.arch_parameters(), grads):
            p.grad = g
        a_optimizer.step()
        progress.update(loss.item(), common.accuracy(logits, y))
        if (step + 1) % args.report_freq == 0 or step + 1 == steps:
            log_arch(model, steps_path, epoch, epoch * steps + step + 1)
    return progress.summary()


def log_arch(model, path, epoch, global_step):
    """Deviation 12: one row of the anytime trace of softmax(phi(eps)) in alpha_steps.jsonl."""
    with torch.no_grad():
        sm = {c: F.softmax(m.float(), -1).tolist() for c, m in model.arch_means().items()}
    common.append_jsonl(path, {"epoch": epoch, "step": global_step, "softmax": sm})


def keep_steps(path, start):
    """The rows of alpha_steps.jsonl of epochs before `start` (a resumed run redoes the others)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if r["epoch"] < start]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def search(args, device, run_dir, log):
    """Run the search; returns (final genotype, summary). Writes per epoch: search_history.jsonl,
    alphas.jsonl, alpha_steps.jsonl, genotype.json, checkpoint_search.pt; at the end the figures."""
    generator = torch.Generator().manual_seed(args.seed)
    train_set, num_classes, _ = common.load_dataset(args.dataset, args.data, True, args.image_size)
    train_data, val_data = common.search_loaders(train_set, args.batch_size, args.train_portion, generator,
                                                 args.workers)
    nb201 = args.space == "nb201"
    if nb201:  # Deviation 13
        model = NB201Supernet(args.init_channels, num_classes, args.layers, args.noise_channels, args.gen_channels)
    else:
        model = Network(args.init_channels, num_classes, args.layers, noise_channels=args.noise_channels,
                        gen_channels=args.gen_channels)
    model = common.speed_up(model.to(device), args)
    primitives = NB201_PRIMITIVES if nb201 else PRIMITIVES
    log.info("supernet: %.3f M weights; generator phi: %d parameters, A maps %s",
             sum(p.numel() for p in model.weight_parameters()) / 1e6,
             sum(p.numel() for p in model.arch_parameters()), [tuple(m.shape) for m in model.arch_means().values()])
    w_optimizer = torch.optim.SGD(model.weight_parameters(), args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay, nesterov=args.nesterov)
    # Deviation 7: Adam on phi with DARTS architect.py's betas (0.5, 0.999) and weight decay
    a_optimizer = torch.optim.Adam(model.arch_parameters(), args.arch_lr, betas=(0.5, 0.999),
                                   weight_decay=args.arch_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_optimizer, args.epochs, eta_min=args.lr_min)
    start = 0
    if args.resume:  # TRY NOT TO MODIFY: continue after the last finished epoch, bit for bit
        start = common.resume_from(run_dir / "checkpoint_search.pt", "vim_nas", generator, model=model,
                                   w_optimizer=w_optimizer, a_optimizer=a_optimizer, scheduler=scheduler)
        log.info("resuming the search at epoch %d", start)
    history = common.keep_jsonl(run_dir / "search_history.jsonl", start)
    alpha_history = [r["softmax"] for r in common.keep_jsonl(run_dir / "alphas.jsonl", start)]
    if not keep_steps(run_dir / "alpha_steps.jsonl", start):
        log_arch(model, run_dir / "alpha_steps.jsonl", 0, 0)  # step 0: the generator at initialisation
    for epoch in range(start, args.epochs):
        t0 = time.time()
        lr = w_optimizer.param_groups[0]["lr"]
        val_iter = common.forever(val_data)  # one pass of the val half per epoch at the 50/50 split
        train = search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, device, args, log, epoch,
                             run_dir / "alpha_steps.jsonl")
        val_loss, val_acc = common.evaluate(model, val_data, device, args.amp, args.steps_per_epoch)
        scheduler.step()
        genotype = model.genotype()
        with torch.no_grad():
            mu = {c: m.float() for c, m in model.arch_means().items()}  # phi(eps), each (E, n_ops)
        weights = {c: F.softmax(m, -1).tolist() for c, m in mu.items()}
        alpha_history.append(weights)
        row = {"epoch": epoch, "lr": lr, **train, "val_loss": val_loss, "val_acc": val_acc, "seconds": time.time() - t0,
               "genotype": common.genotype_to_dict(genotype),
               **(common.nb201_epoch_row(args, genotype, log) if nb201 else {})}
        history.append(row)
        common.append_jsonl(run_dir / "search_history.jsonl", row)
        common.append_jsonl(run_dir / "alphas.jsonl", {"epoch": epoch, "softmax": weights,
                                                       "alpha": {c: m.tolist() for c, m in mu.items()}})
        common.write_json(run_dir / "genotype.json", common.genotype_to_dict(genotype))
        log.info("search epoch %d lr %.5f train_acc %.2f val_acc %.2f %.1fs", epoch, lr, row["train_acc"], val_acc,
                 row["seconds"])
        log.info("genotype %s", genotype)
        # TRY NOT TO MODIFY: checkpoint with everything needed to resume, generators (phi, eps) included
        common.save_checkpoint(run_dir / "checkpoint_search.pt", {
            **common.make_checkpoint("vim_nas", epoch, args, generator, model=model, w_optimizer=w_optimizer,
                                     a_optimizer=a_optimizer, scheduler=scheduler),
            "arch": {c: g.state_dict() for c, g in model.generators().items()},
            "alphas": {c: m.cpu() for c, m in mu.items()},
            "genotype": common.genotype_to_dict(genotype)})
    genotype = model.genotype()  # also when a resumed run had nothing left to search
    steps_rows = keep_steps(run_dir / "alpha_steps.jsonl", args.epochs)
    common.plot_alphas(alpha_history[-1], run_dir / "alphas.png", primitives, title="softmax(phi(eps))")
    common.plot_alpha_evolution(alpha_history, run_dir / "alpha_evolution.png", primitives)
    plot_anytime_weights(steps_rows, run_dir / "anytime_weights.png", primitives)
    common.plot_curves(history, ["train_acc", "val_acc"], run_dir / "search_curves.png", "VIM-NAS search")
    summary = {"epochs": len(history), "val_acc": history[-1]["val_acc"], "train_acc": history[-1]["train_acc"],
               "seconds": sum(r["seconds"] for r in history),
               "seconds_per_step": sum(r["seconds_per_step"] for r in history) / len(history)}
    if nb201:  # Deviation 13: settling reads DARTS cells
        if args.nb201_benchmark:
            common.plot_nb201_history(history, run_dir / "nb201.png")
        return genotype, summary
    settle = settling([{"softmax": w} for w in alpha_history])
    # share of the final cell already chosen by phi at initialisation (step 0), before any training
    settle["init_agreement"] = settling([steps_rows[0]] + [{"softmax": w} for w in alpha_history])["agreement"][0]
    log.info("settling: cell final after epoch %d of %d, %.0f %% of it chosen at initialisation, mean max softmax "
             "weight %.3f", settle["genotype_epochs"], settle["epochs"], 100 * settle["init_agreement"],
             settle["max_weight"][-1])
    summary["settling"] = settle
    return genotype, summary


# =====================================================================================
# main: search -> derive -> retrain -> test
# =====================================================================================
def main(args):
    args, device = common.prepare(args, __file__)  # --resume's flags, the device, every flag's range
    if args.space == "darts" and args.layers < 3:  # NB-201's N may be 1 or 2
        raise UsageError(f"--layers must be >=3, got {args.layers} (the DARTS space; --space nb201 allows N >= 1)")
    genotype = common.parse_genotype(args.genotype) if args.genotype else None  # fail before any work
    return common.run(args, __file__, "vim_nas", device, genotype, search)


if __name__ == "__main__":
    common.cli(main, Args)
