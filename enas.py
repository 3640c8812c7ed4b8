"""ENAS: Efficient Neural Architecture Search via Parameter Sharing (micro / convolutional-cell space).

Hieu Pham, Melody Y. Guan, Barret Zoph, Quoc V. Le, Jeff Dean. ICML 2018. arXiv:1802.03268,
https://arxiv.org/abs/1802.03268. Official code: melodyguan/enas @ 4bcfd73 (TensorFlow 1, Python 2),
checked against src/cifar10/micro_controller.py, micro_child.py, main.py, src/utils.py,
src/common_ops.py and scripts/cifar10_micro_{search,final}.sh.

Reproduce the paper (search, pick the cell, retrain, test on CIFAR-10):
    python enas.py                                  # 150-epoch search, then retrain the best sampled cell
    python enas.py --genotype ENAS                  # retrain the paper's figure cell only
    python enas.py --genotype "0 2 0 0 0 4 0 1 0 4 1 1 1 0 0 1 0 2 1 1 1 0 1 0 0 3 0 2 1 1 3 1 1 0 0 4 0 3 1 1"
                        # an ENAS arc, normal then reduce cell (here the official final script's fixed_arc)
    python enas.py --controller-train-steps 0       # ablation: weight sharing with the untrained policy
    python enas.py --space nb201                    # NAS-Bench-201 cell, the benchmark's ENAS protocol (Deviation 15)
    python enas.py --space nb201 --nb201-benchmark NAS-Bench-201-v1_1-096897.pth  # + benchmark lookup per epoch

Equations implemented. The paper numbers only Eq. (1); (2)-(8) are our labels for the unnumbered
formulas of the paper and the official code, the same labels as in notebooks/enas.ipynb:
    Eq. (1)  grad_w E_{m~pi}[L(m; w)] ~ 1/M sum_i grad_w L(m_i; w), M = 1     -> train_child_epoch
    Eq. (2)  grad_theta E_{m~pi}[R] ~ (R - b) grad_theta log pi(m; theta)     -> reinforce_loss
    Eq. (3)  b <- b - (1 - bl_dec)(b - R), updated before the advantage      -> update_baseline
    Eq. (4)  R = acc(m, one val minibatch) + w_H * H[pi(.; theta)]           -> train_controller
    Eq. (5)  logits = C * tanh(l / T) (op logits: C / op_tanh_reduce)       -> shape_logits
    Eq. (6)  log pi(m) = sum_decisions log softmax(logits)[a],  H = sum -p log p -> Controller.forward
    Eq. (7)  index logits v' tanh(W1 h_j + W2 h_t) over the earlier nodes j   -> Controller._cell
    Eq. (8)  node = op_a(x_i) + op_b(x_j); cell output = the loose ends, concatenated -> EnasCell.forward
    paper, "deriving architectures": sample several, keep the best reward on one val minibatch -> derive
    --space nb201: the controller samples one op per edge of the 6-edge NAS-Bench-201 cell (Eq. (5)-(6) per
             edge), the shared network runs it in every cell, REINFORCE as above -> NB201Controller, NB201SharedNet,
             derive_nb201 (best of sampled cells, each on its own val minibatch)

Deviations from the paper (each is what the official code does, unless marked "ours"):
    1. The controller is a 1-layer LSTM with 64 units and no biases, all weights U(-0.1, 0.1), op-logit
       bias initialised to [10, 10, 0, 0, 0] and a fixed [0.25, 0.25, -0.25, -0.25, -0.25] added to
       normal-cell op logits (paper: 100 units [mem]). Adam lr 0.0035 (constant, main.py lines 159-161),
       beta1 0, epsilon 1e-3, with TF1's update (utils.py lines 217-219): epsilon is added outside the bias
       correction, theta -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + epsilon) (TFAdam; torch.optim.Adam
       with eps=1e-3 would take first steps up to 1 / sqrt(1 - 0.999) = 32x larger). Tanh constant 1.10
       (op logits 1.10 / 2.5), no temperature; entropy weight 1e-4; baseline decay 0.99 (paper [mem,
       unverified]: lr 0.00035, tanh constant 2.5, temperature 5.0; the authors say they retuned,
       melodyguan/enas#11). The bias of 10 saturates the tanh: the sep-conv op logits stay at 0.44 with
       zero gradient, which keeps every op probability in a narrow band (notebook sec. 2).
    2. The entropy bonus enters only through the reward, Eq. (4), with the entropy held constant
       (stop-gradient), not as a separate loss term.
    3. The controller trains after every child epoch: 30 Adam steps, each on the mean loss of 10
       sampled cells (SyncReplicasOptimizer with 10 aggregated gradients); every sample gets its
       own val minibatch and updates the baseline, in order.
    4. Child training (Eq. (1), M = 1): a fresh cell per minibatch, SGD Nesterov 0.9, SGDR cosine
       0.05 -> 0.0005 with restarts (T0 10, Tmul 2), L2 1e-4 in the loss = weight_decay 2e-4 on every
       trained weight incl. BN (utils.py lines 118-123), dropout 0.1 before the classifier, auxiliary head
       (weight 0.4), 45K/5K split of the training set (the last 5K validate), no cutout, no drop-path
       during search. The L2 term gives every shared variable a gradient every step, and the ops a cell
       does not use are computed and discarded (micro_child.py lines 567-576, weights sliced by input
       index, lines 589-598), so their weights still take the weight-decay and momentum step: enas.py
       gives them a zero gradient (PyTorch would leave it None and skip them).
    5. No gradient clipping by default, as in effect in the official code: main.py passes clip_mode="norm"
       (line 127) with --child_grad_bound 5 (line 54), but get_train_ops appends the unclipped gradient
       (utils.py line 149, clipped.append(g)), so nothing is clipped. ours: --grad-clip 5 clips the global
       norm (the official "norm" mode meant each tensor by its own norm); 0 = no clipping.
    6. ours: the shared network follows the official child but reuses DARTS pieces where they do
       the same job: common.cell_preprocess (ReLU-1x1-BN, FactorizedReduce after a reduction; the
       official code skips the 1x1 when widths already match); a reduction cell applies stride 2 to
       ops reading the cell inputs, as the official fixed network and common.Cell do (the official
       search network instead factor-reduces the previous output first and runs the reduce cell at
       stride 1, micro_child.py lines 275-279); common.AuxiliaryHeadCIFAR, placed after the cell that
       follows the 2nd reduction as in micro_child.py lines 109-113 (aux_head_indices = [pool_layers[-1]
       + 1]); PyTorch default weight init (official: He normal).
    7. Every (node, input slot, input state) has its own five ops, as the official weights are
       per-slot and sliced by input index. All BNs use batch statistics during search, in every pass
       (micro_child.py lines 243-244 force is_training=True for the search network). ours: the reward,
       the scoring of the derived cells (Deviation 10) and the search's val accuracy are computed
       without dropout (model.eval()); in the official code the same is_training=True keeps dropout 0.1
       on (micro_child.py lines 333-334) in the reward pass (build_valid_rl, line 804), which main.py
       lines 308-313 also use to score the derived cells.
    8. ours: loose ends are the computed nodes no node reads. The official code also concatenates
       an unused cell input (factor-reduced in a reduction cell); common.Cell cannot, so it is
       left out in search and retraining alike.
    9. ours: reward minibatches come from the augmented val half (common.search_loaders, random
       crop and flip for CIFAR); the official reward pass reads unaugmented val images
       (micro_controller.py line 232 calls build_valid_rl() with shuffle=False, so micro_child.py
       lines 800-802 skip the crop and flip).
   10. Derivation: every epoch, --derive-samples 10 cells (main.py lines 308-327 print 10 with their
       val-minibatch accuracy) are scored on one val minibatch; the first best of the last epoch is the
       result (ours: picked automatically; the official code prints them). ours: all candidates share
       one minibatch (official: a fresh one each); the paper says "several". The val minibatches of the
       reward, the derivation and the search's val accuracy are held-out training images (the last
       --train-portion 0.9 -> 10 %, as data_utils.py lines 51-56 hold out the last 5,000 of the 50,000):
       the search never loads the test set, so no cell is selected on it. (The official search also
       evaluates the shared network on the test set every epoch, main.py line 333; ours does not.)
   11. ours: retraining is common.retrain, the DARTS-protocol NetworkCIFAR built from the cell as a
       Genotype (skip_connect = identity, concat = loose ends), not ENAS's own fixed child network
       (which adds a 1x1 base conv per cell and concatenates unused inputs). The defaults are the
       final script's where common.retrain has the knob: 630 epochs, batch 144, lr 0.05, weight
       decay 4e-4 (L2 2e-4), C 36, 15 + 2 = 17 cells (reductions at cells 5 and 11 as in the official
       network); auxiliary 0.4 and cutout 16 (the paper's 2.89 % needs cutout, the script lacks it,
       melodyguan/enas#39). The auxiliary head reads the output of cell 11, the second reduction cell
       itself (common.NetworkCIFAR: cell 2 * layers // 3, as quark0/darts model.py); the official child
       reads cell 12, the normal cell after it (micro_child.py lines 109-113). It is trained and decayed
       like every other weight (official: neither, Deviation 14). Not reproduced: Nesterov, SGDR
       restarts to 1e-4, dropout 0.2 before the classifier, the depth-scaled drop-path (keep 0.6 at the
       last cell; ours 0.2 everywhere, about its average over the 17 cells), and clipping is at 5
       (grad_clip of common.retrain).
   12. ours: alphas.jsonl holds, per epoch, the policy's marginal probabilities estimated from
       --stat-samples cells: the mean over samples of each decision's softmax (an unbiased,
       Rao-Blackwellised estimate of P(decision), exact given the sampled prefix), and the expected
       number of times each (input, op) pair feeds each node.
   13. ours: --amp (bfloat16 autocast, CUDA only) for the shared network and retraining; the
       controller always runs in float32.
   14. The search network's auxiliary head is never trained: micro_child.py lines 721-723 leave the
       aux_head variables out of tf_variables, and get_train_ops differentiates, decays (utils.py lines
       118-125) and updates (lines 237-238) only those, so the head keeps its random initialisation and
       only passes the 0.4-weighted aux loss down to the cells below it (the final script's training
       too). enas.py does the same by default (the head's parameters get no gradient step and no weight
       decay); ours, --train-aux-head: trained and decayed like every other weight.
   15. --space nb201 follows the benchmark authors' ENAS (D-X-Y/AutoDL-Projects @ f46486e):
       exps/NAS-Bench-201-algos/ENAS.py, scripts-search/NAS-Bench-201-algos/ENAS.sh lines 21-22 and 43-47,
       configs/nas-benchmark/algos/ENAS.config lines 2-16, xautodl/models/cell_searchs/search_model_enas.py and
       search_model_enas_utils.py. Controller (utils lines 13-74): a 2-layer LSTM with 32 units walks the 6
       edges, logits = 2.5 tanh(W h / 5) (Eq. (5) with temperature 5, tanh constant 2.5), an op sampled per
       edge, its embedding fed back; input, LSTM layer-0 weights, embedding and output weight U(-0.1, 0.1),
       the rest torch's default. torch Adam lr 1e-3, betas (0, 0.999), eps 1e-3 (ENAS.py lines 313-318;
       not TFAdam), controller gradient-norm clip 5 (line 169); 50 updates of 20 aggregated cells per epoch,
       entropy weight 1e-4, baseline decay 0.99 (ENAS.sh lines 43-46). Shared network (search_model_enas.py
       lines 23-60): C 16, N 5, cell ops affine=False, the stem, resblocks and lastact as the benchmark's;
       SGD Nesterov lr 0.05, weight decay 2.5e-4 on every weight, batch 128, 250 epochs, clip 5 (ENAS.py
       line 63), cosine to 5e-4 with T_max 10 and no restart (optimizers.py CosineAnnealingLR: lr = eta_min +
       (lr - eta_min)(1 + cos(pi e / 10)) / 2 for every epoch e, so it swings back up with period 20:
       --lr-schedule cosine); no dropout, no auxiliary head; the 25K/25K halves, the val half with the
       train augmentation (ENAS.py line 282, as Deviation 9). Derived cell (the official rule): every
       epoch the best of 10 sampled cells (get_best_arch, lines 203-228: each on its own val minibatch) is
       logged with its benchmark accuracies; after the last epoch the best of --final-samples 100 sampled
       cells is the result (lines 502-504). ours: BN in the cell ops uses batch statistics always (ENAS.sh
       takes track_running_stats as its BN argument; we use 0, as Deviation 7); the baseline starts at 0
       (official: the first reward); the entropy bonus is held constant (Deviation 2; the official reward
       keeps its gradient); retraining is the benchmark's 200-epoch recipe (common.NB201_RETRAIN_ARGS) or a
       lookup with --nb201-benchmark.
   16. There is no official ImageNet retraining for the ENAS micro cell (melodyguan/enas has CIFAR-10 and
       Penn Treebank scripts only): --dataset imagenet uses DARTS's train_imagenet.py recipe
       (common.IMAGENET_RETRAIN_ARGS); Args has no IMAGENET of its own. --channels-last and --compile apply
       to the shared network (common.speed_up), as in darts.py.
   Not verified against the paper PDF (no full text was readable here): the section numbers, the
   paper-side hyperparameters in 1, and what its 4.6 M parameters count (notebooks/enas.ipynb, sec. 6).
   Plus the deviations shared by every method file, listed in common.py's docstring (C1-C5).

Runs: --resume RUN_DIR continues a killed run (controller, its Adam state and the baseline are in
the checkpoint); under torchrun only retraining is distributed (README.md).
"""

