"""ProxylessNAS: Direct Neural Architecture Search on Target Task and Hardware.

Han Cai, Ligeng Zhu, Song Han. ICLR 2019. arXiv:1812.00332 (v2), https://arxiv.org/abs/1812.00332.
Official code: mit-han-lab/proxylessnas @ bf58b5c, checked against search/modules/mix_op.py,
search/nas_manager.py, search/models/super_nets/super_proxyless.py, search/imagenet_arch_search.py,
search/imagenet_run_exp.py, search/utils/latency_estimator.py; the released networks are the
net configs of han-cai/files @ master, proxylessnas/proxyless_{gpu,cpu,mobile}.config.

Reproduce (search on the device this runs on, derive, retrain, test):
    python proxylessnas.py --dataset imagenet                    # latency-aware search, ImageNet retraining
    python proxylessnas.py --grad-estimator reinforce            # the paper's REINFORCE variant
    python proxylessnas.py --genotype proxyless_gpu --dataset imagenet  # retrain a released network
    python proxylessnas.py --latency-table runs/<run>/latency.json      # reuse a measured lookup table

Equations implemented (also used in notebooks/proxylessnas.ipynb). Eq. (4) is the paper's binary-gate gradient;
the other numbers follow the order of the paper's Sec. 3 as we recall it: its text could not be read here
beyond the abstract, so they are uncertain (grep finds each in this file and the notebook):
    Eq. (1)  p_j = softmax(alpha)_j over the candidate paths of a layer          -> SuperNet.probs
    Eq. (2)  g = binarize(p): one-hot, g = e_j with probability p_j               -> sample_paths / sample_two
    Eq. (3)  m_O^Binary(x) = sum_j g_j o_j(x) = o_active(x)                     -> SuperNet.layer
    Eq. (4)  dL/dalpha_i = sum_j dL/dg_j p_j (delta_ij - p_i)                   -> binary_alpha_grad
             two sampled paths, p renormalised over them, then the two alphas shifted so that the
             unsampled paths keep their probabilities                             -> rescale_alphas
    REINFORCE: grad J(alpha) ~ mean_m (R(N_m) - b) grad log p(g_m)               -> reinforce_arch_step
    Eq. (6)-(7) E[LAT] = sum_layers sum_j p_j F(o_j) (+ the fixed layers)        -> expected_latency
    latency loss (official mul#log): L = a * CE * (log E[LAT] / log T)^beta     -> latency_loss
    the derived network: argmax_j p_j per layer, 'zero' drops the block           -> SuperNet.genotype

Deviations from the paper (each is what the official code does, unless marked "ours"):
    1. The latency loss is the official 'mul#log' a * CE * (log E[LAT] / log T)^beta with a = 0.2,
       beta = 0.3 (nas_manager.py lines 82-87, imagenet_arch_search.py lines 91-94); the paper's Sec. 3.3 adds
       lambda2 E[LAT] to the loss, here --latency-loss add_linear, CE + 0.1 (E[LAT] - T) / T (the official
       'add#linear', nas_manager.py lines 88-91).
    2. ours: F is measured by this file on its own device (each candidate block, shortcut included, timed at
       its input shape, batch 1, median of --latency-repeats runs) in microseconds; the official table is a
       Pixel-1 lookup in ms (latency_estimator.py, mobile_trim.yaml). The unit matters inside the log: ms
       of a small network on a GPU are below 1, where log changes sign. T defaults to E[LAT] at uniform
       probabilities (ours; official: 80 ms for mobile, imagenet_arch_search.py line 23).
    3. In the two-path mode E[LAT] uses the two sampled paths' renormalised probabilities and zero for the
       others (mix_op.py lines 182-187, super_proxyless.py lines 221-231), so only those two alphas get a
       latency gradient in a step.
    4. A layer whose sampled active path is 'zero' gets no alpha update in that step, latency term
       included (mix_op.py lines 212-214), and is not rescaled (lines 240-242).
    5. --binary-mode two (the paper's memory-saving two-path gradient, Sec. 3.2.1) is our default; the
       official script's default is 'full_v2' (imagenet_arch_search.py line 89), which computes the
       gradient over all N paths; --binary-mode full gives that gradient (every path's output kept, the
       official 'full' mode, mix_op.py lines 114-121, not full_v2's recomputation in backward).
    6. Weights are trained with one path sampled from softmax(alpha) per batch (MixedEdge.MODE None),
       label smoothing 0.1, after --warmup-epochs weight-only epochs (nas_manager.py lines 245-306, lr 0.05
       cosine per batch); architecture steps run every 5th batch on a val batch, not in the first search
       epoch (lines 390-393; imagenet_arch_search.py line 87).
    7. ours: the search split is common.search_loaders (the training set cut in two); the official search
       holds out 50000 ImageNet training images (imagenet_arch_search.py line 45).
    8. ours: the supernet and the derived network are evaluated in eval mode (running BN statistics);
       the official validate() uses batch statistics (nas_manager.py line 231).
    9. ours: REINFORCE updates alpha on the same every-5th-batch schedule with 10 sampled networks per
       update (official: rl_batch_size 10, 300 updates per epoch spread over it, nas_manager.py lines
       118-128); reward acc * (T / LAT)^0.1 and the moving baseline b += 0.99 (mean R - b) as lines 130-135
       and 520-525.
   10. ours: on images smaller than 64 px the first conv has stride 1 (a CIFAR-style stem); the backbone
       is otherwise the ImageNet one. Retraining uses the searched widths; --retrain-init-channels and
       --retrain-layers do not apply. The CIFAR retraining recipe is common.py's (DARTS's, without the
       auxiliary tower and drop path, which this network has not); the official CIFAR network
       (PyramidTreeNet) is another space and is not reproduced.
   11. The ImageNet recipe is imagenet_run_exp.py's (300 epochs, lr 0.05 cosine, batch 256, Nesterov,
       wd 4e-5, label smoothing 0.1), except no_decay_keys 'bn' (BN weights without decay, line 40):
       common.retrain decays every parameter.
   Plus the deviations shared by every method file, listed in common.py's docstring (C1-C5).
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UsageError, arg


# =====================================================================================
# Args
# =====================================================================================
@dataclasses.dataclass
class Args(common.BaseArgs):
    # the official ImageNet retraining of a learned net (search/imagenet_run_exp.py lines 25-40)
    IMAGENET = {"retrain_epochs": 300, "retrain_batch_size": 256, "retrain_lr": 0.05, "retrain_schedule": "cosine",
                "retrain_momentum": 0.9, "retrain_nesterov": True, "retrain_weight_decay": 4e-5,
                "label_smoothing": 0.1, "auxiliary": False, "drop_path_prob": 0.0, "retrain_grad_clip": 0.0,
                "cutout": False, "retrain_warmup_epochs": 0}
    exp_name: str = arg("proxylessnas", "name of the method; prefix of the run folder", "run")
    # Algorithm specific arguments (search/imagenet_arch_search.py defaults)
    epochs: int = arg(120, "--n_epochs 120 search epochs after the warm-up", check=">=1")
    warmup_epochs: int = arg(40, "--warmup_epochs 40 weight-only epochs first (nas_manager.py warm_up)", check=">=0")
    warmup_lr: float = arg(0.05, "warm-up lr, cosine per batch (nas_manager.py line 246 lr_max)", check=">0")
    batch_size: int = arg(256, "--train_batch_size 256 (weights and alpha batches)", check=">=2")
    lr: float = arg(0.025, "--init_lr 0.025 (weights, SGD, cosine per batch)", check=">0")
    lr_min: float = arg(0.0, "cosine floor (official: 0)", check=">=0")
    momentum: float = arg(0.9, "--momentum 0.9 (Nesterov, official opt_param)", check="[0,1)")
    weight_decay: float = arg(4e-5, "--weight_decay 4e-5", check=">=0")
    label_smoothing_search: float = arg(0.1, "--label_smoothing 0.1 of the weight steps", check="[0,1)")
    grad_clip: float = arg(0.0, "weight grad-norm clip; 0 = none (official: none)", check=">=0")
    init_channels: int = arg(32, "first conv width, 32 x --width_mult (all widths scale with it, multiples "
                             "of 8; super_proxyless.py lines 20-23)", check=">=1")
    layers: int = arg(4, "--n_cell_stages 4,4,4,4,4,1: searchable blocks in each of the first five stages",
                      check=">=1")
    train_portion: float = arg(0.5, "ours: weights / alpha split of the training set", check="(0,1)")
    arch_lr: float = arg(1e-3, "--arch_lr 1e-3 (Adam, betas (0, 0.999), eps 1e-8)", check=">0")
    arch_weight_decay: float = arg(0.0, "--arch_weight_decay 0", check=">=0")
    arch_update_every: int = arg(5, "--grad_update_arch_param_every 5 (batches per architecture step)", check=">=1")
    grad_estimator: str = arg("binary", "binary: Eq. (4) through binary gates | reinforce: the paper's REINFORCE",
                              check=("binary", "reinforce"))
    binary_mode: str = arg("two", "two: two sampled paths (paper Sec. 3.2.1) | full: all paths (official "
                           "default full_v2's gradient)", check=("two", "full"))
    latency_loss: str = arg("mul_log", "mul_log: a CE (log LAT / log T)^beta | add_linear: CE + lambda (LAT-T)/T "
                            "| none", check=("mul_log", "add_linear", "none"))
    loss_alpha: float = arg(0.2, "--grad_reg_loss_alpha 0.2 (a of mul_log)", check=">0")
    loss_beta: float = arg(0.3, "--grad_reg_loss_beta 0.3 (beta of mul_log)", check=">=0")
    loss_lambda: float = arg(0.1, "--grad_reg_loss_lambda 0.1 (add_linear)", check=">=0")
    target_latency: float = arg(0.0, "T in microseconds; 0 = E[LAT] at uniform alpha (ours, Deviation 2)",
                                check="0 or >1")
    latency_table: str = arg("", "a latency.json of an earlier run on this device (else measured and written "
                             "to the run folder)")
    latency_repeats: int = arg(10, "ours: timed runs per candidate (median)", check=">=1")
    rl_batch_size: int = arg(10, "--rl_batch_size 10 (networks sampled per REINFORCE update)", check=">=1")
    rl_tradeoff: float = arg(0.1, "--rl_tradeoff_ratio 0.1: reward acc * (T / LAT)^this", check=">=0")
    rl_baseline_decay: float = arg(0.99, "--rl_baseline_decay_weight 0.99", check="[0,1]")


# =====================================================================================
# Search space: MBConv candidates, the supernet (search/models/super_nets/super_proxyless.py)
# =====================================================================================
CANDIDATES = ["3x3_MBConv3", "3x3_MBConv6", "5x5_MBConv3", "5x5_MBConv6", "7x7_MBConv3", "7x7_MBConv6"]
ZERO = "zero"  # the official 'Zero': the block is its shortcut
STRIDES = [2, 2, 2, 1, 2, 1]  # --stride_stages
BASE_WIDTHS = [24, 40, 80, 96, 192, 320]  # --width_stages


def make_divisible(v, divisor=8):
    """Official utils make_divisible (the TF MobileNet rule): nearest multiple, never 10 % below v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def search_space(args):
    """The backbone of a search: widths and stages (super_proxyless.py lines 20-23, 66), ops filled later."""
    wm = args.init_channels / 32
    return {"first_conv": make_divisible(32 * wm), "first_block": make_divisible(16 * wm),
            "widths": [make_divisible(w * wm) for w in BASE_WIDTHS], "stages": [args.layers] * 5 + [1],
            "strides": STRIDES, "last_channel": make_divisible(1280 * wm) if wm > 1 else 1280}


