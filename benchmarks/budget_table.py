"""Budget curve table (issue 16): real tokens/s against device memory, llamaft vs Unsloth vs the seed recipe.

    python3 benchmarks/budget_table.py DIR [--md FILE] [--png FILE] [--json FILE]

Reads every case JSON that budget_curve.sh recorded (JSON files in DIR that carry a "case" field, and
the same inside every DIR/*.tgz; a case recorded twice counts once, the newest) and writes, by default
into DIR: budget_table.md (one row per case, grouped by method, then the issue's targets checked),
budget_table.png (tokens/s against device peak GiB, one panel per method) and budget_table.json (the
same numbers). The markdown is printed too. Standard library + matplotlib (the plot is skipped without
it); no torch, so it runs on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile

METHODS = ["lora", "qlora", "full"]
TOOLS = ["llamaft", "unsloth", "seed", "plain"]
NAMES = {"lora": "LoRA", "qlora": "QLoRA", "full": "Full"}
DASH = "—"

# Issue 16: llamaft's best run whose DEVICE peak (nvidia-smi) is within `budget` GiB must reach
# `tok_s`, and where given `vs_unsloth` times Unsloth's tokens/s (same method, whole card).
TARGETS = [
    dict(method="lora", budget=18, tok_s=10500, vs_unsloth=1.5),
    dict(method="lora", budget=40, tok_s=13000, vs_unsloth=None),
    dict(method="lora", budget=None, tok_s=16000, vs_unsloth=None),
    dict(method="qlora", budget=7.5, tok_s=9500, vs_unsloth=1.6),
    dict(method="full", budget=46, tok_s=7900, vs_unsloth=1.5),
]


# ---------------------------------------------------------------- reading
def _case_json(data, source):
    try:
        rec = json.loads(data)
    except ValueError:
        return None
    if not isinstance(rec, dict) or "case" not in rec:
        return None  # bench.py's own results, this script's summary, ...
    rec["source"] = source
    return rec


def load_cases(d):
    """(cases, superseded): the case records in DIR and its *.tgz, one per case (the newest)."""
    found = []
    for name in sorted(os.listdir(d)):
        path = os.path.join(d, name)
        if name.endswith(".json"):
            with open(path, "rb") as f:
                found.append(_case_json(f.read(), name))
        elif name.endswith((".tgz", ".tar.gz")):
            try:
                with tarfile.open(path, "r:gz") as tar:
                    for m in tar.getmembers():
                        if m.isfile() and m.name.endswith(".json"):
                            found.append(_case_json(tar.extractfile(m).read(), f"{name}:{m.name}"))
            except (tarfile.TarError, EOFError, OSError) as e:  # e.g. the other GPU's driver writing it
                print(f"budget_table: skipped {name}: {e}", file=sys.stderr)
    best, superseded = {}, []
    for rec in filter(None, found):
        old = best.get(rec["case"])
        if old is not None and (old.get("finished_epoch") or 0) > (rec.get("finished_epoch") or 0):
            superseded.append(rec["source"])
            continue
        if old is not None:
            superseded.append(old["source"])
        best[rec["case"]] = rec
    return sorted(best.values(), key=order), superseded


def order(rec):
    b = rec.get("budget_gib")
    return (METHODS.index(rec["method"]) if rec["method"] in METHODS else 9,
            TOOLS.index(rec["tool"]) if rec["tool"] in TOOLS else 9, float("inf") if b is None else b)


# ---------------------------------------------------------------- numbers
def ok(rec):
    return rec is not None and rec.get("status") == "ok" and rec.get("tokens_per_s") is not None


def device_peak(rec):
    """The whole-device peak (nvidia-smi, minus the ballast); bench.py's in-process one if not sampled."""
    v = rec.get("smi_peak_gib")
    return v if v is not None else rec.get("device_peak_gib")


def reference(cases, tool, method):
    """The `none`-budget run of tool/method (the whole card), if it finished."""
    for rec in cases:
        if rec["tool"] == tool and rec["method"] == method and rec.get("budget_gib") is None and ok(rec):
            return rec
    return None


def ratio(rec, ref):
    if not ok(rec) or not ok(ref) or not ref["tokens_per_s"]:
        return None
    return rec["tokens_per_s"] / ref["tokens_per_s"]


def parity_reference(cases, rec):
    """The plain HF run of the same method on the same data: `plain` (bench.py --variant plain), else
    the seed recipe (HF Trainer + PEFT). Only with the same number of steps: the workload's rows (and
    so the shuffled order of every batch) depend on it."""
    for tool in ("plain", "seed"):
        ref = reference(cases, tool, rec["method"])
        if ref is not None and ref is not rec and ref.get("steps") == rec.get("steps"):
            return ref
    return None