import dataclasses
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import NB201_EDGES, NB201_PRIMITIVES, OPS, Genotype, UsageError, arg

ENAS_OPS = ["sep_conv_3x3", "sep_conv_5x5", "avg_pool_3x3", "max_pool_3x3", "skip_connect"]  # official ids 0..4


# =====================================================================================
# Args
# =====================================================================================
@dataclasses.dataclass
class Args(common.BaseArgs):
    exp_name: str = arg("enas", "name of the method; prefix of the run folder", "run")
    # Algorithm specific arguments (melodyguan/enas scripts/cifar10_micro_search.sh unless noted)
    epochs: int = arg(150, "micro_search.sh --num_epochs=150", check=">=1")
    batch_size: int = arg(160, "micro_search.sh --batch_size=160 (child steps and reward minibatches)", check=">=2")
    lr: float = arg(0.05, "micro_search.sh --child_lr_max=0.05 (SGDR: cosine with warm restarts)", check=">0")
    lr_min: float = arg(0.0005, "micro_search.sh --child_lr_min=0.0005", check=">=0")
    lr_t0: int = arg(10, "micro_search.sh --child_lr_T_0=10 (epochs in the first cosine period)", check=">=1")
    lr_t_mul: int = arg(2, "micro_search.sh --child_lr_T_mul=2 (restarts at epochs 10, 30, 70)", check=">=1")
    lr_schedule: str = arg("sgdr", "sgdr: cosine with warm restarts (lr_t0, lr_t_mul) | cosine: cos(pi e / lr_t0) "
                           "without restarts, swinging back up (NAS-Bench-201 ENAS.config T_max 10)",
                           check=("sgdr", "cosine"))
    momentum: float = arg(0.9, "utils.py get_train_ops: momentum 0.9, Nesterov", check="[0,1)")
    weight_decay: float = arg(2e-4, "2 x micro_search.sh --child_l2_reg=1e-4 (TF adds l2 * sum w^2 to the loss)",
                              check=">=0")
    init_channels: int = arg(20, "micro_search.sh --child_out_filters=20", check=">=1")
    layers: int = arg(8, "cells: micro_search.sh --child_num_layers=6 normal + 2 reduction (micro_child.py); at "
                      "least 3: reduction cells sit at layers//3 and 2*layers//3, so fewer cells have no normal "
                      "cell and the normal arc would be rewarded for nothing (--space nb201: N, cells per stage, "
                      "at least 1)", check=">=1")
    nodes: int = arg(5, "micro_search.sh --child_num_cells=5 computed nodes per cell (B = nodes + 2)", check=">=1")
    dropout: float = arg(0.1, "1 - micro_search.sh --child_keep_prob=0.90 (before the classifier)", check="[0,1)")
    search_auxiliary: bool = arg(True, "micro_search.sh --child_use_aux_heads (weight --auxiliary-weight)")
    train_aux_head: bool = arg(False, "ours: train the search network's auxiliary head (and decay it); the official "
                               "code leaves it at its initialisation (Deviation 14)")
    grad_clip: float = arg(0.0, "0 = no clipping: the official clip is a no-op (Deviation 5); 5 = --child_grad_bound",
                           check=">=0")
    train_portion: float = arg(0.9, "data_utils.py num_valids=5000: the last 5K of 50K validate", check="(0,1)")
    lstm_size: int = arg(64, "main.py lstm_size=64, lstm_num_layers=1 (paper: 100 units [mem])", check=">=1")
    lstm_layers: int = arg(1, "LSTM layers of the controller (main.py lstm_num_layers=1; more need --space nb201)",
                           check=">=1")
    controller_grad_clip: float = arg(0.0, "controller gradient-norm clip; 0 = none (melodyguan: none; NAS-Bench-201 "
                                      "ENAS.py line 169: 5)", check=">=0")
    arch_lr: float = arg(0.0035, "micro_search.sh --controller_lr=0.0035 (TF1 Adam, beta1 0, epsilon 1e-3, "
                         "Deviation 1)", check=">0", aliases=("--controller-lr",))
    controller_train_steps: int = arg(30, "micro_search.sh --controller_train_steps=30 updates per epoch "
                                      "(0 = never train the controller)", check=">=0")
    controller_num_aggregate: int = arg(10, "micro_search.sh --controller_num_aggregate=10 cells per update",
                                        check=">=1")
    entropy_weight: float = arg(1e-4, "micro_search.sh --controller_entropy_weight=0.0001 (reward bonus)",
                                check=">=0")
    bl_dec: float = arg(0.99, "main.py --controller_bl_dec=0.99 (baseline decay; below 1, or it never moves)",
                        check="[0,1)")
    tanh_constant: float = arg(1.10, "micro_search.sh --controller_tanh_constant=1.10 (paper: 2.5 [mem]); 0 = no tanh",
                               check=">=0")
    op_tanh_reduce: float = arg(2.5, "micro_search.sh --controller_op_tanh_reduce=2.5 (op logits: C / 2.5)",
                                check=">0")
    controller_temperature: float = arg(0.0, "main.py --controller_temperature, unset in micro_search.sh (paper: 5 "
                                        "[mem]); 0 = none", check=">=0", aliases=("--temperature",))
    derive_samples: int = arg(10, "main.py: 10 sampled cells scored on a val minibatch per epoch; best is kept",
                              check=">=1")
    stat_samples: int = arg(100, "ours: sampled cells per epoch behind the marginals in alphas.jsonl", check=">=1")
    final_samples: int = arg(0, "after the search, the best of this many sampled cells (each on its own val "
                             "minibatch) is the result; 0 = the last epoch's best of --derive-samples (main.py)",
                             check=">=0")
    space: str = arg("darts", "darts | nb201: the NAS-Bench-201 cell (4 nodes, 6 edges, 5 ops) in the benchmark's "
                     "macro network; defaults then follow AutoDL-Projects ENAS.sh and ENAS.config (Deviation 15; "
                     "see [--space nb201: ...])", check=("darts", "nb201"))
    nb201_benchmark: str = arg("", common.NB201_BENCHMARK_HELP)
    # retraining: scripts/cifar10_micro_final.sh where common.retrain has the knob (Deviation 11)
    retrain_epochs: int = arg(630, "micro_final.sh --num_epochs=630", "retrain", ">=1")
    retrain_batch_size: int = arg(144, "micro_final.sh --batch_size=144", "retrain", ">=2")
    retrain_lr: float = arg(0.05, "micro_final.sh --child_lr_max=0.05 (here cosine to 0)", "retrain", ">0")
    retrain_weight_decay: float = arg(4e-4, "2 x micro_final.sh --child_l2_reg=2e-4", "retrain", ">=0")
    retrain_layers: int = arg(17, "micro_final.sh --child_num_layers=15 + 2 reduction cells (at least 3: "
                              "reduction cells sit at 1/3 and 2/3, so fewer cells have no normal cell)", "retrain",
                              ">=3")

    # Deviation 15: D-X-Y/AutoDL-Projects configs/nas-benchmark/algos/ENAS.config lines 2-16 and
    # scripts-search/NAS-Bench-201-algos/ENAS.sh lines 21-22, 43-47; the controller's own defaults,
    # search_model_enas_utils.py lines 17-20
    NB201 = {"epochs": 250, "batch_size": 128, "lr": 0.05, "lr_min": 0.0005, "lr_schedule": "cosine", "lr_t0": 10,
             "momentum": 0.9, "weight_decay": 2.5e-4, "init_channels": 16, "layers": 5, "dropout": 0.0,
             "search_auxiliary": False, "grad_clip": 5.0, "train_portion": 0.5, "lstm_size": 32, "lstm_layers": 2,
             "arch_lr": 0.001, "controller_grad_clip": 5.0, "controller_train_steps": 50,
             "controller_num_aggregate": 20, "entropy_weight": 1e-4, "bl_dec": 0.99, "tanh_constant": 2.5,
             "controller_temperature": 5.0, "derive_samples": 10, "final_samples": 100}


