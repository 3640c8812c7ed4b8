"""One DARTS_V2 retraining step in the mobile setting (14 cells, C=48, auxiliary head, 224 px, 1000 classes) at
batch 128: wall time of 4 steps (the first warms up) and the memory saved for backward (saved_tensors_hooks),
plus the peak RSS. Run from the repository root: python docs/measure_mobile_step.py (README, ImageNet)."""
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
net = common.NetworkImageNet(48, 1000, 14, True, common.GENOTYPES["DARTS_V2"]).to(device)
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=3e-5)  # train_imagenet.py recipe
x, y = torch.randn(128, 3, 224, 224, device=device), torch.randint(0, 1000, (128,), device=device)
saved, times = [0], []


def pack(t):
    saved[0] += t.numel() * t.element_size()
    return t


for i in range(4):
    saved[0] = 0
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, aux = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=0.1) + 0.4 * F.cross_entropy(aux, y, label_smoothing=0.1)
    opt.zero_grad()
    loss.backward()
    common.clip_grad(net.parameters(), 5.0)
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
    print(f"step {i}: {times[-1]:.2f} s, saved for backward {saved[0] / 2**30:.2f} GiB", flush=True)
peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"{device}: median of steps 1-3 {statistics.median(times[1:]):.2f} s/step; saved for backward "
      f"{saved[0] / 2**30:.2f} GiB; peak {'CUDA allocated' if device == 'cuda' else 'RSS'} {peak:.2f} GiB; "
      f"{common.count_parameters(net):.3f} M params; {torch.get_num_threads()} threads")