def layer_plan(space):
    """[(C_in, C_out, stride, zero_allowed)] of the searchable layers; 'zero' only where the block keeps
    its shape (super_proxyless.py lines 49-52)."""
    plan, c = [], space["first_block"]
    for width, n, s in zip(space["widths"], space["stages"], space["strides"]):
        for i in range(n):
            stride = s if i == 0 else 1
            plan.append((c, width, stride, stride == 1 and c == width))
            c = width
    return plan


def choices(plan):
    return [CANDIDATES + [ZERO] if zero_ok else list(CANDIDATES) for _, _, _, zero_ok in plan]


def bn(C):
    return nn.BatchNorm2d(C, eps=1e-3, momentum=0.1)  # the configs' "bn": momentum 0.1, eps 1e-3


def conv_bn_relu6(C_in, C_out, k, stride):
    return nn.Sequential(nn.Conv2d(C_in, C_out, k, stride, k // 2, bias=False), bn(C_out), nn.ReLU6(inplace=True))


class MBConv(nn.Sequential):
    """Official MBInvertedConvLayer: 1x1 expand (not for ratio 1), BN, ReLU6; k x k depthwise, BN, ReLU6;
    1x1 linear, BN."""

    def __init__(self, C_in, C_out, k, stride, expand):
        mid = round(C_in * expand)
        layers = [] if expand == 1 else [nn.Conv2d(C_in, mid, 1, bias=False), bn(mid), nn.ReLU6(inplace=True)]
        super().__init__(*layers, nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), bn(mid),
                         nn.ReLU6(inplace=True), nn.Conv2d(mid, C_out, 1, bias=False), bn(C_out))


def make_op(name, C_in, C_out, stride):
    if name == ZERO:
        return common.Zero(1)
    k, e = int(name[0]), int(name.split("MBConv")[1])  # "5x5_MBConv3" -> kernel 5, expansion 3
    return MBConv(C_in, C_out, k, stride, e)


class Head(nn.Sequential):
    """feature mix 1x1 conv, BN, ReLU6; global pool; linear (the official last layers)."""

    def __init__(self, C_in, C_last, num_classes):
        super().__init__(conv_bn_relu6(C_in, C_last, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(C_last, num_classes))


class SuperNet(nn.Module):
    """All candidate paths of every searchable layer; alphas per layer (official AP_path_alpha). forward(x,
    paths) runs one path per layer; with gates (binary_arch_step) the other involved paths run detached."""

    def __init__(self, space, num_classes, small_input):
        super().__init__()
        self.space, self.plan = space, layer_plan(space)
        self.choices = choices(self.plan)
        self.stem = conv_bn_relu6(3, space["first_conv"], 3, 1 if small_input else 2)  # Deviation 10
        self.first_block = MBConv(space["first_conv"], space["first_block"], 3, 1, 1)  # fixed 3x3_MBConv1
        self.layers = nn.ModuleList(nn.ModuleList(make_op(n, c_in, c_out, s) for n in names)
                                    for names, (c_in, c_out, s, _) in zip(self.choices, self.plan))
        self.residual = [s == 1 and c_in == c_out for c_in, c_out, s, _ in self.plan]
        self.head = Head(space["widths"][-1], space["last_channel"], num_classes)
        # official init_arch_params('normal', 1e-3)
        self.alphas = nn.ParameterList(nn.Parameter(1e-3 * torch.randn(len(c))) for c in self.choices)

    def probs(self):
        # Eq. (1): p_j = softmax(alpha)_j
        return [F.softmax(a, dim=0) for a in self.alphas]

    def sample_paths(self):
        # Eq. (2): one path per layer, path j with probability p_j (MixedEdge.binarize, MODE None)
        return [int(torch.multinomial(p.detach(), 1)) for p in self.probs()]

    def argmax_paths(self):
        return [int(a.detach().argmax()) for a in self.alphas]

    def layer(self, i, x, active, gates=None, involved=()):
        ops = self.layers[i]
        if self.choices[i][active] == ZERO:
            return x  # the block is its shortcut (official MobileInvertedResidualBlock)
        if gates is None:
            out = ops[active](x)
        else:
            # Eq. (3): m(x) = sum_j g_j o_j(x) = o_active(x); the other involved path is computed (its gate's
            # gradient needs it) but detached, so weights get no gradient from it (mix_op.py lines 114-121)
            out = sum(gates[k] * (ops[k](x) if k == active else ops[k](x).detach()) for k in involved)
        return x + out if self.residual[i] else out

    def forward(self, x, paths=None, gates=None, involved=None):
        paths = self.argmax_paths() if paths is None else paths
        x = self.first_block(self.stem(x))
        for i, active in enumerate(paths):
            x = self.layer(i, x, active, None if gates is None else gates[i], () if involved is None else involved[i])
        return self.head(x)

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("alphas")]

    def genotype(self, paths=None):
        paths = self.argmax_paths() if paths is None else paths
        return {**self.space, "ops": [self.choices[i][j] for i, j in enumerate(paths)]}


# =====================================================================================
# The derived (and published) network
# =====================================================================================
class ProxylessNetwork(nn.Module):
    """The network of a genotype: stem, the fixed 3x3_MBConv1, one block per non-zero op (residual where the
    shape is kept), head. Returns plain logits."""

    def __init__(self, genotype, num_classes, small_input=False):
        super().__init__()
        plan = layer_plan(genotype)
        self.stem = conv_bn_relu6(3, genotype["first_conv"], 3, 1 if small_input else 2)
        self.first_block = MBConv(genotype["first_conv"], genotype["first_block"], 3, 1, 1)
        self.blocks = nn.ModuleList(make_op(op, c_in, c_out, s) for op, (c_in, c_out, s, _) in zip(genotype["ops"], plan)
                                    if op != ZERO)
        self.residual = [s == 1 and c_in == c_out for op, (c_in, c_out, s, _) in zip(genotype["ops"], plan) if op != ZERO]
        self.head = Head(genotype["widths"][-1], genotype["last_channel"], num_classes)

    def forward(self, x):
        x = self.first_block(self.stem(x))
        for block, res in zip(self.blocks, self.residual):
            x = x + block(x) if res else block(x)
        return self.head(x)


def _published(first_conv, first_block, widths, last, ops):
    return {"first_conv": first_conv, "first_block": first_block, "widths": widths, "stages": [4, 4, 4, 4, 4, 1],
            "strides": STRIDES, "last_channel": last, "ops": ops.split()}


# han-cai/files proxylessnas/proxyless_*.config, block by block (the first, fixed 3x3_MBConv1 block left out)
PUBLISHED = {
    "proxyless_gpu": _published(40, 24, [32, 56, 112, 128, 256, 432], 1728, """
        5x5_MBConv3 zero zero zero  7x7_MBConv3 zero zero 3x3_MBConv3  7x7_MBConv6 zero zero 5x5_MBConv3
        5x5_MBConv6 zero 3x3_MBConv3 5x5_MBConv3  7x7_MBConv6 7x7_MBConv6 7x7_MBConv6 5x5_MBConv6  7x7_MBConv6"""),
    "proxyless_cpu": _published(40, 24, [32, 48, 88, 104, 216, 360], 1432, """
        3x3_MBConv6 3x3_MBConv3 3x3_MBConv3 3x3_MBConv3  3x3_MBConv6 3x3_MBConv3 3x3_MBConv3 5x5_MBConv3
        3x3_MBConv6 zero zero 3x3_MBConv3  5x5_MBConv6 3x3_MBConv3 3x3_MBConv3 3x3_MBConv3
        5x5_MBConv6 5x5_MBConv3 5x5_MBConv3 3x3_MBConv3  5x5_MBConv6"""),
    "proxyless_mobile": _published(32, 16, [32, 40, 80, 96, 192, 320], 1280, """
        5x5_MBConv3 3x3_MBConv3 zero zero  7x7_MBConv3 3x3_MBConv3 5x5_MBConv3 5x5_MBConv3
        7x7_MBConv6 5x5_MBConv3 5x5_MBConv3 5x5_MBConv3  5x5_MBConv6 5x5_MBConv3 5x5_MBConv3 5x5_MBConv3
        7x7_MBConv6 7x7_MBConv6 7x7_MBConv3 7x7_MBConv3  7x7_MBConv6"""),
}


def published_network(name, num_classes=1000):
    """A released network at 224 px (ImageNet stem): 7.12 M / 4.36 M / 4.08 M parameters (official logs)."""
    return ProxylessNetwork(PUBLISHED[name], num_classes, small_input=False)


def validate_genotype(g):
    """A genotype dict must describe a backbone and one allowed op per searchable layer; one line otherwise."""
    keys = ("first_conv", "first_block", "widths", "stages", "strides", "last_channel", "ops")
    if not isinstance(g, dict) or any(k not in g for k in keys):
        raise UsageError(f"--genotype: a ProxylessNAS genotype is a dict with {', '.join(keys)} (or a JSON list "
                         "of op names)")
    ints = [g["first_conv"], g["first_block"], g["last_channel"], *g["widths"], *g["stages"], *g["strides"]]
    if not all(isinstance(v, int) and v >= 1 for v in ints) or not len(g["widths"]) == len(g["stages"]) == len(g["strides"]):
        raise UsageError("--genotype: widths, stages and strides must be lists of positive ints of one length")
    plan = layer_plan(g)
    if not isinstance(g["ops"], list) or len(g["ops"]) != len(plan):
        raise UsageError(f"--genotype: {len(plan)} searchable layers need {len(plan)} ops, got "
                         f"{len(g['ops']) if isinstance(g['ops'], list) else type(g['ops']).__name__}")
    for i, (op, allowed) in enumerate(zip(g["ops"], choices(plan))):
        if op not in allowed:
            why = "'zero' only where a block keeps its shape (stride 1, same width)" if op == ZERO else \
                f"choose one of {', '.join(CANDIDATES + [ZERO])}"
            raise UsageError(f"--genotype: layer {i} op {op!r} is not allowed: {why}")
    return g


def parse_genotype(text, space):
    """--genotype: a published name, a genotype.json, or a JSON list of op names (on this run's backbone)."""
    if text in PUBLISHED:
        return dict(PUBLISHED[text])
    if Path(text).is_file():
        try:
            obj = json.loads(Path(text).read_text())
        except ValueError as e:
            raise UsageError(f"--genotype {text}: not JSON ({e})") from None
    else:
        try:
            obj = json.loads(text)
        except ValueError:
            if text.lstrip()[:1] in "[{(" or text.startswith("Genotype"):
                raise UsageError("malformed genotype literal: proxylessnas.py reads a JSON list of op names, "
                                 "e.g. '[\"3x3_MBConv3\", ...]'") from None
            raise UsageError(f"unknown genotype {text!r}; choose one of {', '.join(PUBLISHED)}, a genotype.json "
                             "or a JSON list of op names") from None
    return validate_genotype({**space, "ops": obj} if isinstance(obj, list) else obj)


# =====================================================================================
# Latency: a lookup table measured on this device, E[LAT] and the loss
# =====================================================================================
def _time_us(fn, x, repeats, device):
    for _ in range(3):  # warm-up (cuDNN algorithm choice, caches)
        fn(x)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def measure_latency_table(model, image_size, device, repeats=10):
    """F(o_j) of every candidate of every layer (block with its shortcut, batch 1, eval mode, microseconds) at
    its input shape, and the fixed layers (stem, first block, head) as one constant."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    fixed = _time_us(lambda t: model.first_block(model.stem(t)), x, repeats, device)
    x = model.first_block(model.stem(x))
    rows = []
    for i, names in enumerate(model.choices):
        rows.append([0.0 if n == ZERO else _time_us(lambda t: model.layer(i, t, j), x, repeats, device)
                     for j, n in enumerate(names)])
        x = model.layer(i, x, 0)  # every non-zero candidate gives the same output shape
    fixed += _time_us(model.head, x, repeats, device)
    model.train(was_training)
    return {"unit": "us", "device": str(device), "image_size": image_size, "space": model.space,
            "choices": model.choices, "fixed": fixed, "layers": rows}


def load_latency_table(path, space, image_size=None):
    """--latency-table: a latency.json of this space (and image size, once it is known); one line otherwise."""
    try:
        table = json.loads(Path(path).read_text())
        rows_ok = [len(r) for r in table["layers"]] == [len(c) for c in choices(layer_plan(space))]
        ok = table["space"] == space and rows_ok and float(table["fixed"]) >= 0
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--latency-table {path}: not a latency.json of this file ({type(e).__name__})") from None
    if not ok or image_size not in (None, table["image_size"]):
        raise UsageError(f"--latency-table {path}: measured for another space or image size than this run's")
    return table


def expected_latency(probs, table):
    # Eq. (6)-(7): E[LAT] = F_fixed + sum_layers sum_j p_j F(o_j)   (zero: F = 0)
    return table["fixed"] + sum((p * torch.tensor(row, device=p.device)).sum() for p, row in zip(probs, table["layers"]))


def latency_loss(ce, lat, target, kind="mul_log", a=0.2, beta=0.3, lam=0.1):
    """The official regularised losses (nas_manager.py lines 82-91); lat and target in the same unit."""
    if kind == "mul_log":
        # L = a * CE * (log E[LAT] / log T)^beta
        return a * ce * (torch.log(lat) / math.log(target)) ** beta
    if kind == "add_linear":
        # L = CE + lambda (E[LAT] - T) / T
        return ce + lam * (lat - target) / target
    return ce


# =====================================================================================
# Architecture update rules
# =====================================================================================
def binary_alpha_grad(alpha, gate_grad, involved):
    """Eq. (4) over the involved paths: dL/dalpha_i = sum_j dL/dg_j p_j (delta_ij - p_i), p = softmax of the
    involved alphas (all paths: the paper's formula; two: mix_op.py lines 217-227). Others get 0."""
    idx = torch.tensor(involved, device=alpha.device)
    p, g = F.softmax(alpha.detach()[idx], 0), gate_grad[idx]
    grad = torch.zeros_like(alpha)
    # Eq. (4): sum_j g_j p_j (delta_ij - p_i) = p_i g_i - p_i sum_j p_j g_j
    grad[idx] = p * g - p * (p * g).sum()
    return grad


def rescale_alphas(alpha, old, involved):
    """After the step, shift the involved alphas by one offset so that sum_involved exp(alpha) is what it was:
    the unsampled paths keep their probabilities (mix_op.py lines 239-252)."""
    idx = torch.tensor(involved, device=alpha.device)
    with torch.no_grad():
        alpha[idx] -= torch.logsumexp(alpha[idx], 0) - torch.logsumexp(old[idx], 0)


def sample_two(alpha):
    """Two distinct paths drawn by p, then the active one of them by their renormalised p (mix_op.py lines
    179-193); returns (active, [active, inactive])."""
    pair = torch.multinomial(F.softmax(alpha.detach(), 0), 2, replacement=False).tolist()
    c = int(torch.multinomial(F.softmax(alpha.detach()[pair], 0), 1))
    return pair[c], [pair[c], pair[1 - c]]


def binary_arch_step(model, x, y, a_optimizer, table, target, args):
    """One step on alpha through binary gates; returns (loss, E[LAT])."""
    alphas = list(model.alphas)
    if args.binary_mode == "two":
        active, involved = zip(*(sample_two(a) for a in alphas))
    else:
        active = model.sample_paths()
        involved = [list(range(len(a))) for a in alphas]
    gates = [torch.zeros(len(a), device=a.device).index_fill_(0, torch.tensor([j], device=a.device), 1.0)
             .requires_grad_() for a, j in zip(alphas, active)]
    ce = F.cross_entropy(model(x, list(active), gates, involved), y)
    probs = []  # the probabilities E[LAT] is taken over (Deviation 3)
    for a, inv in zip(alphas, involved):
        idx = torch.tensor(inv, device=a.device)
        probs.append(torch.zeros_like(a).index_put((idx,), F.softmax(a[idx], 0)))
    lat = expected_latency(probs, table)
    loss = latency_loss(ce, lat, target, args.latency_loss, args.loss_alpha, args.loss_beta, args.loss_lambda)
    grads = torch.autograd.grad(loss, alphas + gates, allow_unused=True)
    old = [a.detach().clone() for a in alphas]
    for i, (a, j, inv) in enumerate(zip(alphas, active, involved)):
        if model.choices[i][j] == ZERO:
            a.grad = None  # Deviation 4: no update of this layer
            continue
        g_lat = grads[i] if grads[i] is not None else torch.zeros_like(a)
        a.grad = g_lat + binary_alpha_grad(a, grads[len(alphas) + i], inv)
    a_optimizer.step()
    if args.binary_mode == "two":
        for i, (a, j, inv) in enumerate(zip(alphas, active, involved)):
            if model.choices[i][j] != ZERO:
                rescale_alphas(a, old[i], inv)
    return loss.item(), lat.item()


def path_latency(paths, table):
    return table["fixed"] + sum(row[j] for row, j in zip(table["layers"], paths))


@torch.no_grad()
def _accuracy(model, x, y, paths):
    return common.accuracy(model(x, paths), y)


def reinforce_arch_step(model, x, y, a_optimizer, table, target, args, state):
    """REINFORCE (nas_manager.py rl_update_step): M networks sampled by p, reward acc * (T / LAT)^w, moving
    baseline b; grad J ~ mean_m (R_m - b) grad log p(g_m), applied as descent on -J. Returns (mean R, b)."""
    alphas = list(model.alphas)
    rewards, grads = [], []
    for _ in range(args.rl_batch_size):
        paths = model.sample_paths()
        acc = _accuracy(model, x, y, paths) / 100
        lat = path_latency(paths, table)
        rewards.append(acc * (target / lat) ** args.rl_tradeoff if args.latency_loss != "none" else acc)
        log_p = sum(torch.log(p[j]) for p, j in zip(model.probs(), paths))
        grads.append(torch.autograd.grad(-log_p, alphas))
    mean = sum(rewards) / len(rewards)
    b = state.get("baseline")
    state["baseline"] = mean if b is None else b + args.rl_baseline_decay * (mean - b)
    for i, a in enumerate(alphas):
        # REINFORCE: grad(-J) ~ mean_m (R_m - b) grad(-log p(g_m))
        a.grad = sum((r - state["baseline"]) * g[i] for r, g in zip(rewards, grads)) / len(rewards)
    a_optimizer.step()
    return mean, state["baseline"]


# =====================================================================================
# Search loop
# =====================================================================================
def search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, table, target, device, args, log, epoch,
                 state):
    """One epoch: per train batch a weight step on one sampled path per layer; in search epochs after the
    first, every arch_update_every-th batch also an architecture step on a val batch."""
    model.train()
    warm = epoch < args.warmup_epochs
    steps = min(len(train_data), args.steps_per_epoch or len(train_data))
    e, total = (epoch, args.warmup_epochs) if warm else (epoch - args.warmup_epochs, args.epochs)
    lr0 = args.warmup_lr if warm else args.lr
    progress = common.Progress(log, "warmup" if warm else "search", epoch, steps, args.report_freq, device)
    arch = []
    for step, (x, y) in enumerate(train_data):
        if step >= steps:
            break
        # official cosine per batch (run_manager.py lines 64-67; warm_up line 266)
        lr = args.lr_min + 0.5 * (lr0 - args.lr_min) * (1 + math.cos(math.pi * (e * steps + step) / (total * steps)))
        for group in w_optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        w_optimizer.zero_grad(set_to_none=True)
        with common.autocast(device, args.amp):
            logits = model(x, model.sample_paths())
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing_search)
        loss.backward()
        common.clip_grad(model.weight_parameters(), args.grad_clip)
        w_optimizer.step()
        # ALGO LOGIC: alternate with an architecture step on the val half (not in the first search epoch)
        if not warm and e > 0 and (step + 1) % args.arch_update_every == 0:
            x_val, y_val = (t.to(device, non_blocking=True) for t in next(val_iter))
            a_optimizer.zero_grad(set_to_none=True)
            if args.grad_estimator == "binary":
                arch.append(binary_arch_step(model, x_val, y_val, a_optimizer, table, target, args))
            else:
                arch.append(reinforce_arch_step(model, x_val, y_val, a_optimizer, table, target, args, state))
        progress.update(loss.item(), common.accuracy(logits, y))
    out = {**progress.summary(), "lr": lr, "arch_steps": len(arch)}
    if arch:
        out["arch_loss" if args.grad_estimator == "binary" else "mean_reward"] = sum(a for a, _ in arch) / len(arch)
    return out


