"""``peft-safety``: command-line access to statistics, SOMF merging, export, evaluation and reports.

Subcommands: ``stats``, ``merge``, ``export``, ``eval``, ``report`` (``peft-safety <command> --help``). Models and
adapters are local folders (``save_pretrained`` output); nothing is downloaded. User mistakes print one line on
stderr and exit with code 2; set ``PEFT_SAFETY_DEBUG=1`` to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

PROMPT_COLUMNS = ("prompt", "goal", "instruction", "instructions", "question", "text", "sentence")
EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the command line or its input files, reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------------------------- input files


def _require_file(path: str, flag: str) -> str:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r}: no such file")
    return path


def _output_file(path: str | None, flag: str) -> None:
    """Refuse an output file that cannot be written (missing folder, a folder, no permission) before any work."""
    if path is None:
        return
    from ._files import check_output_file

    try:
        check_output_file(path, "file")
    except OSError as err:
        raise UsageError(f"{flag} {path!r}: {err}") from err


def _output_dir(path: str, flag: str) -> None:
    """Refuse an output folder that cannot be created or written before any work."""
    from ._files import check_output_dir

    try:
        check_output_dir(path, "folder")
    except OSError as err:
        raise UsageError(f"{flag} {path!r}: {err}") from err


def check_safetensors(path: str, flag: str) -> None:
    """Raise ``UsageError`` unless ``path`` is a complete safetensors file (header readable, every tensor's bytes
    present): a file cut short by an interrupted copy or download fails here, before anything is loaded."""
    size = os.path.getsize(path)
    problem = None
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0 or 8 + length > size:
                problem = "its header is cut short"
            else:
                header = json.loads(handle.read(length))
                ends = [
                    entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"
                ]  # fmt: skip
                if 8 + length + max(ends, default=0) > size:
                    problem = f"it holds {size} bytes of the {8 + length + max(ends)} its header announces"
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        problem = f"its header cannot be read ({err})"
    if problem:
        raise UsageError(
            f"{flag}: {path!r} is truncated or corrupt: {problem}; copy or save the file again"
        )  # fmt: skip


def _check_weights(folder: str, flag: str) -> None:
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            check_safetensors(os.path.join(folder, name), flag)


def read_rows(path: str, headerless: bool = False) -> list[dict[str, Any]]:
    """Rows of a data file as dicts: ``.txt`` (one ``text`` per line), ``.json`` (list of objects or strings, or
    an object of parallel lists), ``.jsonl`` / ``.jsonl.gz``, ``.csv`` / ``.tsv`` (header row unless
    ``headerless``, then columns are named ``"0"``, ``"1"``, ...)."""
    name = path.lower()
    opener = gzip.open if name.endswith(".gz") else open
    name = name.removesuffix(".gz")
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            if name.endswith(".txt"):
                rows: list[Any] = [{"text": line.strip()} for line in handle if line.strip()]
            elif name.endswith(".jsonl"):
                rows = [json.loads(line) for line in handle if line.strip()]
            elif name.endswith(".json"):
                data = json.load(handle)
                if isinstance(data, dict):
                    lists = {k: v for k, v in data.items() if isinstance(v, list)}
                    lengths = {len(v) for v in lists.values()}
                    if not lists or len(lengths) != 1:
                        raise UsageError(f"{path!r}: a JSON object must hold lists of equal length (one per column)")
                    keys = list(lists)
                    data = [dict(zip(keys, values, strict=True)) for values in zip(*lists.values(), strict=True)]
                rows = data if isinstance(data, list) else []
            elif name.endswith((".csv", ".tsv")):
                delimiter = "\t" if name.endswith(".tsv") else ","
                if headerless:
                    rows = [{str(i): v for i, v in enumerate(r)} for r in csv.reader(handle, delimiter=delimiter)]
                else:
                    rows = list(csv.DictReader(handle, delimiter=delimiter))
            else:
                raise UsageError(f"{path!r}: unsupported file type (use .txt, .json, .jsonl[.gz], .csv or .tsv)")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, gzip.BadGzipFile) as err:
        raise UsageError(f"{path!r} could not be parsed: {err}") from err
    rows = [{"text": r} if isinstance(r, str) else r for r in rows]
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"{path!r} holds no rows (expected records or strings)")
    return rows


def _pick_column(rows: list[dict[str, Any]], column: str | None, path: str, candidates=PROMPT_COLUMNS) -> str:
    columns = list(rows[0])
    if column is not None:
        if column not in columns:
            raise UsageError(f"{path!r} has no column {column!r}; its columns are {columns}")
        return column
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise UsageError(f"{path!r} has no column among {list(candidates)}; its columns are {columns}: name one")


def load_prompts(path: str, column: str | None = None, limit: int | None = None) -> list[str]:
    """Prompt strings from a data file (column auto-detected unless given; a numeric column means no header)."""
    _require_file(path, "prompt file")
    headerless = column is not None and column.isdigit()
    rows = read_rows(path, headerless)
    column = _pick_column(rows, column, path)
    prompts = [str(row[column]) for row in rows if row.get(column) not in (None, "")]
    return prompts[:limit] if limit else prompts


# ----------------------------------------------------------------------------------------------- models


def _resolve_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name: str | None) -> None:
    """Refuse a ``--device`` that is not a torch device, or one this machine does not have, before any work."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps): {err}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name!r}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps") and not hasattr(torch, device.type):
        raise UsageError(f"--device {name!r}: device type {device.type!r} is not available here")