# =====================================================================================
# Search space: the controller and the shared network
# =====================================================================================
def shape_logits(logits, tanh_constant, temperature):
    """Eq. (5), official order (micro_controller.py): divide by T, then squash into (-C, C)."""
    if temperature > 0:
        logits = logits / temperature
    if tanh_constant > 0:
        # ALGO LOGIC: Eq. (5): logits = C * tanh(l / T)
        logits = tanh_constant * torch.tanh(logits)
    return logits


class Controller(nn.Module):
    """The LSTM policy pi(m; theta). Per cell: two warm-up steps give the anchors of the cell inputs
    (zero vectors as feedback, h W1 as attention keys), then per node four decisions, in this order:
    input 1, input 2 (attention over the anchors, Eq. (7)), op 1, op 2 (softmax over ENAS_OPS), and
    one more step whose output is the node's anchor. The reduce cell continues the LSTM state."""

    def __init__(self, nodes=5, lstm_size=64, tanh_constant=1.10, op_tanh_reduce=2.5, temperature=0.0):
        super().__init__()
        H, K = lstm_size, len(ENAS_OPS)
        self.nodes, self.temperature = nodes, temperature
        self.tanh_constant, self.op_tanh = tanh_constant, tanh_constant / op_tanh_reduce
        self.lstm = nn.LSTMCell(H, H, bias=False)  # common_ops.py stack_lstm: no biases
        self.g_emb = nn.Parameter(torch.empty(1, H))  # input of the first step of every node
        self.w_emb = nn.Embedding(K, H)  # feedback after an op decision
        self.w_soft = nn.Linear(H, K)  # op logits; its bias is b_soft
        self.w_attn1, self.w_attn2 = nn.Linear(H, H, bias=False), nn.Linear(H, H, bias=False)
        self.v_attn = nn.Linear(H, 1, bias=False)
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)
        with torch.no_grad():  # Deviation 1: favour the two sep convs at the start
            self.w_soft.bias.copy_(torch.tensor([10.0, 10.0] + [0.0] * (K - 2)))
        self.register_buffer("b_soft_no_learn", torch.tensor([0.25, 0.25] + [-0.25] * (K - 2)), persistent=False)

    def forward(self, batch=1, arcs=None):
        """Sample `batch` architectures, or score the given ones (arcs=(normal, reduce), (B, 4*nodes)
        each). Returns arcs, log_prob (B,), entropy (B,) and, per cell, the softmax of every
        decision in arc order [idx1, op1, idx2, op2, ...] (list of (B, n_choices))."""
        h = c = self.g_emb.new_zeros(batch, self.g_emb.shape[1])
        seqs, probs, log_prob, entropy = [], [], 0.0, 0.0
        for k, normal in enumerate((True, False)):  # the reduce cell continues the normal cell's LSTM state
            seq, lp, ent, p, h, c = self._cell(batch, h, c, normal, None if arcs is None else arcs[k])
            seqs.append(seq)
            probs.append(p)
            log_prob, entropy = log_prob + lp, entropy + ent
        return tuple(seqs), log_prob, entropy, probs

    def _decide(self, logits, given):
        """Sample (or take `given`); Eq. (6) terms: log-prob of the choice and entropy of the softmax."""
        log_p = F.log_softmax(logits, dim=-1)  # (B, n_choices)
        a = torch.multinomial(log_p.exp(), 1).squeeze(1) if given is None else given
        # ALGO LOGIC: Eq. (6): log pi += log softmax(logits)[a];  H += -sum p log p (no gradient)
        return a, log_p.gather(1, a[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1).detach(), log_p.exp()

    def _cell(self, B, h, c, normal, given):
        inputs = self.g_emb.expand(B, -1)
        anchors, keys = [], []  # per state: feedback vector (B, H) and attention key W1 h (B, H)
        for _ in range(2):  # the two cell inputs
            h, c = self.lstm(inputs, (h, c))
            anchors.append(torch.zeros_like(h))
            keys.append(self.w_attn1(h))
        seq, probs = [None] * (4 * self.nodes), [None] * (4 * self.nodes)
        log_prob, entropy = h.new_zeros(B), h.new_zeros(B)
        rows = torch.arange(B, device=h.device)
        for i in range(self.nodes):
            for slot in range(2):  # input 1, input 2: positions 4i, 4i+2 of the arc
                pos = 4 * i + 2 * slot
                h, c = self.lstm(inputs, (h, c))
                # ALGO LOGIC: Eq. (7): logit_j = v' tanh(W1 h_j + W2 h_t) over states j < i + 2
                query = torch.tanh(torch.stack(keys, 1) + self.w_attn2(h)[:, None])  # (B, i+2, H)
                logits = shape_logits(self.v_attn(query).squeeze(-1), self.tanh_constant, self.temperature)
                seq[pos], lp, ent, probs[pos] = self._decide(logits, None if given is None else given[:, pos])
                log_prob, entropy = log_prob + lp, entropy + ent
                inputs = torch.stack(anchors, 1)[rows, seq[pos]]  # (B, H): the chosen state's anchor
            for slot in range(2):  # op 1, op 2: positions 4i+1, 4i+3
                pos = 4 * i + 2 * slot + 1
                h, c = self.lstm(inputs, (h, c))
                # Eq. (5) with C / op_tanh_reduce; the normal cell adds its fixed offset after the tanh
                logits = shape_logits(self.w_soft(h), self.op_tanh, self.temperature)  # (B, n_ops)
                if normal:
                    logits = logits + self.b_soft_no_learn
                seq[pos], lp, ent, probs[pos] = self._decide(logits, None if given is None else given[:, pos])
                log_prob, entropy = log_prob + lp, entropy + ent
                inputs = self.w_emb(seq[pos])
            h, c = self.lstm(inputs, (h, c))  # the node's own anchor
            anchors.append(h)
            keys.append(self.w_attn1(h))
            inputs = self.g_emb.expand(B, -1)
        return torch.stack(seq, 1), log_prob, entropy, probs, h, c  # seq: (B, 4*nodes)


def loose_ends(cell_arc):
    """Computed nodes (states 2 .. nodes+1) that no node reads: the cell's output (Deviation 8)."""
    nodes = len(cell_arc) // 4
    used = {int(cell_arc[4 * i + 2 * s]) for i in range(nodes) for s in range(2)}
    return [k for k in range(2, nodes + 2) if k not in used]


class EnasCell(nn.Module):
    """The shared cell: every (node i, input slot s, input state j) owns the five ENAS ops; a
    forward runs only the two ops per node that the arc names (Eq. (8)). The loose ends go
    through ReLU, one 1x1 conv whose weight is sliced per state (micro_child.py final_conv), BN."""

    def __init__(self, nodes, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction, self.nodes, self.C = reduction, nodes, C
        self.preprocess0, self.preprocess1 = common.cell_preprocess(C_prev_prev, C_prev, C, reduction_prev)
        self.ops = nn.ModuleList(  # ops[i][slot][j][k]; Deviation 6: stride 2 on the cell inputs of a reduction
            nn.ModuleList(nn.ModuleList(nn.ModuleList(OPS[name](C, 2 if reduction and j < 2 else 1, True)
                                                      for name in ENAS_OPS) for j in range(i + 2))
                          for _ in range(2)) for i in range(nodes))
        self.final_conv = nn.Parameter(torch.randn(nodes, C, C) * (2.0 / C) ** 0.5)  # one (C, C) 1x1 per node
        self.final_bn = nn.BatchNorm2d(C)

    def forward(self, s0, s1, cell_arc):  # cell_arc: 4*nodes ints [idx1, op1, idx2, op2, ...]
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.nodes):
            j1, k1, j2, k2 = cell_arc[4 * i:4 * i + 4]
            # ALGO LOGIC: Eq. (8): node = op_a(x_i) + op_b(x_j), each op with its own (node, slot, input) weights
            states.append(self.ops[i][0][j1][k1](states[j1]) + self.ops[i][1][j2][k2](states[j2]))
        loose = loose_ends(cell_arc)
        # ALGO LOGIC: Eq. (8): output = BN(conv1x1(ReLU(concat(loose ends)))) with the loose ends' weight slices
        w = self.final_conv[[k - 2 for k in loose]].transpose(0, 1).reshape(self.C, len(loose) * self.C, 1, 1)
        out = torch.cat([states[k] for k in loose], dim=1)  # (B, len(loose)*C, H, W)
        return self.final_bn(F.conv2d(F.relu(out), w))  # (B, C, H, W)


class Network(nn.Module):
    """The shared child network: stem, `layers` EnasCells (all normal cells follow the normal arc,
    all reduction cells the reduce arc), optional auxiliary head, ReLU, global pool, dropout, linear."""

    def __init__(self, C, num_classes, layers, nodes=5, stem_multiplier=3, auxiliary=True, dropout=0.1):
        super().__init__()
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in common.reduction_layers(layers)
            C_curr = C_curr * 2 if reduction else C_curr
            self.cells.append(EnasCell(nodes, C_prev_prev, C_prev, C_curr, reduction, reduction_prev))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, C_curr  # the cell output is C_curr wide (final_conv)
            if i == min(common.reduction_layers(layers)[1] + 1, layers - 1):  # micro_child.py aux_head_indices
                self.aux_index, C_aux = i, C_prev
        self.auxiliary_head = common.AuxiliaryHeadCIFAR(C_aux, num_classes) if auxiliary else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(C_prev, num_classes, bias=False)
        for m in self.modules():  # Deviation 7: batch statistics always, in train and eval mode
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None

    def forward(self, x, arc):  # arc = (normal cell arc, reduce cell arc), lists of ints
        logits_aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, arc[1] if cell.reduction else arc[0])
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = F.adaptive_avg_pool2d(F.relu(s1), 1).flatten(1)  # (B, C_prev)
        return self.classifier(self.dropout(out)), logits_aux