def plot_probs(model, path):
    plt = common.pyplot()
    names = CANDIDATES + [ZERO]
    grid = torch.full((len(model.alphas), len(names)), float("nan"))
    for i, p in enumerate(model.probs()):
        grid[i, :len(p)] = p.detach().cpu()
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(model.alphas) + 1.5))
    im = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("searchable layer")
    fig.colorbar(im, ax=ax, label="softmax(alpha)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def search(args, device, run_dir, log):
    """Warm-up and search; writes per epoch search_history.jsonl, alphas.jsonl, genotype.json,
    checkpoint_search.pt; latency.json once; figures at the end. Returns (genotype, summary)."""
    generator = torch.Generator().manual_seed(args.seed)
    train_set, num_classes, size = common.load_dataset(args.dataset, args.data, True, args.image_size)
    train_data, val_data = common.search_loaders(train_set, args.batch_size, args.train_portion, generator,
                                                 args.workers)
    model = common.speed_up(SuperNet(search_space(args), num_classes, size < 64).to(device), args)
    log.info("supernet: %.3f M weights, %d searchable layers", sum(p.numel() for p in model.weight_parameters()) / 1e6,
             len(model.alphas))
    if args.latency_table:
        table = load_latency_table(args.latency_table, model.space, size)
    elif args.resume and (run_dir / "latency.json").exists():
        table = json.loads((run_dir / "latency.json").read_text())
    else:
        rng = torch.get_rng_state()
        table = measure_latency_table(model, size, device, args.latency_repeats)
        torch.set_rng_state(rng)
    common.write_json(run_dir / "latency.json", table)
    uniform = [torch.full((len(c),), 1.0 / len(c)) for c in model.choices]
    target = args.target_latency or expected_latency(uniform, table).item()
    log.info("latency table: fixed %.1f us, E[LAT] at uniform alpha %.1f us, target T %.1f us", table["fixed"],
             expected_latency(uniform, table).item(), target)
    w_optimizer = torch.optim.SGD(model.weight_parameters(), args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay, nesterov=args.momentum > 0)
    a_optimizer = torch.optim.Adam(model.alphas, args.arch_lr, betas=(0.0, 0.999), eps=1e-8,
                                   weight_decay=args.arch_weight_decay)
    state, start = {"baseline": None}, 0
    if args.resume:  # TRY NOT TO MODIFY: continue after the last finished epoch, bit for bit
        start = common.resume_from(run_dir / "checkpoint_search.pt", "proxylessnas", generator, model=model,
                                   w_optimizer=w_optimizer, a_optimizer=a_optimizer)
        if start:
            state = common.load_checkpoint(run_dir / "checkpoint_search.pt", "proxylessnas")["state"]
        log.info("resuming the search at epoch %d", start)
    history = common.keep_jsonl(run_dir / "search_history.jsonl", start)
    common.keep_jsonl(run_dir / "alphas.jsonl", start)
    for epoch in range(start, args.warmup_epochs + args.epochs):
        t0 = time.time()
        val_iter = common.forever(val_data)  # a fresh pass of the val half per epoch (as darts.py)
        train = search_epoch(model, train_data, val_iter, w_optimizer, a_optimizer, table, target, device, args, log,
                             epoch, state)
        val_loss, val_acc = common.evaluate(model, val_data, device, args.amp, args.steps_per_epoch)
        genotype = model.genotype()
        row = {"epoch": epoch, "phase": "warmup" if epoch < args.warmup_epochs else "search", **train,
               "val_loss": val_loss, "val_acc": val_acc,
               "expected_latency_us": expected_latency(model.probs(), table).item(),
               "derived_latency_us": path_latency(model.argmax_paths(), table), "seconds": time.time() - t0,
               "genotype": genotype["ops"]}
        history.append(row)
        common.append_jsonl(run_dir / "search_history.jsonl", row)
        common.append_jsonl(run_dir / "alphas.jsonl", {"epoch": epoch, "softmax": [p.tolist() for p in model.probs()],
                                                       "alpha": [a.tolist() for a in model.alphas]})
        common.write_json(run_dir / "genotype.json", genotype)
        log.info("%s epoch %d train_acc %.2f val_acc %.2f E[LAT] %.1f us derived %.1f us %.1fs", row["phase"], epoch,
                 row["train_acc"], val_acc, row["expected_latency_us"], row["derived_latency_us"], row["seconds"])
        # TRY NOT TO MODIFY: checkpoint with everything needed to resume, alphas included
        common.save_checkpoint(run_dir / "checkpoint_search.pt", {
            **common.make_checkpoint("proxylessnas", epoch, args, generator, model=model, w_optimizer=w_optimizer,
                                     a_optimizer=a_optimizer),
            "alphas": [a.detach().cpu() for a in model.alphas], "state": state, "genotype": genotype})
    genotype = model.genotype()
    plot_probs(model, run_dir / "alphas.png")
    common.plot_curves(history, ["train_acc", "val_acc"], run_dir / "search_curves.png", "ProxylessNAS search")
    summary = {"epochs": len(history), "val_acc": history[-1]["val_acc"], "train_acc": history[-1]["train_acc"],
               "seconds": sum(r["seconds"] for r in history),
               "seconds_per_step": sum(r["seconds_per_step"] for r in history) / len(history),
               "expected_latency_us": history[-1]["expected_latency_us"],
               "derived_latency_us": history[-1]["derived_latency_us"], "target_latency_us": target,
               "grad_estimator": args.grad_estimator, "binary_mode": args.binary_mode}
    return genotype, summary


# =====================================================================================
# main: search -> derive -> retrain -> test
# =====================================================================================
def main(args):
    args, device = common.prepare(args, __file__)  # --resume's flags, the device, every flag's range
    if args.genotype and args.no_retrain:
        raise UsageError("--genotype skips the search and --no-retrain skips retraining: nothing to do")
    genotype = parse_genotype(args.genotype, search_space(args)) if args.genotype else None  # fail before any work
    if args.latency_table and not Path(args.latency_table).is_file():
        raise UsageError(f"--latency-table {args.latency_table}: no such file")
    if args.latency_table:  # the image size is checked once the data is loaded
        load_latency_table(args.latency_table, search_space(args), args.image_size or None)
    chosen = {"genotype": genotype}

    def search_fn(args, device, run_dir, log):
        chosen["genotype"], summary = search(args, device, run_dir, log)
        return chosen["genotype"], summary

    def build(num_classes, image_size):
        return ProxylessNetwork(chosen["genotype"], num_classes, small_input=image_size < 64)

    return common.run(args, __file__, "proxylessnas", device, genotype, search_fn, build=build)


if __name__ == "__main__":
    common.cli(main, Args)
