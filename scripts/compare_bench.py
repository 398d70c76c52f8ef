#!/usr/bin/env python3
"""Side-by-side table of `beaa bench ckks --json` runs and scripts/seal_bench.py runs.

    python3 scripts/compare_bench.py --ours ours-1.json [ours-2.json ...] \
        --seal seal-1.json [seal-2.json ...] [--out combined.json]

Each side may have several runs (bench_vs_seal.sh alternates them); each op's
figure is the median over that side's runs. Ratios are SEAL / ours (> 1: ours is
faster / smaller). Wall-clock figures ("ops_ms") are compared; where a side also
reports process-CPU figures ("ops_cpu_ms") they are shown and compared as well. Standard library only.
"""
import argparse
import json
import statistics
import sys


def load(path):
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # tolerate log lines before/after the object
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end < start:
            sys.exit(f"compare_bench.py: no JSON object in {path}")
        return json.loads(text[start:end + 1])


def merge(runs, key):
    """Median of each numeric field of runs[i][key] over the runs."""
    out = {}
    names = []
    for r in runs:
        for k in (r.get(key) or {}):
            if k not in names:
                names.append(k)
    for k in names:
        vals = [r[key][k] for r in runs if isinstance((r.get(key) or {}).get(k), (int, float))]
        if vals:
            out[k] = statistics.median(vals)
    return out


def spread(runs, key, name):
    vals = [r[key][name] for r in runs if isinstance((r.get(key) or {}).get(name), (int, float))]
    if len(vals) < 2:
        return ""
    return f"{min(vals):.3g}..{max(vals):.3g}"


def fmt(x, unit=""):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}{unit}" if abs(x) < 1e6 else f"{x:.3e}{unit}"
    return f"{x}{unit}"


