"""The CLI's subcommands: ``stats``, ``merge``, ``export``, ``eval``, ``report`` (one ``cmd_*`` function each)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any

from .errors import UsageError, _print
from .inputs import _output_dir, _output_file, _pick_column, _require_file, load_prompts, read_rows
from .models import _check_adapter_dir, _check_model_dir, _load_adapter, load_causal_lm, load_model


def cmd_stats(args: argparse.Namespace) -> None:
    if args.exclude_bos:  # removed option: refuse it before loading anything
        from ..statistics import EXCLUDE_BOS_REASON

        raise UsageError(f"--exclude-bos is no longer supported: {EXCLUDE_BOS_REASON}")
    _output_file(args.output, "--output")
    _check_model_dir(args.model)
    prompts = load_prompts(args.prompts, args.column, args.limit)
    from ..statistics import collect_safety_statistics

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


def somf_flag(name: str) -> str:
    """The ``merge`` flag of a ``SOMFConfig`` field: ``max_steps`` -> ``--somf-max-steps``."""
    return "--somf-" + name.replace("_", "-")


def _as_flag(key: str, value: Any) -> str:
    """The ``--somf-*`` spelling of ``--option key=value``, for the deprecation warning."""
    if value is True:
        return somf_flag(key)
    if value is False:
        return "--no-" + somf_flag(key).removeprefix("--")
    return f"{somf_flag(key)} {value}"


def _somf_config(args: argparse.Namespace) -> Any:
    """``SOMFConfig`` from the ``--somf-*`` flags and the deprecated ``--option KEY=VALUE``.

    A field set both ways is refused; an invalid value is reported with the flag (or ``--option``) that gave it.
    Valid ``--option`` values print one warning line naming the flags to use instead.
    """
    from ..somf.config import SOMFConfig

    options = {}
    for name in (field.name for field in dataclasses.fields(SOMFConfig)):
        value = getattr(args, f"somf_{name}", None)
        if value is not None:
            options[name] = value
    legacy = dict(_parse_option(o) for o in args.option)
    for key in legacy:
        if key in options:
            raise UsageError(f"--option {key}=... and {somf_flag(key)} both set {key}; give it once")
    try:
        config = SOMFConfig(**options, **legacy)
    except TypeError as err:  # unknown field, only possible through --option
        raise UsageError(f"--option: {err}") from err
    except ValueError as err:  # SOMFConfig's messages start with the field name
        field = str(err).split(" ", 1)[0]
        raise UsageError(f"{'--option' if field in legacy else somf_flag(field)}: {err}") from err
    if legacy:  # warned only once the values are valid, so that a mistake stays a one-line error
        flags = " ".join(_as_flag(key, value) for key, value in legacy.items())
        print(f"peft-safety: warning: --option is deprecated and will be removed; use {flags}", file=sys.stderr)
    return config


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
    config = _somf_config(args)
    extra = {}
    if args.retain_data:
        extra["retain_data"] = read_rows(_require_file(args.retain_data, "--retain-data"))

    model, tokenizer = load_model(args)
    # trainable loads keep GuardSpace adapters' projector bases, which the merge re-projects with
    peft_model = _load_adapter(model, args.adapters[0], names[0], is_trainable=True)
    for name, path in zip(names[1:], args.adapters[1:], strict=True):
        peft_model.load_adapter(path, adapter_name=name, is_trainable=True)
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
    from ..guardspace import export_to_lora

    model, _ = load_model(args)
    peft_model = _load_adapter(model, args.adapter, args.adapter_name)
    config = export_to_lora(peft_model, args.output, adapter_name=args.adapter_name)
    _print(f"Exported GuardSpace adapter '{args.adapter_name}' as vanilla LoRA (r={config.r}) to {args.output}")


def _parse_budget(text: str | None) -> int | float | None:
    """``--budget``: a whole number of layers (``3``) or a fraction of them (``0.25``)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--budget {text!r}: expected a number of layers (3) or a fraction (0.25)") from None


def _check_lora_adapter_dir(path: str) -> None:
    """Refuse, from ``adapter_config.json`` alone, adapters that Safe LoRA cannot project."""
    _check_adapter_dir(path)
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"--adapter {path!r}: adapter_config.json could not be read ({err})") from err
    if config.get("init_lora_weights") == "guardspace":
        raise UsageError(
            f"--adapter {path!r} is a GuardSpace adapter: write it as a plain LoRA adapter first with "
            "'peft-safety export', then project that folder"
        )
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UsageError(f"--adapter {path!r} is a {config.get('peft_type')} adapter; Safe LoRA needs a LoRA adapter")
    if config.get("use_dora"):
        raise UsageError(f"--adapter {path!r} is a DoRA adapter; Safe LoRA supports plain LoRA adapters only")


def cmd_safe_lora(args: argparse.Namespace) -> None:
    _output_dir(args.output, "--output")
    _output_file(args.json, "--json")
    _check_model_dir(args.model)
    _check_model_dir(args.unaligned, "--unaligned")
    _check_lora_adapter_dir(args.adapter)
    if os.path.abspath(args.output) == os.path.abspath(args.adapter):
        raise UsageError("--output must be a new folder, not the --adapter folder itself")
    budget = _parse_budget(args.budget)
    from ..safe_lora import _check_rule, apply_safe_lora

    _check_rule(args.threshold, budget)

    peft_model = _load_adapter(load_causal_lm(args.model, args), args.adapter)
    unaligned = load_causal_lm(args.unaligned, args)
    report = apply_safe_lora(peft_model, unaligned, threshold=args.threshold, budget=budget)
    del unaligned
    peft_model.save_pretrained(args.output)
    _print(str(report) if args.verbose else str(report).splitlines()[0])
    _print(f"Saved the projected LoRA adapter to {args.output}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report.to_dict(), handle, indent=2)
        _print(f"Report in {args.json}")


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
    from ..evaluation import metrics

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
    from ..evaluation.judges import KeywordJudge, load_judge

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
    from .._files import atomic_write_text

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
    from ..guardspace import guardspace_report

    heldout = None
    if args.heldout_statistics:
        from ..statistics import SafetyStatistics

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
        from .._files import atomic_write_text

        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2))
        _print(f"Report in {args.json}")
    if args.plot:
        from ..evaluation.metrics import plot_null_space

        plot_null_space(report, args.plot)
        _print(f"Plot in {args.plot}")


def cmd_demo(args: argparse.Namespace) -> None:
    from ..demo import DemoSettings, run_demo

    settings = DemoSettings(poison_fraction=args.poison_fraction, steps=args.steps)
    if args.model is not None:
        _check_model_dir(args.model)
    _output_dir(args.output_dir, "--output-dir")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    run_demo(args.output_dir, args.cache_dir, settings, model=args.model)
