"""One safety/utility plot from several testbed result files (e.g. the quick run and its GuardSpace sweep).

    python -m benchmarks.testbed.plot benchmarks/testbed/results/testbed_quick.json \
        benchmarks/testbed/results/testbed_quick_sweep.json --out docs/results_quick_sweep.png

When the files ran at different poison fractions, the rows of a file that ran at one fraction ``p`` (whose names
carry no ``p=`` tag) are labelled ``p=<p> <method>``, as a multi-fraction run labels its own; the aligned start is
the same in every file and keeps its name.
"""

from __future__ import annotations

import argparse
import json

from peft_safety.evaluation import plot_safety_utility


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="testbed_*.json files written by run.py")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--title", default="SmolLM2-135M testbed: harmful score vs SST-2 accuracy")
    parser.add_argument(
        "--by-fraction", action="store_true", help="one panel per poison fraction, methods told apart by marker"
    )
    args = parser.parse_args()
    results = []
    for path in args.results:
        with open(path, encoding="utf-8") as handle:
            results.append(json.load(handle))
    methods = merged_methods(results)
    if args.by_fraction:
        plot_by_fraction(methods, args.out, args.title)
    else:
        plot_safety_utility(methods, args.out, harmful_key="harmful", utility_key="sst2", title=args.title)
    print(f"{len(methods)} methods plotted to {args.out}")


def merged_methods(results: list[dict]) -> dict[str, dict]:
    """The methods of several result files in one mapping; see the module docstring for the names."""
    fractions = {tuple(result["settings"]["p"]) for result in results}
    methods: dict[str, dict] = {}
    for result in results:
        single = result["settings"]["p"]
        for name, metrics in result["methods"].items():
            if len(fractions) > 1 and len(single) == 1 and name != "aligned" and not name.startswith("p="):
                name = f"p={single[0]:g} {name}"
            methods.setdefault(name, metrics)  # first file wins (e.g. the shared "aligned" row)
    return methods


MARKERS = "osD^v<>Ph*X"


def plot_by_fraction(methods: dict[str, dict], out: str, title: str) -> None:
    """Harmful score (x) vs SST-2 accuracy (y), one panel per ``p=<p>`` tag; the untagged aligned start in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, dict]] = {}
    for name, metrics in methods.items():
        tag, _, method = name.partition(" ") if name.startswith("p=") else ("", "", name)
        if tag:
            panels.setdefault(tag, {})[method] = metrics
    names = list(dict.fromkeys(["aligned", *(method for panel in panels.values() for method in panel)]))
    style = {name: (MARKERS[i % len(MARKERS)], f"C{i % 10}") for i, name in enumerate(names)}
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 2.2, 4.2), sharey=True, squeeze=False)
    ordered = sorted(panels.items(), key=lambda item: float(item[0].removeprefix("p=")))
    for axis, (tag, panel) in zip(axes[0], ordered, strict=True):
        for name, metrics in {"aligned": methods["aligned"], **panel}.items():
            marker, color = style[name]
            axis.scatter(metrics["harmful"], metrics["sst2"], marker=marker, color=color, s=70, alpha=0.8, label=name)
        axis.set_title(tag.replace("=", " = "))
        axis.set_xlim(-0.05, 1.05)
        axis.set_ylim(-0.05, 1.05)
        axis.set_xlabel("harmful score (I-MI, lower is safer)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("SST-2 accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", frameon=False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1 - 2.2 / (4.2 * len(panels) + 2.2), 1))
    figure.savefig(out, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