def arc_at(arcs, b):
    """Row b of a batch of sampled arcs as the (normal, reduce) lists of ints the network takes
    (--space nb201: a 1-tuple, the 6 edges' op indices)."""
    return tuple(a[b].tolist() for a in arcs)


class NB201Controller(nn.Module):
    """--space nb201 (search_model_enas_utils.py Controller, lines 13-74): an LSTM walks the 6 edges in
    NB201_EDGES order; per edge it outputs op logits (Eq. (5)), samples an op (Eq. (6)) and feeds the op's
    embedding to the next step. Same interface as Controller: forward(batch, arcs) -> ((ops (B, 6),),
    log_prob (B,), entropy (B,), [softmax (B, 5) per edge])."""

    def __init__(self, lstm_size=32, lstm_layers=2, tanh_constant=2.5, temperature=5.0):
        super().__init__()
        H, K = lstm_size, len(NB201_PRIMITIVES)
        self.tanh_constant, self.temperature = tanh_constant, temperature
        self.input_vars = nn.Parameter(torch.empty(1, 1, H))
        self.lstm = nn.LSTM(H, H, num_layers=lstm_layers)
        self.w_embd = nn.Embedding(K, H)
        self.w_pred = nn.Linear(H, K)
        for w in (self.input_vars, self.lstm.weight_hh_l0, self.lstm.weight_ih_l0, self.w_embd.weight,
                  self.w_pred.weight):
            nn.init.uniform_(w, -0.1, 0.1)  # lines 42-46; the other weights keep torch's default init

    def forward(self, batch=1, arcs=None):
        inputs, state = self.input_vars.expand(1, batch, -1), None  # (seq 1, B, H)
        ops, probs, log_prob, entropy = [], [], 0.0, 0.0
        for e in range(len(NB201_EDGES)):
            out, state = self.lstm(inputs, state)
            logits = shape_logits(self.w_pred(out[0]), self.tanh_constant, self.temperature)  # (B, 5), Eq. (5)
            log_p = F.log_softmax(logits, dim=-1)
            a = torch.multinomial(log_p.exp(), 1).squeeze(1) if arcs is None else arcs[0][:, e]
            # ALGO LOGIC: Eq. (6): log pi += log softmax(logits)[a];  H += -sum p log p (no gradient)
            log_prob = log_prob + log_p.gather(1, a[:, None]).squeeze(1)
            entropy = entropy - (log_p.exp() * log_p).sum(-1).detach()
            ops.append(a)
            probs.append(log_p.exp())
            inputs = self.w_embd(a)[None]  # (1, B, H)
        return (torch.stack(ops, 1),), log_prob, entropy, probs


