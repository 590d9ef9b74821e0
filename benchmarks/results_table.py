"""Regenerate the README's results section from the committed JSON files.

    python benchmarks/results_table.py        (rewrites README.md between the markers)
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
START, END = "<!-- results:start -->", "<!-- results:end -->"


def main():
    from fastssl.bench import markdown
    parts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))):
        with open(path) as f:
            result = json.load(f)
        parts.append(markdown(result) + f"\n(from `benchmarks/results/{os.path.basename(path)}`; "
                     f"command: `{result['environment'].get('command', '')}`)\n")
    body = "\n".join(parts) or "No measurements committed yet.\n"
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(head + START + "\n" + body + END + tail)


if __name__ == "__main__":
    main()