def _check_model_dir(path: str) -> None:
    config = os.path.join(path, "config.json")
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(config):
        raise UsageError(f"--model {path!r} is a PEFT adapter folder: give the base model as --model, it as --adapter")
    if not os.path.isfile(config):
        raise UsageError(f"--model {path!r} is not a local model folder (no config.json; see save_pretrained)")
    _check_weights(path, "--model")


def _check_adapter_dir(path: str, flag: str = "--adapter") -> None:
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise UsageError(f"{flag} {path!r} is not a PEFT adapter folder (no adapter_config.json)")
    _check_weights(path, flag)


def load_model(args: argparse.Namespace):
    """``(model, tokenizer)`` from ``--model`` (and ``--dtype``, ``--device``), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our bars and one-line errors
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=_resolve_dtype(args.dtype))
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception as err:  # transformers and safetensors raise many types for broken folders
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise UsageError(f"--model {args.model!r} could not be loaded ({message}); save the model again") from err
    return model.to(_device(args.device)).eval(), tokenizer


def _load_adapter(model, path: str, adapter_name: str = "default"):
    from peft import PeftModel

    from . import _peft_compat  # noqa: F401  (importing peft_safety registers GuardSpace with PEFT)

    try:
        return PeftModel.from_pretrained(model, path, adapter_name=adapter_name).eval()
    except Exception as err:  # PEFT and safetensors raise many types for broken or foreign adapters
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise UsageError(f"adapter {path!r} could not be loaded on this model ({message})") from err


def _print(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------- commands


def cmd_stats(args: argparse.Namespace) -> None:
    if args.exclude_bos:  # removed option: refuse it before loading anything
        from .statistics import EXCLUDE_BOS_REASON

        raise UsageError(f"--exclude-bos is no longer supported: {EXCLUDE_BOS_REASON}")
    _output_file(args.output, "--output")
    _check_model_dir(args.model)
    prompts = load_prompts(args.prompts, args.column, args.limit)
    from .statistics import collect_safety_statistics

    model, tokenizer = load_model(args)
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    stats = collect_safety_statistics(
        model,
        tokenizer,
        prompts,
        target_modules=targets,
        batch_size=args.batch_size,
        max_length=args.max_length,
        chat_template={"auto": None, "yes": True, "no": False}[args.chat_template],
        normalization=args.normalization,
    )
    stats.save(args.output)
    _print(
        f"Saved safety statistics of {len(stats.site_of)} modules ({len(stats.covariance_sums)} input sites, "
        f"{stats.num_prompts} prompts, {stats.num_tokens} tokens) to {args.output}"
    )


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_merge(args: argparse.Namespace) -> None:
    _output_dir(args.output, "--output")
    _output_file(args.masks_output, "--masks-output")
    _check_model_dir(args.model)
    for path in args.adapters:
        _check_adapter_dir(path, "--adapters")
    names = args.names or [os.path.basename(os.path.normpath(p)) for p in args.adapters]
    if len(names) != len(args.adapters) or len(set(names)) != len(names):
        raise UsageError("--names must give one distinct name per adapter folder")
    weights = args.weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise UsageError(f"--weights has {len(weights)} values for {len(names)} adapters")
    if not all(math.isfinite(weight) for weight in weights):
        raise UsageError(f"--weights must be finite numbers, got {weights}")
    if args.adapter_name in names:
        raise UsageError(f"--adapter-name {args.adapter_name!r} is also the name of an input adapter; choose another")
    if args.density is not None and not 0.0 < args.density <= 1.0:  # also refuses NaN
        raise UsageError(f"--density must be in (0, 1], got {args.density}")
    safety_data = read_rows(_require_file(args.safety_data, "--safety-data"))
    options = dict(_parse_option(o) for o in args.option)
    try:
        from .somf import SOMFConfig
    except ImportError as err:
        raise UsageError(f"SOMF is not available in this installation of peft_safety ({err})") from err
    try:
        config = SOMFConfig(**options)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--option: {err}") from err
    extra = {}
    if args.retain_data:
        extra["retain_data"] = read_rows(_require_file(args.retain_data, "--retain-data"))

    model, tokenizer = load_model(args)
    peft_model = _load_adapter(model, args.adapters[0], names[0])
    for name, path in zip(names[1:], args.adapters[1:], strict=True):
        peft_model.load_adapter(path, adapter_name=name)
    masks = peft_model.merge_with_safety_mask(
        adapters=names,
        weights=weights,
        adapter_name=args.adapter_name,
        safety_data=safety_data,
        tokenizer=tokenizer,
        combination_type=args.combination_type,
        density=args.density,
        config=config,
        **extra,
    )
    peft_model.save_pretrained(args.output, selected_adapters=[args.adapter_name])
    saved = os.path.join(args.output, args.adapter_name) if args.adapter_name != "default" else args.output
    _print(f"Saved the SOMF-merged adapter '{args.adapter_name}' of {names} to {saved}")
    if hasattr(masks, "summary"):
        _print(masks.summary())
    if args.masks_output:
        masks.save(args.masks_output)
        _print(f"Saved the safety masks to {args.masks_output}")


def cmd_export(args: argparse.Namespace) -> None:
    _output_dir(args.output, "--output")
    _check_model_dir(args.model)
    _check_adapter_dir(args.adapter)
    from .guardspace import export_to_lora

    model, _ = load_model(args)
    peft_model = _load_adapter(model, args.adapter, args.adapter_name)
    config = export_to_lora(peft_model, args.output, adapter_name=args.adapter_name)
    _print(f"Exported GuardSpace adapter '{args.adapter_name}' as vanilla LoRA (r={config.r}) to {args.output}")


def _task_examples(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    path = _require_file(args.task, "--task")
    headerless = any(c is not None and c.isdigit() for c in (args.task_prompt_column, args.task_answer_column))
    rows = read_rows(path, headerless)
    answer_column = _pick_column(rows, args.task_answer_column, path, ("answer", "label", "target", "output"))
    if args.task_template:
        try:
            prompts = [args.task_template.format(**row) for row in rows]
        except (KeyError, IndexError) as err:
            columns = list(rows[0])
            raise UsageError(f"--task-template names field {err}, missing from {path!r} (columns {columns})") from err
    else:
        prompt_column = _pick_column(rows, args.task_prompt_column, path)
        prompts = [str(row[prompt_column]) for row in rows]
    references = [str(row[answer_column]) for row in rows]
    labels = args.labels.split(",") if args.labels else None
    if args.match == "label":
        if not labels:
            raise UsageError("--match label needs --labels, e.g. --labels negative,positive")
        references = [labels[int(r)] if r.isdigit() and int(r) < len(labels) else r for r in references]
    if args.limit:
        prompts, references = prompts[: args.limit], references[: args.limit]
    return prompts, references


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluation import metrics

    if not (args.harmful or args.benign or args.task):
        raise UsageError("nothing to evaluate: give --harmful, --benign and/or --task")
    _output_file(args.output, "--output")
    _output_file(args.plot, "--plot")
    _check_model_dir(args.model)
    if args.adapter:
        _check_adapter_dir(args.adapter)
    harmful = load_prompts(args.harmful, args.column, args.limit) if args.harmful else None
    benign = load_prompts(args.benign, args.column, args.limit) if args.benign else None
    task = _task_examples(args) if args.task else None
    if args.append and os.path.exists(args.output):
        try:
            previous = metrics.load_results(args.output)
        except (ValueError, json.JSONDecodeError) as err:
            raise UsageError(f"--append: {err}") from err
    else:
        previous = {"format": metrics.RESULTS_FORMAT, "methods": {}}
    judge_kwargs: dict[str, Any] = {}
    if args.flagged_labels:
        judge_kwargs["flagged_labels"] = args.flagged_labels.split(",")
    if args.judge_threshold is not None:
        if not 0.0 <= args.judge_threshold <= 1.0:  # also refuses NaN
            raise UsageError(f"--judge-threshold must be in [0, 1], got {args.judge_threshold}")
        judge_kwargs["threshold"] = args.judge_threshold
    from .evaluation.judges import KeywordJudge, load_judge

    if args.judge == "keyword" and "threshold" in judge_kwargs:
        raise UsageError("--judge-threshold applies to model judges only")
    judge = load_judge(args.judge, **judge_kwargs) if args.judge != "keyword" else KeywordJudge()

    model, tokenizer = load_model(args)
    if args.adapter:
        model = _load_adapter(model, args.adapter)
    chat_template = {"auto": None, "yes": True, "no": False}[args.chat_template]
    common = {"batch_size": args.batch_size, "chat_template": chat_template, "system_prompt": args.system_prompt}
    results: dict[str, Any] = {}
    if harmful:
        results["harmful_score"] = metrics.harmful_score(
            model, tokenizer, harmful, judge, max_new_tokens=args.max_new_tokens, **common
        )
    if benign:
        refusal_judge = judge if args.judge == "keyword" else KeywordJudge(flag="refusal")
        results["over_refusal_rate"] = metrics.over_refusal_rate(
            model, tokenizer, benign, refusal_judge, max_new_tokens=args.max_new_tokens, **common
        )
    if task:
        results["task_accuracy"] = metrics.task_accuracy(
            model,
            tokenizer,
            task[0],
            task[1],
            match=args.match,
            labels=args.labels.split(",") if args.labels else None,
            first_n_words=args.first_n_words,
            max_new_tokens=args.task_max_new_tokens,
            **common,
        )
    method = args.method or (os.path.basename(os.path.normpath(args.adapter)) if args.adapter else "base")
    previous["methods"][method] = {name: r.score for name, r in results.items()}
    if args.records:
        previous.setdefault("details", {})[method] = {name: r.to_dict() for name, r in results.items()}
    from ._files import atomic_write_text

    atomic_write_text(args.output, json.dumps(previous, indent=2, ensure_ascii=False))
    summary = ", ".join(f"{name} {r.score:.3f} ({r.num_prompts} prompts)" for name, r in results.items())
    _print(f"{method}: {summary}; results in {args.output}")
    if args.plot:
        try:
            metrics.plot_safety_utility(previous["methods"], args.plot)
        except ValueError as err:
            raise UsageError(f"--plot: {err} (evaluate with --harmful and --task)") from err
        _print(f"Plot in {args.plot}")


def cmd_report(args: argparse.Namespace) -> None:
    _output_file(args.json, "--json")
    _output_file(args.plot, "--plot")
    _check_model_dir(args.model)
    _check_adapter_dir(args.adapter)
    from .guardspace import guardspace_report

    heldout = None
    if args.heldout_statistics:
        from .statistics import SafetyStatistics

        try:
            heldout = SafetyStatistics.load(args.heldout_statistics)
        except (OSError, ValueError) as err:
            raise UsageError(f"--heldout-statistics: {err}") from err
    model, _ = load_model(args)
    peft_model = _load_adapter(model, args.adapter, args.adapter_name)
    try:
        report = guardspace_report(peft_model, args.adapter_name, heldout_statistics=heldout)
    except ValueError as err:
        raise UsageError(str(err)) from err
    _print(str(report))
    if args.json:
        from ._files import atomic_write_text

        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2))
        _print(f"Report in {args.json}")
    if args.plot:
        from .evaluation.metrics import plot_null_space

        plot_null_space(report, args.plot)
        _print(f"Plot in {args.plot}")


# ----------------------------------------------------------------------------------------------- parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local folder of the (aligned) base model and its tokenizer")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"], help="weights dtype"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="peft-safety",
        description="Safety-preserving fine-tuning (GuardSpace) and merging (SOMF) for PEFT adapters.",
        epilog="Run 'peft-safety <command> --help' for the options of a command.",
    )
    from . import __version__

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
        "(prompt/chosen/rejected or prompt/completion rows) and save the fused adapter.",
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
    merge.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="SOMFConfig field (JSON value), repeatable"
    )
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
    return parser


def _positive_ints(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "max_length", "limit", "max_new_tokens", "task_max_new_tokens", "first_n_words"):
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


if __name__ == "__main__":
    sys.exit(main())