class NB201SharedNet(nn.Module):
    """--space nb201 (search_model_enas.py TinyNetworkENAS): stem, common.nb201_layout(C, N) with a shared
    cell per "cell" entry (each edge owns the 5 benchmark ops, affine=False, batch statistics) and
    NB201ResNetBlock between stages, BN-ReLU, pool, linear. forward runs only the sampled op of each edge
    (search_cells.py forward_dynamic) and returns (logits, None) like Network."""

    def __init__(self, C, num_classes, N):
        super().__init__()
        self.stem = common.nb201_stem(C)
        self.cells = nn.ModuleList(
            nn.ModuleList(nn.ModuleList(common.NB201_OPS[name](c, c, 1, False, False) for name in NB201_PRIMITIVES)
                          for _ in NB201_EDGES) if kind == "cell" else common.NB201ResNetBlock(c_in, c)
            for kind, c_in, c in common.nb201_layout(C, N))
        self.lastact = common.nb201_lastact(4 * C)
        self.classifier = nn.Linear(4 * C, num_classes)
        self.auxiliary_head = None

    def forward(self, x, arc):  # arc = (6 op indices in NB201_EDGES order,)
        h = self.stem(x)
        for cell in self.cells:
            if isinstance(cell, nn.ModuleList):
                nodes = [h]
                for i in range(1, common.NB201_NODES):
                    # ALGO LOGIC: node i = sum_{j<i} op_(i,j)(node j), the op the controller sampled for edge (i, j)
                    nodes.append(sum(cell[e][arc[0][e]](nodes[j]) for e, (to, j) in enumerate(NB201_EDGES) if to == i))
                h = nodes[-1]
            else:
                h = cell(h)  # (B, 2C, H/2, W/2) after the first resblock, (B, 4C, H/4, W/4) after the second
        return self.classifier(F.adaptive_avg_pool2d(self.lastact(h), 1).flatten(1)), None