def loss_parity(rec, plain):
    """(max |Δloss|, steps compared) against the reference run over their common first steps."""
    if not ok(rec) or plain is None or not ok(plain) or rec is plain:
        return None, 0
    pairs = [(a, b) for a, b in zip(rec.get("losses") or [], plain.get("losses") or [])
             if a is not None and b is not None]
    if not pairs:
        return None, 0
    return max(abs(a - b) for a, b in pairs), len(pairs)


def rows(cases):
    out = []
    for rec in cases:
        m = rec["method"]
        ref = parity_reference(cases, rec)
        dl, n = loss_parity(rec, ref)
        out.append(dict(
            case=rec["case"], tool=rec["tool"], method=m, budget_gib=rec.get("budget_gib"),
            status=rec.get("status"), reason=rec.get("reason"), tokens_per_s=rec.get("tokens_per_s"),
            peak_mem_gib=rec.get("peak_mem_gib"), smi_peak_gib=rec.get("smi_peak_gib"),
            device_peak_gib=rec.get("device_peak_gib"), fits=rec.get("fits"),
            vs_unsloth=ratio(rec, reference(cases, "unsloth", m)), vs_seed=ratio(rec, reference(cases, "seed", m)),
            max_abs_dloss=dl, loss_steps=n, loss_reference=ref["tool"] if ref is not None and n else None, micro_batch_run=rec.get("micro_batch_run"),
            accumulation_run=rec.get("accumulation_run"), wall_s=rec.get("wall_s"), source=rec["source"]))
    return out


def target_label(t):
    where = "whole card" if t["budget"] is None else f"≤{t['budget']:g} GiB device"
    need = f"≥{t['tok_s']:,} tok/s" + (f", ≥{t['vs_unsloth']:g}× Unsloth" if t["vs_unsloth"] else "")
    return f"{NAMES[t['method']]} {where}: {need}"


def evaluate_target(t, cases):
    """The best llamaft run of the method whose device peak is within the budget, checked against t."""
    mine = [r for r in cases if r["tool"] == "llamaft" and r["method"] == t["method"]]
    fit = [r for r in mine if ok(r) and (t["budget"] is None or
                                         (device_peak(r) is not None and device_peak(r) <= t["budget"]))]
    res = dict(target=target_label(t), method=t["method"], budget_gib=t["budget"], need_tok_s=t["tok_s"],
               need_vs_unsloth=t["vs_unsloth"], case=None, tokens_per_s=None, device_gib=None, vs_unsloth=None)
    if not fit:
        res["status"] = "no data" if not any(ok(r) for r in mine) else "missed"
        res["why"] = "no llamaft run" if res["status"] == "no data" else f"no llamaft run within {t['budget']:g} GiB"
        return res
    best = max(fit, key=lambda r: r["tokens_per_s"])
    vs = ratio(best, reference(cases, "unsloth", t["method"]))
    res.update(case=best["case"], tokens_per_s=best["tokens_per_s"], device_gib=device_peak(best), vs_unsloth=vs)
    why = []
    if best["tokens_per_s"] < t["tok_s"]:
        why.append(f"{best['tokens_per_s']:,.0f} < {t['tok_s']:,} tok/s")
    if t["vs_unsloth"] and vs is not None and vs < t["vs_unsloth"]:
        why.append(f"{vs:.2f}× < {t['vs_unsloth']:g}× Unsloth")
    if why:
        res.update(status="missed", why="; ".join(why))
    elif t["vs_unsloth"] and vs is None:
        res.update(status="unknown", why="no Unsloth run to compare with")
    else:
        res.update(status="met", why="")
    return res


# ---------------------------------------------------------------- writing
def fmt(v, spec, suffix=""):
    return DASH if v is None else format(v, spec) + suffix


def budget_text(b):
    return "none" if b is None else f"{b:g}"


