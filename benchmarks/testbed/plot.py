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
    args = parser.parse_args()
    results = []
    for path in args.results:
        with open(path, encoding="utf-8") as handle:
            results.append(json.load(handle))
    fractions = {tuple(result["settings"]["p"]) for result in results}
    methods: dict[str, dict] = {}
    for result in results:
        single = result["settings"]["p"]
        for name, metrics in result["methods"].items():
            if len(fractions) > 1 and len(single) == 1 and name != "aligned" and not name.startswith("p="):
                name = f"p={single[0]:g} {name}"
            methods.setdefault(name, metrics)  # first file wins (e.g. the shared "aligned" row)
    plot_safety_utility(methods, args.out, harmful_key="harmful", utility_key="sst2", title=args.title)
    print(f"{len(methods)} methods plotted to {args.out}")


if __name__ == "__main__":
    main()