def nb201_arch(arc):
    """(6 op indices,) -> the benchmark's arch string."""
    return common.nb201_arch_str(NB201_PRIMITIVES[k] for k in arc[0])


# =====================================================================================
# Architecture update rule: REINFORCE with a moving-average baseline
# =====================================================================================
class TFAdam(torch.optim.Optimizer):
    """TF1's tf.train.AdamOptimizer, which the official controller uses (utils.py get_train_ops lines 217-219:
    beta1 0.0, epsilon 1e-3; no weight decay, no clipping, a constant lr, main.py lines 159-166). TF puts
    epsilon outside the bias correction ("epsilon hat" of the Adam paper, Sec. 2):
        m_t = b1 m + (1 - b1) g,  v_t = b2 v + (1 - b2) g^2,  lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)
        theta <- theta - lr_t m_t / (sqrt(v_t) + epsilon)
    torch.optim.Adam divides by sqrt(v_t / (1 - b2^t)) + epsilon instead, i.e. uses s_t epsilon with
    s_t = sqrt(1 - b2^t): at step 1 (s_1 = 0.032, sqrt(v_1) = s_1 |g|) its step is (s_1 |g| + eps) /
    (s_1 |g| + s_1 eps) times TF's, 32x for |g| << eps and 2x at |g| = eps / s_1 = 0.03 (Deviation 1,
    notebooks/enas.ipynb sec. 3). The state keeps torch Adam's names (step, exp_avg, exp_avg_sq)."""

    def __init__(self, params, lr, betas=(0.0, 0.999), eps=1e-3):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), eps = group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:  # TF's apply_gradients skips variables without a gradient
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] = t = int(state["step"]) + 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                # ALGO LOGIC: TF1 Adam: theta -= lr sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + epsilon)
                lr_t = group["lr"] * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t)
                p.addcdiv_(m, v.sqrt().add_(eps), value=-lr_t)


def update_baseline(baseline, reward, bl_dec):
    # ALGO LOGIC: Eq. (3): b <- b - (1 - bl_dec) * (b - R)
    return baseline - (1.0 - bl_dec) * (baseline - reward)


def reinforce_loss(log_prob, advantage):
    """Eq. (2): the gradient of mean_i -(R_i - b_i) log pi(m_i) is the REINFORCE estimate (averaged over
    the aggregated samples); the advantage is a constant."""
    # ALGO LOGIC: Eq. (2): loss = -(R - b) * log pi(m; theta)
    return -(advantage.detach() * log_prob).mean()


def train_controller(model, controller, c_optimizer, baseline, val_iter, device, args, log, epoch):
    """Deviation 3: controller_train_steps Adam steps, each on controller_num_aggregate cells; every
    cell is scored on its own val minibatch. Returns the new baseline and epoch means."""
    model.eval()  # no dropout in the reward pass (Deviation 7); BN keeps batch statistics
    controller.train()
    rewards, accs, losses, entropies = [], [], [], []
    for step in range(args.controller_train_steps):
        arcs, log_prob, entropy, _ = controller(args.controller_num_aggregate)
        advantages = []
        for b in range(args.controller_num_aggregate):
            x, y = (t.to(device, non_blocking=True) for t in next(val_iter))
            with torch.no_grad(), common.autocast(device, args.amp):
                logits, _ = model(x, arc_at(arcs, b))
            acc = (logits.argmax(1) == y).float().mean().item()
            # ALGO LOGIC: Eq. (4): R = val-minibatch accuracy + w_H * H (entropy as a constant)
            reward = acc + args.entropy_weight * entropy[b].item()
            baseline = update_baseline(baseline, reward, args.bl_dec)  # Eq. (3), before the advantage
            advantages.append(reward - baseline)
            rewards.append(reward)
            accs.append(acc)
        loss = reinforce_loss(log_prob, torch.tensor(advantages, device=log_prob.device))
        c_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        common.clip_grad(controller.parameters(), args.controller_grad_clip)  # 0 (default) = none
        c_optimizer.step()
        losses.append(loss.item())
        entropies += entropy.tolist()
        if (step + 1) % args.report_freq == 0 or step + 1 == args.controller_train_steps:
            log.info("controller epoch %d step %d/%d reward %.4f baseline %.4f entropy %.2f", epoch, step + 1,
                     args.controller_train_steps, sum(rewards) / len(rewards), baseline, entropy.mean().item())
    def mean(v):
        return sum(v) / len(v) if v else None

    return baseline, {"reward": mean(rewards), "reward_acc": mean(accs), "controller_loss": mean(losses),
                      "entropy": mean(entropies), "baseline": baseline}


