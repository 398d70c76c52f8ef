"""Times one training step (forward + backward + SGD update) of the BEAA SqueezeNet in PyTorch
on CPU, the same network and batch as `beaa-train bench`, for BENCHMARKS.md.

Usage: python3 models/scripts/bench_torch.py --batch 128 --steps 10 --threads 1
Needs `torch` (pip); used only for this comparison.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn


def unit(cin, cout, k):
    # conv, activation, batch norm (the paper's order)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(), nn.BatchNorm2d(cout))


class Fire(nn.Module):
    def __init__(self, cin, s, e1, e3):
        super().__init__()
        self.squeeze = unit(cin, s, 1)
        self.expand1 = unit(s, e1, 1)
        self.expand3 = unit(s, e3, 3)

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], 1)


def squeezenet(classes=10, c1=64, f1=(32, 64, 64), f2=(32, 64, 64), c2=192, c3=192):
    return nn.Sequential(
        unit(3, c1, 3), nn.AvgPool2d(2),
        Fire(c1, *f1), Fire(f1[1] + f1[2], *f2), nn.AvgPool2d(2),
        unit(f2[1] + f2[2], c2, 3), unit(c2, c3, 3),
        nn.Conv2d(c3, classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = squeezenet()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(a.batch, 3, 32, 32)
    y = torch.arange(a.batch) % 10
    times = []
    for i in range(a.steps + 2):
        t = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    print(json.dumps({"framework": "pytorch", "version": torch.__version__, "batch": a.batch, "steps": a.steps,
                      "threads": a.threads, "median_step_s": statistics.median(times),
                      "mean_step_s": statistics.mean(times)}))


if __name__ == "__main__":
    main()
