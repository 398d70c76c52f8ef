#!/usr/bin/env python3
"""The paper's Figure 7 from `beaa bench inference --json` outputs: amortized time per image
against batch size.

    python3 scripts/plot_figure7.py OUT.png LABEL=bench.json [LABEL=bench.json ...]

Every JSON given is a measured point (its `batch`, `total_s`). The engine's work does not
depend on the batch (every slot of every ciphertext is computed: N is fixed by the depth and
the 128-bit bound), so for each label the line through its measured full-batch total at the
smaller batches 1024..8192 is `total / batch`, drawn dashed and marked as derived; measured
points are drawn as filled markers. Needs matplotlib (`pip install matplotlib`).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BATCHES = [1024, 2048, 4096, 8192, 16384]


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out = sys.argv[1]
    series: dict[str, list[dict]] = {}
    for arg in sys.argv[2:]:
        label, _, path = arg.partition("=")
        with open(path) as f:
            series.setdefault(label, []).append(json.load(f))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in series.items():
        full = max(runs, key=lambda r: r["batch"])
        total = full["total_s"]
        threads = full.get("threads", "?")
        derived = [total * 1e3 / b for b in BATCHES]
        line = ax.plot(
            BATCHES,
            derived,
            "--",
            label=f"{label}, {threads} thread(s): total {total:.0f} s / batch",
        )[0]
        ax.plot(
            [r["batch"] for r in runs],
            [r["amortized_ms"] for r in runs],
            "o",
            color=line.get_color(),
            label=f"{label}: measured",
        )
    ax.axhline(50, color="grey", linewidth=0.8, linestyle=":")
    ax.text(BATCHES[0], 52, "target 50 ms (full batch)", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
    ax.set_xlabel("images per job (batch)")
    ax.set_ylabel("amortized ms per image")
    ax.set_title("Encrypted SqueezeNet, N=32768, 128-bit, 2-vCPU Zen 4\n(reduced widths: random weights; shipped models: trained weights)", fontsize=10)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
