"""Result files and text: a printed line per row, the markdown table, the one-line
headline, the summary of several results and the plot."""
import os

from . import formulations



def fmt_row(row):
    head = f"  {row['impl']:>20} {row['op']} size={row['rows']:>7} D={row['D']:>5} {row['dtype']:>8}: "
    if "error" in row:
        return head + row["error"]
    s = head + (f"fwd {row['fwd_ms']:9.2f} ms  bwd {row['bwd_ms']:9.2f} ms  "
                f"fwd+bwd {row['fwd_bwd_ms']:9.2f} ms  peak extra {row['peak_extra_mib']:9.1f} MiB")
    if "tflops" in row:
        s += f"  {row['tflops']:6.1f} TFLOP/s ({100 * row['fraction_of_bf16_peak']:.0f}% of peak)"
    return s


def markdown(result):
    env = result["environment"]
    cpu = result["cpu"]
    size_name = {"infonce": "2N", "supcon": "2N", "clip": "n", "siglip": "n", "barlow": "N",
                 "vicreg": "N", "mae": "N", "sigreg": "N",
                 "detcon": "b (images)"}.get(result["op"], "size")
    lines = [f"### {result['op']} on {env['device']} ({env['date']})", "",
             f"torch {env['torch']}, triton {env.get('triton')}, fastssl {env['fastssl']}, "
             f"commit {str(env.get('git_commit'))[:10]}" + (" — **CPU run**" if cpu else ""), ""]
    if result["op"] == "augment":
        lines += ["| recipe | impl | batch | input | view | dtype | samples per call | ms | "
                  "samples/s |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r.get('recipe', 'BYOL')} | {r['impl']} | {r['batch']} | {r['side']}² | "
                  f"{r['size']}² | "
                  f"{r.get('dtype', 'float32')} | "
                  f"{r['views_per_call']} | {r['ms']:.2f} | {r['views_per_s']:.0f} |"
                  for r in result["rows"]]
        return "\n".join(lines) + "\n"
    if result["op"] == "kmeans":
        lines += ["| impl | N | K | D | dtype | iterations | ms | ms per iteration | "
                  "peak extra MiB | inertia |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['impl']} | {r['rows']} | {r['K']} | {r['D']} | {r['dtype']} | "
                  f"{r['iterations']} | " + (f"{r['error']} | | | |" if "error" in r else
                  f"{r['ms']:.1f} | {r['ms_per_iteration']:.1f} | {r['peak_extra_mib']:.1f} | "
                  f"{r['inertia']:.6g} |") for r in result["rows"]]
        return "\n".join(lines) + "\n"
    if result["op"] == "ema":
        lines += ["| model | impl | ms | GB/s (12 B/param) | of copy bandwidth |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['impl']} | {r['ms']:.3f} | {r['gb_per_s']:.1f} | "
                  f"{100 * r['fraction_of_copy_bandwidth']:.0f}% |" for r in result["rows"]]
        return "\n".join(lines) + "\n"
    if result["op"] == "maxbatch":
        lines += ["| impl | D | dtype | largest 2N that completes | stopped by | memory budget |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['impl']} | {r['D']} | {r['dtype']} | {r['max_rows']} | {r['stopped_by']} | "
                  + (f"{r['budget_mib']} MiB extra (CPU) |" if "budget_mib" in r else "the GPU |")
                  for r in result["rows"]]
        return "\n".join(lines) + "\n"
    lines += [f"| impl | {size_name} | D | dtype | fwd ms | bwd ms | fwd+bwd ms | peak extra MiB |"
              + ("" if cpu else " TFLOP/s |"),
              "|---|---|---|---|---|---|---|---|" + ("" if cpu else "---|")]
    for r in result["rows"]:
        if "error" in r:
            cells = [r["impl"], r["rows"], r["D"], r["dtype"], r["error"], "", "", ""]
        else:
            cells = [r["impl"], r["rows"], r["D"], r["dtype"], f"{r['fwd_ms']:.2f}",
                     f"{r['bwd_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}", f"{r['peak_extra_mib']:.1f}"]
        if not cpu:
            cells.append(f"{r['tflops']:.1f}" if "tflops" in r else "")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if result.get("max_rows"):
        unit = result.get("max_rows_unit", f"student rows (K = {formulations.PROTOTYPES})")
        lines += ["", f"The largest batch, in {unit}, whose forward+backward fits",
                  "", "| impl | largest batch | stopped by | memory budget |", "|---|---|---|---|"]
        lines += [f"| {k} | {r['max_rows']} | {r['stopped_by']} | {r['budget']} |"
                  for k, r in result["max_rows"].items()]
    return "\n".join(lines) + "\n"


def slug(device):
    keep = "".join(c if c.isalnum() else "-" for c in device.lower())
    return "-".join(p for p in keep.split("-") if p)[:40]