# =====================================================================================
# Genotype derivation
# =====================================================================================
def arc_to_genotype(arc):
    """(normal arc, reduce arc) -> Genotype: the two (op, input) pairs of every node in arc order,
    concat = the loose ends (Deviation 8); skip_connect is the identity (stride 1)."""
    def pairs(cell_arc):
        return [(ENAS_OPS[int(cell_arc[4 * i + 2 * s + 1])], int(cell_arc[4 * i + 2 * s]))
                for i in range(len(cell_arc) // 4) for s in range(2)]

    return Genotype(normal=pairs(arc[0]), normal_concat=loose_ends(arc[0]),
                    reduce=pairs(arc[1]), reduce_concat=loose_ends(arc[1]))


def parse_arc(text, nodes=5):
    """An ENAS arc as the official --child_fixed_arc writes it: 4*nodes ints for the normal cell,
    then 4*nodes for the reduce cell. Returns (normal, reduce) or raises UsageError."""
    try:
        v = [int(t) for t in text.split()]
    except ValueError:
        raise UsageError(f"an ENAS arc is whitespace-separated integers, got {text!r}") from None
    if len(v) != 8 * nodes:
        raise UsageError(f"an ENAS arc with {nodes} nodes needs {8 * nodes} numbers (normal then reduce), "
                         f"got {len(v)}")
    for pos, a in enumerate(v):
        i, is_op = (pos % (4 * nodes)) // 4, pos % 2
        if not 0 <= a < (len(ENAS_OPS) if is_op else i + 2):
            raise UsageError(f"ENAS arc entry {pos} = {a}: node {i + 2} can read states 0..{i + 1}, ops are "
                             f"0..{len(ENAS_OPS) - 1}")
    return v[:4 * nodes], v[4 * nodes:]


@torch.no_grad()
def derive(model, controller, x, y, n, amp=False):
    """The paper's derivation: sample n cells, score each on the same val minibatch (Deviation 10); returns the
    sampled arcs and their accuracies (%). The first best one is the derived cell."""
    model.eval()
    arcs, _, _, _ = controller(n)
    with common.autocast(x.device, amp):
        accs = [common.accuracy(model(x, arc_at(arcs, b))[0], y) for b in range(n)]
    return [arc_at(arcs, b) for b in range(n)], accs


@torch.no_grad()
def derive_nb201(model, controller, val_iter, n, device, amp=False):
    """--space nb201, the official rule (ENAS.py get_best_arch, lines 203-228): sample n cells, score each on
    its own val minibatch; returns the arcs and their accuracies (%); the first best one is kept."""
    model.eval()
    arcs, _, _, _ = controller(n)
    accs = []
    for b in range(n):
        x, y = (t.to(device, non_blocking=True) for t in next(val_iter))
        with common.autocast(device, amp):
            accs.append(common.accuracy(model(x, arc_at(arcs, b))[0], y))
    return [arc_at(arcs, b) for b in range(n)], accs


@torch.no_grad()
def nb201_marginals(controller, n):
    """Deviation 12 for --space nb201: the mean over n samples of each edge's op softmax, (6, 5)."""
    _, _, entropy, probs = controller(n)
    return {"entropy": entropy.mean().item(), "edge_op": {"cell": torch.stack([p.mean(0) for p in probs]).tolist()}}


@torch.no_grad()
def controller_marginals(controller, n):
    """Deviation 12: per cell, the mean over n samples of every decision's softmax: 'op' (nodes, 2,
    n_ops), 'input' (nodes, 2, nodes+1, zero-padded), and 'edge_op' (sum_i (i+2), n_ops), the
    expected number of times (input j, op k) feeds node i (each node's rows sum to 2)."""
    arcs, _, entropy, probs = controller(n)
    out = {"entropy": entropy.mean().item()}
    for cell, seq, p in zip(("normal", "reduce"), arcs, probs):
        nodes = seq.shape[1] // 4
        out.setdefault("op", {})[cell] = [[p[4 * i + 2 * s + 1].mean(0).tolist() for s in range(2)]
                                          for i in range(nodes)]
        out.setdefault("input", {})[cell] = [[F.pad(p[4 * i + 2 * s].mean(0), (0, nodes - i - 1)).tolist()
                                              for s in range(2)] for i in range(nodes)]
        rows = []
        for i in range(nodes):
            block = sum((F.one_hot(seq[:, 4 * i + 2 * s], i + 2).float()[:, :, None]
                         * p[4 * i + 2 * s + 1][:, None, :]).mean(0) for s in range(2))  # (i+2, n_ops)
            rows += block.tolist()
        out.setdefault("edge_op", {})[cell] = rows
    return out


# =====================================================================================
# Search loop
# =====================================================================================
def train_child_epoch(model, controller, train_data, w_optimizer, device, args, log, epoch):
    """Eq. (1) with M = 1: one SGD step on the shared weights per minibatch, for a cell freshly
    sampled from the current policy (no gradient to the controller)."""
    model.train()
    steps = min(len(train_data), args.steps_per_epoch or len(train_data))
    progress = common.Progress(log, "search", epoch, steps, args.report_freq, device)
    for step, (x, y) in enumerate(train_data):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            arcs, _, _, _ = controller(1)
        w_optimizer.zero_grad(set_to_none=False)
        with common.autocast(device, args.amp):
            # ALGO LOGIC: Eq. (1): grad_w L(m; w) for one m ~ pi(m; theta)
            logits, logits_aux = model(x, arc_at(arcs, 0))
            loss = F.cross_entropy(logits.float(), y)
            if logits_aux is not None:
                loss = loss + args.auxiliary_weight * F.cross_entropy(logits_aux.float(), y)
        loss.backward()
        # Deviation 4: the ops this cell does not use get a zero gradient, not none, so SGD still applies
        # their weight decay and Nesterov momentum, as every official shared variable gets its L2 gradient
        for group in w_optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        common.clip_grad(model.parameters(), args.grad_clip)  # Deviation 5: 0 (default) = no clipping
        w_optimizer.step()
        progress.update(loss.item(), common.accuracy(logits, y))
    return progress.summary()


def child_optimizer(model, args):
    """SGD with Nesterov momentum and weight decay on the shared weights (utils.py lines 212-214). The
    auxiliary head is left out unless --train-aux-head (Deviation 14: micro_child.py lines 721-723)."""
    if model.auxiliary_head is not None and not args.train_aux_head:
        model.auxiliary_head.requires_grad_(False)  # no gradient step and no weight decay: it stays put
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], args.lr, momentum=args.momentum,
                           nesterov=True, weight_decay=args.weight_decay)


