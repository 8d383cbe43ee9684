"""The ``peft-safety`` CLI on a tiny model saved to disk: subprocess runs plus in-process ``main`` calls."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import BENIGN_TEXTS, HARMFUL_PROMPTS, build_tokenizer, make_llama
from peft import LoraConfig, get_peft_model

from peft_safety import GuardSpaceConfig, SafetyStatistics, collect_safety_statistics
from peft_safety.cli import load_prompts, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["q_proj", "v_proj"]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("PEFT_SAFETY_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "peft_safety.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A saved tiny model, a GuardSpace adapter and two LoRA adapters on it, and small data files."""
    root = tmp_path_factory.mktemp("cli")
    tok = build_tokenizer()
    model = make_llama(tok)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "harmful.txt").write_text("\n".join(HARMFUL_PROMPTS) + "\n")
    (root / "benign.json").write_text(json.dumps({"instructions": BENIGN_TEXTS, "inputs": [""] * len(BENIGN_TEXTS)}))
    rows = [
        {"question": "What is the capital of France", "answer": "#### 7"},
        {"question": "Add seven", "answer": "5"},
    ]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    stats = collect_safety_statistics(model, tok, HARMFUL_PROMPTS, target_modules=TARGETS, show_progress=False)
    guard = get_peft_model(make_llama(tok), GuardSpaceConfig(r=2, target_modules=TARGETS, safety_statistics=stats))
    guard.save_pretrained(root / "guard")
    for seed, name in ((1, "task_a"), (2, "task_b")):
        lora = get_peft_model(make_llama(tok), LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
        for param in lora.parameters():  # distinct adapters
            if param.requires_grad:
                param.data.mul_(seed)
        lora.save_pretrained(root / name)
    return root


def _one_line_error(captured: str) -> str:
    lines = [line for line in captured.strip().splitlines() if line.strip()]
    assert "Traceback" not in captured
    assert len(lines) == 1, captured
    return lines[0]


@pytest.mark.parametrize("command", [None, "stats", "merge", "export", "eval", "report", "safe-lora"])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: peft-safety{' ' + command if command else ''}")


def test_stats(work, capsys):
    out = work / "stats.safetensors"
    code = main([
        "stats", "--model", str(work / "model"), "--prompts", str(work / "harmful.txt"),
        "--target-modules", ",".join(TARGETS), "--batch-size", "4", "--output", str(out),
    ])  # fmt: skip
    assert code == 0
    stats = SafetyStatistics.load(out)
    assert stats.num_prompts == len(HARMFUL_PROMPTS) and len(stats.site_of) == 2 * len(TARGETS)
    assert "Saved safety statistics" in capsys.readouterr().out


def test_user_error_in_subprocess(work):
    failed = run_cli("stats", "--model", str(work / "nope"), "--prompts", str(work / "harmful.txt"), "--output", "x")
    assert failed.returncode == 2
    assert "not a local model folder" in _one_line_error(failed.stderr)


def test_eval_in_subprocess_then_append(work):
    results, plot = work / "results.json", work / "plot.png"
    done = run_cli(
        "eval", "--model", str(work / "model"), "--adapter", str(work / "guard"), "--method", "GuardSpace",
        "--harmful", str(work / "harmful.txt"), "--benign", str(work / "benign.json"),
        "--task", str(work / "task.jsonl"),
        "--match", "number", "--max-new-tokens", "3", "--task-max-new-tokens", "3", "--batch-size", "4",
        "--records", "--output", str(results), *(["--plot", str(plot)] if HAS_MATPLOTLIB else []),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(results.read_text())
    assert set(data["methods"]["GuardSpace"]) == {"harmful_score", "over_refusal_rate", "task_accuracy"}
    assert len(data["details"]["GuardSpace"]["harmful_score"]["records"]) == len(HARMFUL_PROMPTS)
    assert data["details"]["GuardSpace"]["over_refusal_rate"]["settings"]["num_prompts"] == len(BENIGN_TEXTS)
    if HAS_MATPLOTLIB:
        assert plot.stat().st_size > 1000

    code = main([
        "eval", "--model", str(work / "model"), "--harmful", str(work / "harmful.txt"), "--limit", "2",
        "--max-new-tokens", "2", "--output", str(results), "--append",
    ])  # fmt: skip
    assert code == 0
    data = json.loads(results.read_text())
    assert set(data["methods"]) == {"GuardSpace", "base"}
    assert data["details"]["GuardSpace"]  # earlier details kept


def test_export_and_report(work, capsys):
    code = main(
        ["export", "--model", str(work / "model"), "--adapter", str(work / "guard"), "--output", str(work / "exp")]
    )
    assert code == 0
    config = json.loads((work / "exp" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4  # rank 2r

    report_json, plot = work / "report.json", work / "null.png"
    code = main([
        "report", "--model", str(work / "model"), "--adapter", str(work / "guard"), "--json", str(report_json),
        *(["--plot", str(plot)] if HAS_MATPLOTLIB else []),
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "GuardSpace adapter 'default'" in out
    layers = json.loads(report_json.read_text())["layers"]
    assert len(layers) == 2 * len(TARGETS) and all(layer["null_dim"] > 0 for layer in layers)


def test_report_with_heldout_statistics(work, capsys):
    heldout = work / "heldout.safetensors"
    tok = build_tokenizer()
    stats = collect_safety_statistics(make_llama(tok), tok, BENIGN_TEXTS, target_modules=TARGETS, show_progress=False)
    stats.save(heldout)
    report_json = work / "report_heldout.json"
    args = ["report", "--model", str(work / "model"), "--adapter", str(work / "guard")]
    assert main([*args, "--heldout-statistics", str(heldout), "--json", str(report_json)]) == 0
    assert "held-out" in capsys.readouterr().out
    layers = json.loads(report_json.read_text())["layers"]
    assert all(layer["heldout_leakage"] == 0.0 for layer in layers)  # an untrained adapter changes nothing
    assert main([*args, "--heldout-statistics", str(work / "harmful.txt")]) == 2
    assert "--heldout-statistics" in _one_line_error(capsys.readouterr().err)


def test_user_mistakes_give_one_line_and_exit_code_2(work, capsys):
    model, harmful = str(work / "model"), str(work / "harmful.txt")
    cases = [
        (["stats", "--model", model, "--prompts", str(work / "missing.txt"), "--output", "x"], "no such file"),
        (["stats", "--model", model, "--prompts", harmful, "--column", "goal", "--output", "x"], "no column 'goal'"),
        (["stats", "--model", str(work / "guard"), "--prompts", harmful, "--output", "x"], "is a PEFT adapter folder"),
        (["stats", "--model", model, "--prompts", harmful, "--batch-size", "0", "--output", "x"], "must be positive"),
        (["stats", "--model", model, "--prompts", harmful, "--target-modules", "nope", "--output", "x"], "matched no"),
        (
            ["stats", "--model", model, "--prompts", harmful, "--exclude-bos", "--output", "x"],
            "--exclude-bos is no longer supported",
        ),
        (["eval", "--model", model, "--output", "x"], "nothing to evaluate"),
        (
            ["eval", "--model", model, "--task", str(work / "task.jsonl"), "--match", "label", "--output", "x"],
            "--labels",
        ),
        (["export", "--model", model, "--adapter", model, "--output", "x"], "not a PEFT adapter folder"),
        (["export", "--model", model, "--adapter", str(work / "task_a"), "--output", "x"], "not a GuardSpace adapter"),
        (
            [
                "merge",
                "--model",
                model,
                "--adapters",
                str(work / "task_a"),
                "--weights",
                "1",
                "2",
                "--safety-data",
                harmful,
                "--output",
                "x",
            ],
            "--weights has 2 values",
        ),  # fmt: skip
        (["report", "--model", model], "required: --adapter"),
        (["frobnicate"], "invalid choice"),
    ]
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as exit_info:  # argparse errors
            code = exit_info.code
        assert code == 2, argv
        assert message in _one_line_error(capsys.readouterr().err), argv


def test_load_prompts_formats(tmp_path):
    (tmp_path / "a.csv").write_text("goal,target\nDo harm,Sure\nMore harm,Sure\n")
    (tmp_path / "b.tsv").write_text("text one\t0\ntext two\t1\n")
    (tmp_path / "c.json").write_text(json.dumps([{"prompt": "p1"}, {"prompt": "p2"}]))
    assert load_prompts(str(tmp_path / "a.csv")) == ["Do harm", "More harm"]
    assert load_prompts(str(tmp_path / "b.tsv"), column="0", limit=1) == ["text one"]
    assert load_prompts(str(tmp_path / "c.json")) == ["p1", "p2"]


def test_read_rows_keeps_cells_and_keys_as_written(tmp_path):
    """CSV cells stay text and JSON rows keep their own keys (what a ``datasets``/pandas reader would change)."""
    from peft_safety.cli import read_rows

    (tmp_path / "p.csv").write_text("goal,target\nNA,007\nnull,1.0\n")
    assert read_rows(str(tmp_path / "p.csv")) == [{"goal": "NA", "target": "007"}, {"goal": "null", "target": "1.0"}]
    assert load_prompts(str(tmp_path / "p.csv")) == ["NA", "null"]
    mixed = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}]},
        {"prompt": "q2", "completion": "no", "label": 1},
        {"prompt": "q3", "completion": "no", "label": "x"},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in mixed))
    assert read_rows(str(tmp_path / "m.jsonl")) == mixed


@pytest.mark.skipif(importlib.util.find_spec("peft_safety.somf") is None, reason="peft_safety.somf not available")
def test_merge_with_safety_mask(work):
    refusal = "I'm sorry, but I cannot help with that request."
    pairs = [{"prompt": p, "chosen": refusal, "rejected": "Sure, here is how"} for p in HARMFUL_PROMPTS]
    (work / "safety.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out = work / "merged"
    code = main([
        "merge", "--model", str(work / "model"), "--adapters", str(work / "task_a"), str(work / "task_b"),
        "--safety-data", str(work / "safety.jsonl"), "--somf-max-steps", "2", "--no-somf-progress-bar",
        "--output", str(out), "--masks-output", str(work / "masks.safetensors"),
    ])  # fmt: skip
    assert code == 0
    assert (out / "safe_merged" / "adapter_config.json").is_file() and (work / "masks.safetensors").is_file()


HEAVY_MODULES = ("torch", "transformers", "peft")


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"], ["--version"]])
def test_help_and_version_import_no_heavy_module(argv):
    """``--help`` answers without importing torch, transformers or peft (they take seconds to import)."""
    code = (
        "import sys\n"
        "from peft_safety.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print([name for name in {HEAVY_MODULES!r} if name in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_import_registers_with_peft_whatever_the_import_order():
    """``import peft_safety`` registers GuardSpace with PEFT: at once when peft is loaded, else when it is; a
    ``find_spec("peft")`` availability check (as transformers does) in between does not lose the registration."""
    check = "from peft.tuners.lora import LoraModel; print(getattr(LoraModel, '_peft_safety_installed', False))"
    orders = [
        "import peft; import peft_safety",
        "import peft_safety; import importlib.util; importlib.util.find_spec('peft'); import peft",
        "from peft_safety import GuardSpaceConfig",
    ]
    for order in orders:
        done = subprocess.run(
            [sys.executable, "-c", f"{order}; {check}"], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "True", order


@pytest.fixture(scope="module")
def broken(work, tmp_path_factory):
    """A model folder and a GuardSpace adapter folder whose safetensors files are cut short, and a read-only folder."""
    import shutil

    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(work / "model", root / "model")
    shutil.copytree(work / "guard", root / "guard")
    for path in (root / "model" / "model.safetensors", root / "guard" / "adapter_model.safetensors"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (root / "tiny.safetensors").write_bytes(b"\x01")
    return root


def _bad_cli_cases(work, broken) -> list[tuple[list[str], str]]:
    model, harmful, guard, missing = str(work / "model"), str(work / "harmful.txt"), str(work / "guard"), "/nope/dir"
    stats = ["stats", "--model", model, "--prompts", harmful]
    merge = ["merge", "--model", model, "--adapters", str(work / "task_a"), str(work / "task_b"), "--safety-data",
             harmful, "--output", str(work / "never_merged")]  # fmt: skip
    export = ["export", "--model", model, "--adapter", guard]
    evaluate = ["eval", "--model", model, "--harmful", harmful]
    report = ["report", "--model", model, "--adapter", guard]
    return [
        ([*stats, "--output", f"{missing}/stats.safetensors"], "--output '/nope/dir/stats.safetensors': The folder"),
        ([*stats, "--output", str(work)], "is a folder; give a file name"),
        ([*stats, "--device", "bogus", "--output", str(work / "s.safetensors")], "--device 'bogus' is not a torch"),
        ([*stats, "--device", "cuda:99", "--output", str(work / "s.safetensors")], "CUDA"),
        ([*stats, "--normalization", "bogus", "--output", "x"], "invalid choice: 'bogus'"),
        (
            ["stats", "--model", str(broken / "model"), "--prompts", harmful, "--output", str(work / "s.safetensors")],
            "model.safetensors' is truncated or corrupt",
        ),  # fmt: skip
        ([*merge, "--masks-output", f"{missing}/masks.safetensors"], "--masks-output '/nope/dir/masks.safetensors'"),
        ([*merge, "--masks-output", str(work)], "--masks-output"),
        ([*merge, "--option", "max_steps=abc"], "--option: max_steps must be an integer, got 'abc'"),
        ([*merge, "--option", "temperature=NaN"], "--option: temperature must be a finite number"),
        ([*merge, "--option", "init_logit=Infinity"], "--option: init_logit must be a finite number"),
        ([*merge, "--option", "learning_rate=0"], "--option: learning_rate must be in (0, inf)"),
        ([*merge, "--option", "seed=-1"], "--option: seed must be >= 0"),
        ([*merge, "--option", "progress_bar=maybe"], "--option: progress_bar must be true or false"),
        ([*merge, "--option", "final_mask=random"], "--option: final_mask must be one of"),
        ([*merge, "--option", "noise"], "expected KEY=VALUE"),
        ([*merge, "--option", "bogus=1"], "--option: "),
        ([*merge, "--option", "max_steps=3", "--somf-max-steps", "2"], "both set max_steps; give it once"),
        ([*merge, "--somf-max-steps", "abc"], "argument --somf-max-steps: invalid int value: 'abc'"),
        ([*merge, "--somf-max-steps", "0"], "--somf-max-steps: max_steps must be >= 1"),
        ([*merge, "--somf-temperature", "nan"], "--somf-temperature: temperature must be a finite number"),
        ([*merge, "--somf-learning-rate", "0"], "--somf-learning-rate: learning_rate must be in (0, inf)"),
        ([*merge, "--somf-seed", "-1"], "--somf-seed: seed must be >= 0"),
        ([*merge, "--somf-final-mask", "random"], "argument --somf-final-mask: invalid choice: 'random'"),
        ([*merge, "--somf-objective", "ppo"], "argument --somf-objective: invalid choice: 'ppo'"),
        ([*merge, "--somf-progress-bar", "false"], "unrecognized arguments: false"),
        ([*merge, "--somf-reference-adapter", ""], "--somf-reference-adapter: reference_adapter must be"),
        ([*merge, "--weights", "nan", "1"], "--weights must be finite numbers"),
        ([*merge, "--weights", "1", "inf"], "--weights must be finite numbers"),
        ([*merge, "--density", "nan"], "--density must be in (0, 1]"),
        ([*merge, "--adapter-name", "task_a"], "--adapter-name 'task_a' is also the name of an input adapter"),
        ([*merge, "--device", "bogus"], "--device 'bogus' is not a torch device"),
        (
            [
                "merge",
                "--model",
                model,
                "--adapters",
                str(broken / "guard"),
                "--safety-data",
                harmful,
                "--output",
                str(work / "never_merged"),
            ],
            "adapter_model.safetensors' is truncated or corrupt",
        ),  # fmt: skip
        ([*export, "--output", str(work / "harmful.txt")], "--output"),
        ([*export, "--device", "bogus", "--output", str(work / "never_exported")], "--device 'bogus'"),
        (
            ["export", "--model", model, "--adapter", str(broken / "guard"), "--output", str(work / "never_exported")],
            "adapter_model.safetensors' is truncated or corrupt",
        ),  # fmt: skip
        ([*evaluate, "--output", f"{missing}/results.json"], "--output '/nope/dir/results.json'"),
        (
            [*evaluate, "--output", str(work / "r.json"), "--plot", f"{missing}/plot.png"],
            "--plot '/nope/dir/plot.png'",
        ),
        ([*evaluate, "--output", str(work / "r.json"), "--judge-threshold", "nan"], "--judge-threshold must be in"),
        ([*evaluate, "--output", str(work / "r.json"), "--judge-threshold", "2"], "--judge-threshold must be in"),
        ([*evaluate, "--output", str(work / "r.json"), "--device", "cuda:99"], "CUDA"),
        ([*report, "--json", f"{missing}/report.json"], "--json '/nope/dir/report.json'"),
        ([*report, "--plot", f"{missing}/plot.png"], "--plot '/nope/dir/plot.png'"),
        ([*report, "--heldout-statistics", str(broken / "tiny.safetensors")], "--heldout-statistics"),
        (["report", "--model", str(broken / "model"), "--adapter", guard], "model.safetensors' is truncated"),
    ]


def test_bad_cli_inputs_fail_before_any_work(work, broken, capsys):
    """Each mistake: exit code 2, one line on stderr, and no output file or folder created."""
    before = sorted(os.listdir(work))
    for argv, message in _bad_cli_cases(work, broken):
        try:
            code = main(argv)
        except SystemExit as exit_info:  # argparse errors
            code = exit_info.code
        assert code == 2, argv
        assert message in _one_line_error(capsys.readouterr().err), argv
        assert sorted(os.listdir(work)) == before, argv


def test_truncated_model_in_subprocess(work, broken):
    failed = run_cli("stats", "--model", str(broken / "model"), "--prompts", str(work / "harmful.txt"),
                     "--output", str(work / "never.safetensors"))  # fmt: skip
    assert failed.returncode == 2
    assert "is truncated or corrupt" in _one_line_error(failed.stderr)
    assert not (work / "never.safetensors").exists()


def _merge_args(*extra: str):
    from peft_safety.cli.parser import build_parser

    base = ["merge", "--model", "m", "--adapters", "a", "--safety-data", "s.jsonl", "--output", "o"]
    return build_parser().parse_args([*base, *extra])


def test_somf_flags_cover_every_config_field_with_its_help(capsys):
    import dataclasses

    from peft_safety import SOMFConfig

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    help_text = capsys.readouterr().out
    for field in dataclasses.fields(SOMFConfig):
        flag = "--somf-" + field.name.replace("_", "-")
        assert flag in help_text, flag
        assert field.metadata["help"].rstrip(".").split()[0] in help_text
    assert "--no-somf-progress-bar" in help_text and "{expected,budget,bernoulli,threshold}" in help_text


def test_somf_flags_build_the_config_and_option_is_a_deprecated_alias(capsys):
    from peft_safety import SOMFConfig
    from peft_safety.cli.commands import _somf_config

    flags = _merge_args(
        "--somf-max-steps", "7", "--somf-temperature", "0.25", "--no-somf-progress-bar", "--somf-final-mask", "budget",
        "--somf-reference-adapter", "safe",
    )  # fmt: skip
    expected = SOMFConfig(
        max_steps=7, temperature=0.25, progress_bar=False, final_mask="budget", reference_adapter="safe"
    )
    assert _somf_config(flags) == expected
    assert capsys.readouterr().err == ""
    assert _somf_config(_merge_args()) == SOMFConfig()

    legacy = _merge_args(
        "--option", "max_steps=7", "--option", "temperature=0.25", "--option", "progress_bar=false",
        "--option", "final_mask=budget", "--option", "reference_adapter=safe",
    )  # fmt: skip
    assert _somf_config(legacy) == expected
    warning = _one_line_error(capsys.readouterr().err)
    assert "--option is deprecated" in warning
    assert "--somf-max-steps 7 --somf-temperature 0.25 --no-somf-progress-bar --somf-final-mask budget" in warning