def headline(result):
    """One line: fastssl against the strongest baseline at the largest size both finished."""
    rows = [r for r in result["rows"] if "error" not in r]
    op = result["op"]
    if op == "maxbatch":
        return "; ".join(f"{r['impl']}: 2N = {r['max_rows']}" for r in rows)
    if op == "ema":
        parts = []
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == model and r["impl"] == "fastssl"]
            others = [r for r in rows if r["model"] == model and r["impl"] != "fastssl"]
            if mine and others:
                best = min(others, key=lambda r: r["ms"])
                parts.append(f"{model}: {mine[0]['ms']:.2f} ms vs {best['impl']} {best['ms']:.2f} ms")
        return "; ".join(parts)
    if op == "augment":
        byol = [r for r in rows if r.get("recipe", "BYOL") == "BYOL"]
        parts = [f"{r['impl']}, batch {r['batch']}: {r['views_per_s']:.0f} views/s" for r in byol]
        for task in dict.fromkeys(r["recipe"] for r in rows if r.get("recipe", "BYOL") != "BYOL"):
            mine = [r for r in rows if r.get("recipe") == task and r["impl"] == "fastssl"]
            loop = [r for r in rows if r.get("recipe") == task and "per image" in r["impl"]]
            if mine and loop:
                parts.append(f"{task}: fastssl {mine[0]['views_per_s']:.0f} vs {loop[0]['views_per_s']:.0f}"
                             f" samples/s image by image")
        return "; ".join(parts)
    if op == "kmeans":
        one = [r for r in rows if r["iterations"] == 1]
        if not one:
            return ""
        n, k = max((r["rows"], r["K"]) for r in one)
        at = [r for r in one if (r["rows"], r["K"]) == (n, k)]
        return f"N {n}, K {k}, one iteration: " + ", ".join(
            f"{r['impl']} {r['ms']:.0f} ms / {r['peak_extra_mib']:.0f} MiB" for r in at)
    key = lambda r: (r["D"], r["dtype"])  # noqa: E731
    best_line = ""
    for group in dict.fromkeys(map(key, rows)):
        mine = {r["rows"]: r for r in rows if key(r) == group and r["impl"].startswith("fastssl")}
        others = [r for r in rows if key(r) == group and not r["impl"].startswith("fastssl")
                  and r["rows"] in mine]
        if not others:
            continue
        size = max(r["rows"] for r in others)
        best = min((r for r in others if r["rows"] == size), key=lambda r: r["fwd_bwd_ms"])
        m = mine[size]
        best_line = (f"size {size}, D {group[0]}, {group[1]}: {m['fwd_bwd_ms']:.1f} ms / "
                     f"{m['peak_extra_mib']:.0f} MiB vs {best['impl']} {best['fwd_bwd_ms']:.1f} ms / "
                     f"{best['peak_extra_mib']:.0f} MiB")
    if result.get("max_rows"):
        best_line += "; largest batch: " + ", ".join(
            f"{k} {r['max_rows']}" for k, r in result["max_rows"].items())
    return best_line


def summary(results, image_dir=None):
    """Markdown: a table of every result (device, date, versions, headline), then each table
    and its plot."""
    lines = ["| op | device | date | versions | fastssl vs the strongest baseline (fwd+bwd, peak extra memory) |",
             "|---|---|---|---|---|"]
    for r in results:
        env = r["environment"]
        device = env["device"] + (" — **CPU run**" if r["cpu"] else "")
        versions = (f"torch {env['torch']}, triton {env.get('triton')}, fastssl {env['fastssl']}"
                    + (f", CUDA {env['cuda']}" if env.get("cuda") else ""))
        lines.append(f"| {r['op']} | {device} | {env['date']} | {versions} | {headline(r)} |")
    parts = ["\n".join(lines) + "\n"]
    for r in results:
        parts.append(markdown(r))
        png = r.get("plot")
        if png:
            parts.append(f"![{r['op']}]({os.path.join(image_dir, png) if image_dir else png})\n")
    return "\n".join(parts)


def _label(r):
    return f"{r['impl']}" + (f", D={r['D']}, {r['dtype']}" if "D" in r else "")


def plot(result, path):
    """A PNG beside the JSON: time and memory against batch size, one line per implementation
    (and D, dtype); bars for ``maxbatch`` and ``ema``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    env, op = result["environment"], result["op"]
    rows = [r for r in result["rows"] if "error" not in r]
    title = f"{op} on {env['device']}{' (CPU run)' if result['cpu'] else ''}, {env['date']}"
    if op in ("maxbatch", "ema"):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        if op == "maxbatch":
            labels, values = [_label(r) for r in rows], [r["max_rows"] for r in rows]
            ax.set_xlabel("largest 2N whose forward+backward completes")
        else:
            labels, values = [f"{r['model']}: {r['impl']}" for r in rows], [r["ms"] for r in rows]
            ax.set_xlabel("ms per update")
        ax.barh(labels, values, color=["C0" if "fastssl" in lab else "C7" for lab in labels])
        ax.invert_yaxis()
    else:
        size_key, time_key = {"augment": ("batch", "ms"), "kmeans": ("rows", "ms_per_iteration")
                              }.get(op, ("rows", "fwd_bwd_ms"))
        if op == "kmeans":  # one line per implementation and K, the longer fits
            top = max(r["iterations"] for r in rows)
            rows = [dict(r, impl=f"{r['impl']}, K={r['K']}") for r in rows
                    if r["iterations"] == top]
        has_mem = any("peak_extra_mib" in r for r in rows)
        fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4),
                                 squeeze=False)
        lines = {}
        for r in rows:
            label = r["impl"] if op in ("augment", "kmeans") else _label(r)
            lines.setdefault(label, []).append(r)
        panels = [(time_key, {"augment": "ms per call", "kmeans": "ms per iteration"}.get(
            op, "forward+backward ms"))]
        if has_mem:
            panels.append(("peak_extra_mib", "peak extra memory (MiB)"))
        for ax, (key, ylabel) in zip(axes[0], panels):
            for label, rs in lines.items():
                rs = sorted((r for r in rs if key in r), key=lambda r: r[size_key])
                ax.plot([r[size_key] for r in rs], [r[key] for r in rs], marker="o", label=label,
                        linestyle="-" if "fastssl" in label else "--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel({"infonce": "2N (rows)", "supcon": "2N (rows)", "clip": "n (pairs)",
                           "siglip": "n (pairs)", "augment": "batch", "kmeans": "N (rows)",
                           "sigreg": "N (samples)",
                           "detcon": f"b (images of {formulations.DETCON_MASKS} regions)"
                           }.get(op, "N (batch)"))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    result["plot"] = os.path.basename(path)