@torch.no_grad()
def evaluate_sampled(model, controller, data, device, amp=False, max_steps=0):
    """Mean loss and accuracy (%) over a loader, a fresh cell per batch (main.py eval_once)."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for step, (x, y) in enumerate(data):
        if max_steps and step >= max_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        arcs, _, _, _ = controller(1)
        with common.autocast(device, amp):
            logits = model(x, arc_at(arcs, 0))[0].float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += y.numel()
    return loss_sum / max(n, 1), 100.0 * correct / max(n, 1)


def search(args, device, run_dir, log):
    """Run the search; returns (final genotype, summary). Writes per epoch: search_history.jsonl,
    alphas.jsonl, genotype.json, checkpoint_search.pt; at the end the figures."""
    generator = torch.Generator().manual_seed(args.seed)
    train_set, num_classes, _ = common.load_dataset(args.dataset, args.data, True, args.image_size)
    train_data, val_data = common.search_loaders(train_set, args.batch_size, args.train_portion, generator,
                                                 args.workers)
    nb201 = args.space == "nb201"
    if nb201:  # Deviation 15
        model = NB201SharedNet(args.init_channels, num_classes, args.layers)
        controller = NB201Controller(args.lstm_size, args.lstm_layers, args.tanh_constant, args.controller_temperature)
    else:
        model = Network(args.init_channels, num_classes, args.layers, args.nodes, auxiliary=args.search_auxiliary,
                        dropout=args.dropout)
        controller = Controller(args.nodes, args.lstm_size, args.tanh_constant, args.op_tanh_reduce,
                                args.controller_temperature)
    model, controller = common.speed_up(model.to(device), args), controller.to(device)
    log.info("shared network: %.3f M weights; controller: %d weights", sum(p.numel() for p in model.parameters())
             / 1e6, sum(p.numel() for p in controller.parameters()))
    w_optimizer = child_optimizer(model, args)
    # utils.py get_train_ops(optim_algo="adam") lines 217-219: TF Adam, beta1 0.0, epsilon 1e-3 (Deviation 1)
    # (--space nb201: torch Adam with the same betas and epsilon, AutoDL ENAS.py lines 313-318)
    c_optimizer = (torch.optim.Adam if nb201 else TFAdam)(controller.parameters(), args.arch_lr, betas=(0.0, 0.999),
                                                         eps=1e-3)
    if args.lr_schedule == "sgdr":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(w_optimizer, args.lr_t0, args.lr_t_mul,
                                                                         eta_min=args.lr_min)
    else:  # torch's CosineAnnealingLR continues the cosine past T_max (back up), as xautodl's does
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_optimizer, args.lr_t0, eta_min=args.lr_min)
    start, baseline = 0, 0.0  # micro_controller.py: the baseline variable starts at 0
    if args.resume:  # TRY NOT TO MODIFY: continue after the last finished epoch, bit for bit
        path = run_dir / "checkpoint_search.pt"
        start = common.resume_from(path, "enas", generator, model=model, controller=controller,
                                   w_optimizer=w_optimizer, c_optimizer=c_optimizer, scheduler=scheduler)
        baseline = common.load_checkpoint(path, "enas")["baseline"] if start else baseline
        log.info("resuming the search at epoch %d (baseline %.4f)", start, baseline)
    history = common.keep_jsonl(run_dir / "search_history.jsonl", start)
    alpha_history = common.keep_jsonl(run_dir / "alphas.jsonl", start)
    genotype = common.parse_genotype(str(run_dir / "genotype.json")) if start else None
    for epoch in range(start, args.epochs):
        t0 = time.time()
        lr = w_optimizer.param_groups[0]["lr"]
        val_iter = common.forever(val_data)  # reward, derivation and evaluation minibatches of this epoch
        train = train_child_epoch(model, controller, train_data, w_optimizer, device, args, log, epoch)
        baseline, ctrl = train_controller(model, controller, c_optimizer, baseline, val_iter, device, args, log,
                                          epoch)
        if nb201:
            arcs, accs = derive_nb201(model, controller, val_iter, args.derive_samples, device, args.amp)
        else:
            x_val, y_val = (t.to(device) for t in next(val_iter))
            arcs, accs = derive(model, controller, x_val, y_val, args.derive_samples, args.amp)
        best = max(range(len(accs)), key=lambda b: accs[b])
        genotype = nb201_arch(arcs[best]) if nb201 else arc_to_genotype(arcs[best])
        val_loss, val_acc = evaluate_sampled(model, controller, val_data, device, args.amp, args.steps_per_epoch)
        scheduler.step()
        stats = (nb201_marginals if nb201 else controller_marginals)(controller, args.stat_samples)
        alpha_history.append({"epoch": epoch, "samples": args.stat_samples, **stats})
        row = {"epoch": epoch, "lr": lr, **train, "val_loss": val_loss, "val_acc": val_acc, **ctrl,
               "policy_entropy": stats["entropy"], "sampled_val_acc": accs, "best_sampled_val_acc": accs[best],
               "arc": arcs[best], "seconds": time.time() - t0, "genotype": common.genotype_to_dict(genotype),
               **(common.nb201_epoch_row(args, genotype, log) if nb201 else {})}
        history.append(row)
        common.append_jsonl(run_dir / "search_history.jsonl", row)
        common.append_jsonl(run_dir / "alphas.jsonl", alpha_history[-1])
        common.write_json(run_dir / "genotype.json", common.genotype_to_dict(genotype))
        log.info("search epoch %d lr %.5f train_acc %.2f val_acc %.2f best of %d sampled cells %.2f %.1fs", epoch, lr,
                 row["train_acc"], val_acc, len(accs), accs[best], row["seconds"])
        log.info("arc %s genotype %s", " ".join(str(v) for cell in arcs[best] for v in cell), genotype)
        # TRY NOT TO MODIFY: checkpoint with everything needed to resume, controller and baseline included
        common.save_checkpoint(run_dir / "checkpoint_search.pt", {
            **common.make_checkpoint("enas", epoch, args, generator, model=model, controller=controller,
                                     w_optimizer=w_optimizer, c_optimizer=c_optimizer, scheduler=scheduler),
            "baseline": baseline, "arc": arcs[best], "genotype": common.genotype_to_dict(genotype)})
    final = {}
    if nb201 and args.final_samples:  # Deviation 15: the best of final_samples sampled cells is the result
        arcs, accs = derive_nb201(model, controller, common.forever(val_data), args.final_samples, device, args.amp)
        best = max(range(len(accs)), key=lambda b: accs[b])
        genotype = nb201_arch(arcs[best])
        log.info("final cell: the best of %d sampled cells, %.2f %% on its val minibatch: %s", len(accs), accs[best],
                 genotype)
        common.write_json(run_dir / "genotype.json", common.genotype_to_dict(genotype))
        final = {"final_samples": len(accs), "final_sampled_val_acc": accs[best], "final_arc": arcs[best]}
    if nb201:
        common.plot_alphas(alpha_history[-1]["edge_op"], run_dir / "alphas.png", NB201_PRIMITIVES, "P(op) per edge")
        common.plot_alpha_evolution([a["edge_op"] for a in alpha_history], run_dir / "alpha_evolution.png",
                                    NB201_PRIMITIVES)
        if args.nb201_benchmark:
            common.plot_nb201_history(history, run_dir / "nb201.png")
    else:
        common.plot_alphas({c: alpha_history[-1]["edge_op"][c] for c in ("normal", "reduce")},
                           run_dir / "alphas.png", ENAS_OPS, "E[uses of (input, op)] per node")
        common.plot_alpha_evolution([{c: [d for node in a["op"][c] for d in node] for c in ("normal", "reduce")}
                                     for a in alpha_history], run_dir / "alpha_evolution.png", ENAS_OPS)
    common.plot_curves(history, ["train_acc", "val_acc"], run_dir / "search_curves.png", "ENAS search")
    common.plot_curves(history, ["reward", "baseline"], run_dir / "controller_reward.png", "controller",
                       ylabel="reward (val-minibatch accuracy + entropy bonus)")
    common.plot_curves(history, ["policy_entropy"], run_dir / "controller_entropy.png", "controller",
                       ylabel="entropy of pi after the epoch (nats, both cells)")
    summary = {"epochs": len(history), "val_acc": history[-1]["val_acc"], "train_acc": history[-1]["train_acc"],
               "best_sampled_val_acc": history[-1]["best_sampled_val_acc"], "arc": history[-1]["arc"],
               "baseline": history[-1]["baseline"], "policy_entropy": history[-1]["policy_entropy"],
               "seconds": sum(r["seconds"] for r in history),
               "seconds_per_step": sum(r["seconds_per_step"] for r in history) / len(history), **final}
    return genotype, summary


# =====================================================================================
# main: search -> derive -> retrain -> test
# =====================================================================================
def main(args):
    args, device = common.prepare(args, __file__)  # --resume's flags, the device, every flag's range
    if args.train_aux_head and not args.search_auxiliary:
        raise UsageError("--train-aux-head trains the search network's auxiliary head, which "
                         "--no-search-auxiliary removes; drop one of them")
    if args.space == "darts" and args.layers < 3:  # NB-201's N may be 1 or 2
        raise UsageError(f"--layers must be >=3, got {args.layers} (the DARTS space; --space nb201 allows N >= 1)")
    if args.space == "darts" and args.lstm_layers != 1:
        raise UsageError("--lstm-layers: the DARTS-space controller has one LSTM layer (main.py); "
                         "more need --space nb201")
    genotype = None
    if args.genotype:  # fail before any work; a string of integers is an ENAS arc
        is_arc = all(t.lstrip("-").isdigit() for t in args.genotype.split())
        genotype = arc_to_genotype(parse_arc(args.genotype, args.nodes)) if is_arc else \
            common.parse_genotype(args.genotype)
    return common.run(args, __file__, "enas", device, genotype, search)


if __name__ == "__main__":
    common.cli(main, Args)
