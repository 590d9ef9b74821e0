"""Regenerate the README's results section from the committed JSON files.

    python benchmarks/results_table.py        (rewrites README.md between the markers)

For each device and op the newest file in ``benchmarks/results/`` is shown: first one summary
table (device, date, versions and the headline of every result; CPU runs labelled as such),
then each result's table and plot. ``*-pretrain.json`` files (the summary that
``fastssl pretrain --method all`` writes) become the pretraining table.
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def newest(paths):
    """The newest file per (device, op): names are <device>-<date>-<op>.json."""
    keep = {}
    for path in sorted(paths):
        with open(path) as f:
            result = json.load(f)
        key = (result["environment"]["device"], result["op"])
        if key not in keep or result["environment"]["date"] >= keep[key][1]["environment"]["date"]:
            keep[key] = (path, result)
    return sorted(keep.values(), key=lambda pr: (pr[1]["cpu"], pr[1]["environment"]["device"],
                                                 pr[1]["op"]))


def pretrain_section(path, result):
    from fastssl.pretrain import low_shot_table, table
    env, cfg = result["environment"], result["reports"][0]["config"]
    ds = result["reports"][0]["dataset"]
    png = path[:-len(".json")] + ".png"
    plot = [f"![pretrain loss](benchmarks/results/{os.path.basename(png)})", ""] \
        if os.path.exists(png) else []
    return "\n".join([
        f"### pretrain on {env['device']} ({env['date']})" + (" — **CPU run**" if result["cpu"] else ""),
        "",
        f"torch {env['torch']}, triton {env.get('triton')}, fastssl {env['fastssl']}; "
        f"{ds['name']}, {ds['train']} train / {ds['test']} held-out images; "
        f"batch {cfg['batch_size']}, views {cfg['size']}², seed {cfg['seed']}",
        "", table(result["reports"]), "",
        *([low_shot_table(result["reports"]), ""]
          if "low_shot" in result["reports"][0]["accuracy"][result["reports"][0]["method"]]
          else []), *plot,
        f"(from `benchmarks/results/{os.path.basename(path)}`; command: `{result.get('command')}`)",
        ""])


def main():
    from fastssl.bench import headline, markdown
    chosen = newest(glob.glob(os.path.join(RESULTS, "*.json")))
    lines = ["| op | device | date | versions | headline |", "|---|---|---|---|---|"]
    sections = []
    for path, result in chosen:
        env = result["environment"]
        device = env["device"] + (" — **CPU run**" if result["cpu"] else "")
        versions = (f"torch {env['torch']}, triton {env.get('triton')}, fastssl {env['fastssl']}"
                    + (f", CUDA {env['cuda']}" if env.get("cuda") else ""))
        if result["op"] == "pretrain":
            best = max(result["reports"], key=lambda r: r["knn_margin_over_random_init"])
            worst = min(result["reports"], key=lambda r: r["knn_margin_over_random_init"])
            line = (f"kNN above random init: {worst['method']} {worst['knn_margin_over_random_init']:+.1f} "
                    f"… {best['method']} {best['knn_margin_over_random_init']:+.1f} points")
            sections.append(pretrain_section(path, result))
        else:
            line = headline(result)
            png = path[:-len(".json")] + ".png"
            text = markdown(result)
            if os.path.exists(png):
                text += f"\n![{result['op']}](benchmarks/results/{os.path.basename(png)})\n"
            sections.append(text + f"\n(from `benchmarks/results/{os.path.basename(path)}`; "
                            f"command: `{env.get('command', '')}`)\n")
        lines.append(f"| {result['op']} | {device} | {env['date']} | {versions} | {line} |")
    body = ("\n".join(lines) + "\n\n" + "\n".join(sections)) if chosen else \
        "No measurements committed yet.\n"
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(head + START + "\n" + body + END + tail)


if __name__ == "__main__":
    main()