def markdown(table, targets, cases, superseded, d):
    gpus = sorted({r.get("gpu_name") for r in cases if r.get("gpu_name")})
    out = [f"# Budget curve (issue 16): {len(cases)} cases from `{d}`", "",
           f"Device: {', '.join(gpus) or DASH}. W512, real tokens/s over the timed steps. "
           "torch = `torch.cuda.max_memory_allocated`; device = nvidia-smi `memory.used` peak minus the "
           "ballast-only baseline (idle card for budget none); in-proc = bench.py's own device view. "
           "Speed ratios are against Unsloth / the seed recipe on the whole card, same method; "
           "Δloss is against the plain HF run of the same method on the same data (`plain`, else the seed recipe, same step count).", ""]
    head = ("| tool | budget GiB | tok/s | torch GiB | device GiB | in-proc GiB | fits | vs Unsloth | vs seed "
            "| max \\|Δloss\\| vs plain HF |")
    for m in METHODS:
        mrows = [r for r in table if r["method"] == m]
        mtargets = [t for t in targets if t["method"] == m]
        if not mrows and not mtargets:
            continue
        out += [f"## {NAMES[m]}", ""] + ([head, "|" + "---|" * 10] if mrows else ["No runs."])
        for r in mrows:
            speed = fmt(r["tokens_per_s"], ",.0f") if r["status"] == "ok" else f"failed ({r['reason'] or '?'})"
            fits = {True: "yes", False: "**no**"}.get(r["fits"], DASH)
            dloss = (DASH if r["max_abs_dloss"] is None
                     else f"{r['max_abs_dloss']:.1e} (vs {r['loss_reference']}, {r['loss_steps']} steps)")
            out.append(f"| {r['tool']} | {budget_text(r['budget_gib'])} | {speed} | {fmt(r['peak_mem_gib'], '.2f')} "
                       f"| {fmt(r['smi_peak_gib'], '.2f')} | {fmt(r['device_peak_gib'], '.2f')} "
                       f"| {fits} | {fmt(r['vs_unsloth'], '.2f', '×')} "
                       f"| {fmt(r['vs_seed'], '.2f', '×')} | {dloss} |")
        if mtargets:
            out += ["", "| target | best llamaft run within it | tok/s | device GiB | vs Unsloth | check |",
                    "|---|---|---|---|---|---|"]
            for t in mtargets:
                mark = {"met": "✅ met", "missed": "❌ missed", "unknown": "? unknown", "no data": DASH + " no data"}
                check = mark[t["status"]] + (f" ({t['why']})" if t["why"] else "")
                out.append(f"| {t['target']} | {t['case'] or DASH} | {fmt(t['tokens_per_s'], ',.0f')} "
                           f"| {fmt(t['device_gib'], '.2f')} | {fmt(t['vs_unsloth'], '.2f', '×')} | {check} |")
        out.append("")
    if superseded:
        out += [f"Superseded by a newer run of the same case: {', '.join(superseded)}", ""]
    return "\n".join(out)


def plot(table, targets, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("budget_table: no matplotlib here, plot skipped", file=sys.stderr)
        return False
    style = {"llamaft": ("o-", "C0"), "unsloth": ("s", "C1"), "seed": ("^", "C2"), "plain": ("x", "0.5")}
    fig, axes = plt.subplots(1, len(METHODS), figsize=(6 * len(METHODS), 4.5))
    for ax, m in zip(axes, METHODS):
        mrows = [r for r in table if r["method"] == m]
        for b in sorted({r["budget_gib"] for r in mrows if r["budget_gib"] is not None}):
            ax.axvline(b, color="0.6", ls=":", lw=1)
            ax.annotate(f"{b:g}", (b, 1.01), xycoords=("data", "axes fraction"), fontsize=7, color="0.4",
                        ha="center", va="bottom", rotation=90)
        for tool in TOOLS:
            pts = sorted(((r["smi_peak_gib"] if r["smi_peak_gib"] is not None else r["device_peak_gib"]),
                          r["tokens_per_s"], r["budget_gib"]) for r in mrows
                         if r["tool"] == tool and r["status"] == "ok" and r["tokens_per_s"] is not None
                         and (r["smi_peak_gib"] is not None or r["device_peak_gib"] is not None))
            if not pts:
                continue
            marker, color = style[tool]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color=color, label=tool)
            if tool == "llamaft":
                for x, y, b in pts:
                    ax.annotate(budget_text(b), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        failed = [r for r in mrows if r["status"] != "ok" and r["budget_gib"] is not None]
        if failed:
            ax.plot([r["budget_gib"] for r in failed], [0] * len(failed), "x", color="C3", label="failed (at budget)")
        for t in targets:
            if t["method"] != m:
                continue
            if t["budget_gib"] is None:
                ax.axhline(t["need_tok_s"], color="C3", ls="--", lw=0.7)
            else:
                ax.plot([0, t["budget_gib"]], [t["need_tok_s"]] * 2, "--", color="C3", lw=0.7)
                ax.plot([t["budget_gib"]], [t["need_tok_s"]], "*", color="C3")
        ax.set_xlim(left=0)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.06)  # the whole-card target line off the frame
        ax.set_title(NAMES[m], pad=18)
        ax.set_xlabel("device peak GiB (nvidia-smi)")
        ax.set_ylabel("real tokens/s")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("W512 tokens/s against device memory (dotted: budgets; red dashes and stars: issue 16 targets)",
                 fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.8, wspace=0.22)  # tight_layout: 2x slower
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--md")
    ap.add_argument("--png")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    cases, superseded = load_cases(a.dir)
    table = rows(cases)
    targets = [evaluate_target(t, cases) for t in TARGETS]
    md = markdown(table, targets, cases, superseded, a.dir)
    md_path = a.md or os.path.join(a.dir, "budget_table.md")
    with open(md_path, "w") as f:
        f.write(md.rstrip("\n") + "\n")
    png = a.png or os.path.join(a.dir, "budget_table.png")
    drew = plot(table, targets, png)
    with open(a.json or os.path.join(a.dir, "budget_table.json"), "w") as f:
        json.dump(dict(source=a.dir, rows=table, targets=targets, superseded=superseded,
                       plot=png if drew else None), f, indent=1)
    print(md.rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