def fmt_bytes(x):
    return "-" if x is None else f"{int(round(x)):,}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", nargs="+", required=True)
    p.add_argument("--seal", nargs="+", required=True)
    p.add_argument("--out", default=None, help="write the combined JSON here")
    args = p.parse_args()

    ours_runs = [load(f) for f in args.ours]
    seal_runs = [load(f) for f in args.seal]
    ours_ops, seal_ops = merge(ours_runs, "ops_ms"), merge(seal_runs, "ops_ms")
    ours_sizes, seal_sizes = merge(ours_runs, "sizes_bytes"), merge(seal_runs, "sizes_bytes")
    o0, s0 = ours_runs[0], seal_runs[0]

    lines = []
    w = lines.append
    def num(x):
        return f"{x:.1f}" if isinstance(x, float) else str(x)

    extra = " ".join(f"{k}={num(o0[k])}" for k in ("log_qp", "special_primes", "digits", "secure_128", "ntt_ifma")
                     if k in o0)
    w(f"ours: {o0.get('library', '?')}  n={o0.get('n')} limbs={o0.get('limbs')} log_q={num(o0.get('log_q'))} {extra}"
      f"  ({len(ours_runs)} run(s))")
    w(f"SEAL: {s0.get('library', '?')}  n={s0.get('n')} limbs={s0.get('limbs')} log_q={num(s0.get('log_q'))} "
      f"(+{s0.get('coeff_bits', [0])[-1]}-bit special prime; coeff_bits={s0.get('coeff_bits')})  ({len(seal_runs)} run(s))")
    warn = []
    if o0.get("n") != s0.get("n"):
        warn.append(f"different N: ours {o0.get('n')} vs SEAL {s0.get('n')}")
    if o0.get("limbs") is not None and o0.get("limbs") != s0.get("limbs"):
        warn.append(f"different ciphertext limb counts: ours {o0.get('limbs')} vs SEAL {s0.get('limbs')}")
    for x in warn:
        w(f"WARNING: {x}")
    w("")

    # ops: ours' order first, then SEAL-only extras. Wall-clock medians; the
    # process-CPU medians ("ops_cpu_ms") are shown too where a side reports them.
    ours_cpu, seal_cpu = merge(ours_runs, "ops_cpu_ms"), merge(seal_runs, "ops_cpu_ms")
    names = list(ours_ops) + [k for k in seal_ops if k not in ours_ops]
    header = ["op", "ours ms", "SEAL ms", "SEAL/ours"]
    if ours_cpu:
        header.append("ours cpu")
    if seal_cpu:
        header.append("SEAL cpu")
    if ours_cpu and seal_cpu:
        header.append("cpu SEAL/ours")
    header += ["ours range", "SEAL range"]
    rows = [tuple(header)]
    ratios, cpu_ratios = {}, {}
    for k in names:
        a, b = ours_ops.get(k), seal_ops.get(k)
        r = (b / a) if (a and b) else None
        if r is not None:
            ratios[k] = round(r, 3)
        row = [k, fmt(a), fmt(b), fmt(r, "x") if r is not None else "-"]
        if ours_cpu:
            row.append(fmt(ours_cpu.get(k)))
        if seal_cpu:
            row.append(fmt(seal_cpu.get(k)))
        if ours_cpu and seal_cpu:
            ca, cb = ours_cpu.get(k), seal_cpu.get(k)
            cr = (cb / ca) if (ca and cb) else None
            if cr is not None:
                cpu_ratios[k] = round(cr, 3)
            row.append(fmt(cr, "x") if cr is not None else "-")
        row += [spread(ours_runs, "ops_ms", k), spread(seal_runs, "ops_ms", k)]
        rows.append(tuple(row))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        w("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)))
        if i == 0:
            w("  ".join("-" * x for x in widths))
    w("")

    # sizes: same-name keys side by side; otherwise each side's own list
    size_names = list(ours_sizes) + [k for k in seal_sizes if k not in ours_sizes]
    rows = [("size", "ours bytes", "SEAL bytes", "SEAL/ours")]
    size_ratios = {}
    for k in size_names:
        a, b = ours_sizes.get(k), seal_sizes.get(k)
        r = (b / a) if (a and b) else None
        if r is not None:
            size_ratios[k] = round(r, 3)
        rows.append((k, fmt_bytes(a), fmt_bytes(b), fmt(r, "x") if r is not None else "-"))
    # our size keys have other names than SEAL's: match the obvious pairs too
    for k, a in ours_sizes.items():
        low = k.lower()
        kind = "ciphertext" if ("cipher" in low or low.startswith("ct")) else \
            "relin_keys" if ("relin" in low or "rlk" in low) else None
        if kind is None or k in seal_sizes:
            continue
        for sk in (f"{kind}_fresh_seal_save", f"{kind}_fresh_uncompressed",
                   f"{kind}_seal_save", f"{kind}_seeded_save", f"{kind}_fresh_seeded_sk_save",
                   f"{kind}_uncompressed"):
            b = seal_sizes.get(sk)
            if a and b:
                size_ratios[f"{k} vs {sk}"] = round(b / a, 3)
                rows.append((f"{k} vs SEAL {sk}", fmt_bytes(a), fmt_bytes(b), fmt(b / a, "x")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        w("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)))
        if i == 0:
            w("  ".join("-" * x for x in widths))

    notes = s0.get("notes") or {}
    if notes:
        w("")
        w("What each SEAL figure includes:")
        for k in names:
            if k in notes:
                w(f"  {k}: {notes[k]}")
    if o0.get("notes"):
        w("What each of our figures includes:")
        for k, v in o0["notes"].items():
            w(f"  {k}: {v}")

    print("\n".join(lines))

    if args.out:
        combined = {
            "n": o0.get("n"),
            "ours": {**{k: v for k, v in o0.items() if k not in ("ops_ms", "sizes_bytes")},
                     "ops_ms": ours_ops, "ops_cpu_ms": ours_cpu, "sizes_bytes": ours_sizes, "runs": ours_runs},
            "seal": {**{k: v for k, v in s0.items() if not k.endswith("_ms") and k != "sizes_bytes"},
                     "ops_ms": seal_ops, "ops_cpu_ms": seal_cpu,
                     "tenseal_ops_ms": merge(seal_runs, "tenseal_ops_ms"),
                     "tenseal_ops_cpu_ms": merge(seal_runs, "tenseal_ops_cpu_ms"),
                     "sizes_bytes": seal_sizes, "runs": seal_runs},
            "ratios_seal_over_ours": {"ops_ms": ratios, "ops_cpu_ms": cpu_ratios, "sizes_bytes": size_ratios},
            "warnings": warn,
        }
        with open(args.out, "w") as f:
            json.dump(combined, f, indent=2)
            f.write("\n")
        print(f"\ncombined JSON written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
