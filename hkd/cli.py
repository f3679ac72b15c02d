"""``hkd`` command line. Every user mistake ends as one ``hkd: error: ...`` line, exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from hkd.errors import HkdError, StoppedEarly, defer_warnings, flush_warnings


class UsageError(Exception):
    """A command line argparse refuses (a missing argument, a flag's value outside its range)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a refused command line is one ``hkd: error:`` line naming the flag (printed by :func:`main`)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UsageError(f"{message.removeprefix('argument ')} (see {self.prog} --help)")


# flags that act only with another flag: (command, flag, what it needs, test on the parsed arguments)
FLAG_NEEDS: list[tuple[str, str, str, Callable[[argparse.Namespace], bool]]] = [
    ("cache-teacher", "--top-k", "--targets topk", lambda a: a.targets in (None, "topk")),
    ("cache-teacher", "--samples", "--targets sampled", lambda a: a.targets == "sampled"),
    ("cache-teacher", "--seed", "--targets sampled (it seeds the draws)", lambda a: a.targets == "sampled"),
    ("cache-teacher", "--temperature", "--targets topk or sampled", lambda a: a.targets != "none"),
    *(("init-student", flag, "--data (calibration text)", lambda a: a.data is not None)
      for flag in ("--prompt-field", "--completion-field", "--text-field", "--batches")),
    ("init-student", "--completion-field", "--prompt-field", lambda a: a.prompt_field is not None),
    ("init-student", "--text-field", "no --prompt-field (which reads --prompt-field and --completion-field)",
     lambda a: a.prompt_field is None),
]
FLAG_DEFAULTS: dict[str, dict[str, object]] = {"cache-teacher": {"top_k": 64, "samples": 64}, "init-student": {
    "completion_field": "completion", "text_field": "text", "batches": 4}}
TAKES_OVERRIDES = {"distill", "init-model", "generate", "cache-teacher", "eval"}  # --key.path=value after the flags


def check_flag_needs(args: argparse.Namespace) -> None:
    """Refuse a flag given without the one it needs (:data:`FLAG_NEEDS`), then fill in the defaults."""
    for command, flag, needs, holds in FLAG_NEEDS:
        name = flag.removeprefix("--").replace("-", "_")
        if args.command == command and getattr(args, name, None) is not None and not holds(args):
            raise HkdError(f"{flag} {getattr(args, name)}: has no effect without {needs}; remove it or add that")
    for name, value in FLAG_DEFAULTS.get(args.command, {}).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _split_overrides(extra: list[str]) -> list[str]:
    overrides = []
    for arg in extra:
        if not (arg.startswith("--") and "=" in arg):
            raise HkdError(f"unrecognised argument {arg!r}; config overrides look like --optim.lr=3e-4")
        overrides.append(arg)
    return overrides


def cmd_distill(args: argparse.Namespace, extra: list[str]) -> int:
    from hkd.config import load_config
    from hkd.plugin.hookspecs import hookimpl
    from hkd.plugin.manager import build_manager

    class ShowWarnings:  # the warnings held back while the run was checked, shown when it starts training
        @hookimpl
        def hkd_on_train_start(self) -> None:
            flush_warnings()

    from hkd.train.distributed import barrier, init_distributed
    from hkd.train.loop import distill
    from hkd.train.rundir import prepare_run_dir

    overrides = _split_overrides(extra)
    config = load_config(args.config, overrides)
    config.plugins.disable = sorted(set(config.plugins.disable) | set(args.disable or []))
    if args.no_progress:
        config.train.progress = False
    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    info = init_distributed()  # the run-directory guard decides before anything is written; rank 0 clears
    plan = prepare_run_dir(run_dir, config, resume=args.resume, overwrite=args.overwrite,
                           allow_config_change=args.allow_config_change, write=info.is_main)
    barrier(info)  # a changed resumed config is recorded when training starts (plan.hkd_on_train_start)
    pm = build_manager(config.plugins.disable, extra_plugins=[("hkd-run-directory", plan),  # counts finished steps
                                                              ("hkd-warnings", ShowWarnings())])  # shown at step 0
    try:
        result = distill(config, run_dir, resume=args.resume, pm=pm)
    finally:  # a new run that never finished a step leaves nothing; --overwrite: the old run comes back
        if info.is_main:
            plan.settle()
    loader = "AutoModel" if config.student.encoder else "AutoModelForCausalLM"
    print(f"done: {result.steps} steps; load the student with {loader}.from_pretrained({_shown(result.final_dir)!r})")
    return 0


def cmd_plugins(args: argparse.Namespace, extra: list[str]) -> int:
    from hkd.plugin.manager import build_manager

    rows = [(i.name, i.module, i.distribution, ", ".join(i.stages) or "-") for i in build_manager(args.disable or []).infos()]
    _table(["name", "module", "distribution", "stages"], rows)
    return 0


def cmd_stages(args: argparse.Namespace, extra: list[str]) -> int:
    from hkd.plugin.manager import build_manager
    from hkd.plugin.stage import available_stages

    specs = available_stages(build_manager(args.disable or []))
    _table(["stage", "level", "config", "description"],
           [(s.name, s.level, s.config_cls.__name__, s.description) for s in specs.values()])
    return 0


def cmd_kernels(args: argparse.Namespace, extra: list[str]) -> int:
    from hkd import kernels
    from hkd.plugin.manager import build_manager

    build_manager(args.disable or [])  # plugin backends register themselves here
    rows = []
    for op in kernels.OPS:
        for b in kernels.backends(op):
            rows.append((op, b["name"], "yes" if b["available"] else f"no ({b['reason']})", "<- auto" if b["auto"] else ""))
    _table(["op", "backend", "available", "auto"], rows)
    return 0


def cmd_init_model(args: argparse.Namespace, extra: list[str]) -> int:
    from hkd.config import parse_override
    from hkd.config.outputs import check_output_dir
    from hkd.models.loading import PRESET_RECIPE, write_preset

    check_output_dir(args.out, "--out", "init-model", owner=lambda p: (p / PRESET_RECIPE).is_file(),
                     why=f"it has no {PRESET_RECIPE}")
    overrides = {}
    for text in _split_overrides(extra):
        keys, value = parse_override(text)
        overrides[".".join(keys)] = value
    out = write_preset(args.preset, args.out, overrides, args.seed)
    print(f"wrote {args.preset} to {out}")
    return 0


def cmd_init_student(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    from hkd.commands.init_student import InitOptions, init_student

    if extra:
        raise HkdError(f"unrecognised argument(s) {extra}; see hkd init-student --help")
    options = InitOptions(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                          share_layers=args.share_layers, data=args.data, prompt_field=args.prompt_field,
                          completion_field=args.completion_field, text_field=args.text_field,
                          batches=args.batches, seed=args.seed)
    out = init_student(args.teacher, args.out, options)
    record = json.loads((out / "hkd-init.json").read_text())
    print(f"wrote {out}: {record['sizes']}, teacher blocks {record['teacher_blocks']}, "
          f"{record['params']['student']:,} of {record['params']['teacher']:,} parameters")
    print(f"use it as student: {{path: {str(out)!r}}}; stages' layer_map: {{strategy: init}} maps the layers it was cut from")
    return 0


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    from hkd.train.distributed import init_distributed
    from hkd.commands.generate import check_generate_output, generate, load_generate_config

    if args.out:
        check_generate_output(args.out, "--out")
    config = load_generate_config(args.config, _split_overrides(extra))
    config.plugins.disable = sorted(set(config.plugins.disable) | set(args.disable or []))
    if args.out:
        config.output = str(Path(args.out).resolve())
    if args.no_progress or not _terminal():
        config.progress = False
    summary = generate(config)
    if not init_distributed().is_main:  # under torchrun rank 0 reports for everyone
        return 0
    print(f"{summary.prompts} prompts, {summary.samples} samples: kept {summary.kept}, "
          f"rejected {summary.samples - summary.kept}; written to {_shown(summary.output)}")
    if summary.rejected:
        _table(["rejected because", "count"], sorted(summary.rejected.items()))
    return 0


def cmd_cache_teacher(args: argparse.Namespace, extra: list[str]) -> int:
    from hkd.teachers.cache import build_cache
    from hkd.config import load_config

    config = load_config(args.config, _split_overrides(extra))
    config.plugins.disable = sorted(set(config.plugins.disable) | set(args.disable or []))
    out = args.out or config.teacher_cache
    if not out:
        raise HkdError("cache-teacher: give --out DIR or set teacher_cache in the config")
    index = build_cache(config, Path(out), top_k=args.top_k, hidden=not args.no_hidden, targets=args.targets,
                        samples=args.samples, temperature=args.temperature, seed=args.seed,
                        examples_per_shard=args.examples_per_shard, progress=not args.no_progress and _terminal(),
                        flag="--out" if args.out else "teacher_cache")
    print(f"teacher cache written: {_shown(index)}; train from it with --teacher_cache={_shown(Path(out))}")
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from hkd.commands.evaluate import check_eval_output, load_eval_config, result_rows, run_eval

    if args.out:
        check_eval_output(args.out, "--out")
    config = load_eval_config(args.config, _split_overrides(extra))
    config.plugins.disable = sorted(set(config.plugins.disable) | set(args.disable or []))
    if args.out:
        config.output = str(Path(args.out).resolve())
    if args.no_progress or not _terminal():
        config.progress = False
    _table(["metric", "value"], result_rows(run_eval(config)))
    print(f"results written to {_shown(Path(config.output))}")
    return 0


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from hkd.commands.demo import DemoSettings, run_demo

    if extra:
        raise HkdError(f"unrecognised argument(s) {extra}; hkd demo takes --task, --out, --quick, --seed, --threads, "
                       "--no-progress")
    if args.task == "hard":
        if args.quick:
            raise HkdError("--quick is the addition task's smoke version; the hard task has none (drop --quick)")
        settings = DemoSettings.hard(args.seed)
    else:
        settings = DemoSettings.quick(args.seed) if args.quick else DemoSettings(seed=args.seed)
    out = args.out or ("runs/demo-hard" if args.task == "hard" else "runs/demo")
    run_demo(settings, Path(out), progress=not args.no_progress, threads=args.threads)
    return 0


def cmd_init_config(args: argparse.Namespace, extra: list[str]) -> int:
    from hkd.commands.init_config import starter_config, write_starter_config

    if args.out is None:  # to stdout: absolute model paths, since the text may be saved anywhere
        print(starter_config(args.teacher, args.student, None), end="")
        return 0
    out = write_starter_config(args.teacher, args.student, args.out)
    print(f"wrote {out}; run it with: hkd distill {out} --out runs/{out.stem}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        from hkd.commands.report import build_report
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        raise HkdError("report draws with matplotlib, which is not installed: pip install 'hkd[plot]' "
                       "(or pip install matplotlib)") from None

    steps = None
    if args.steps:
        try:
            steps = [int(x) for x in args.steps.split(",") if x.strip()]
        except ValueError:
            raise HkdError(f"report --steps: expected comma-separated step numbers, got {args.steps!r}") from None
    page = build_report(Path(args.run_dir), Path(args.out) if args.out else None, steps)
    print(f"report written: {_shown(page)}  (open {page.resolve().as_uri()})")
    return 0


def cmd_probe(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    from hkd.commands.probe import probe

    out = probe(Path(args.run_dir), args.step, args.batches, progress=not args.no_progress and _terminal(),
                trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, final=args.final)
    result = json.loads(out.read_text())
    for name, key in (("hidden-state CKA (1 = same)", "hidden_cka"), ("attention KL (0 = same)", "attention_kl")):
        first = 0 if key == "hidden_cka" else 1
        at = "final/" if result.get("final") else f"step {result['step']}"
        print(f"{name}, {at}: rows teacher layer, columns student layer")
        header = ["t\\s", *(str(s) for s in range(first, result["student_layers"] + 1))]
        _table(header, [[str(t + first), *(f"{v:.3g}" for v in row)] for t, row in enumerate(result[key])])
    print(f"written to {out}; hkd report {args.run_dir} draws it")
    return 0


def _terminal() -> bool:
    """Progress bars only on a terminal: in a log file or CI output a bar is a line of carriage returns."""
    return sys.stderr.isatty()


def _shown(path: Path) -> str:
    """A path to print: relative to the working directory when inside it, else absolute; never ``..``."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def _table(header: list[str], rows: Sequence[Sequence[object]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    from hkd import __version__  # hkd/__init__ imports nothing heavy: --help and --version stay fast

    from hkd.config.flags import (BATCHES, EXAMPLES_PER_SHARD, PRESET_SEED, SAMPLES, SEED, SHARE, SIZE, STEP,
                                  TEMPERATURE, THREADS, TOP_K, number)

    parser = Parser(
        prog="hkd", description="Progressive hierarchical knowledge distillation. Start with: hkd demo",
        epilog="hkd COMMAND --help says more about each command; docs/reference/config.md has every config key.")
    parser.add_argument("--version", action="version", version=f"hkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace, list[str]], int], help: str) -> argparse.ArgumentParser:
        # no abbreviations: an override such as --n=1 must not be taken for --no-progress
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        p.add_argument("--disable", action="append", metavar="PLUGIN", help="disable a plugin by name (repeatable)")
        p.set_defaults(func=func)
        return p

    p = add("distill", cmd_distill, "distil a teacher into a student (overrides: --key.path=value)")
    p.description = (
        "Distil a teacher into a student through the config's phases. Any config key can be overridden: "
        "--optim.lr=3e-4 --stages.logits.divergence=jsd; --teacher.path=DIR replaces a preset teacher. "
        "Config reference: docs/reference/config.md (every key, its type, default and range). "
        "A starter config for your models: hkd init-config --teacher DIR --student DIR --out cfg.yaml. "
        "Paths: --out and paths in overrides are relative to the working directory; paths inside the "
        "YAML file (model and data paths, teacher_cache) are relative to the YAML file.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--out", help="run directory, relative to the working directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its outputs are deleted)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue although the config differs from the run's saved config.yaml")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar or periodic progress lines (resume, phase and end lines stay)")
    add("plugins", cmd_plugins, "list installed plugins: name, module, distribution, stages")
    add("stages", cmd_stages, "list available distillation stages")
    add("kernels", cmd_kernels, "list kernel ops, backends and what auto picks here")
    p = add("init-model", cmd_init_model, "write a tiny preset model + tokenizer (overrides: --num_hidden_layers=2)")
    p.add_argument("preset", help="tiny-llama, tiny-qwen2 or tiny-bert")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=number(PRESET_SEED), default=0, help="weight initialisation seed (default 0)")
    p = add("init-student", cmd_init_student, "cut a student out of a teacher: fewer blocks, pruned width "
                                              "(Minitron), records hkd-init.json")
    p.add_argument("--teacher", required=True, help="teacher model directory")
    p.add_argument("--out", required=True, help="student directory to write")
    p.add_argument("--layers", help="every:K | 0,3,7,11 (0-based blocks) | importance:N (default: every block)")
    p.add_argument("--hidden", type=number(SIZE), help="hidden size (keeps the most active channels)")
    p.add_argument("--intermediate", type=number(SIZE), help="MLP size (keeps the most active neurons)")
    p.add_argument("--heads", type=number(SIZE), help="query heads (keeps the most active key/value groups)")
    p.add_argument("--share-layers", type=number(SHARE),
                   help="ALBERT-style sharing in groups of K blocks (refused for decoders)")
    p.add_argument("--data", help="calibration JSONL (for importance:N and width pruning)")
    p.add_argument("--prompt-field", help="prompt field of --data (default: plain text in --text-field)")
    p.add_argument("--completion-field", help="completion field of --data, with --prompt-field (default completion)")
    p.add_argument("--text-field", help="text field of --data, without --prompt-field (default text)")
    p.add_argument("--batches", type=number(BATCHES), help="calibration batches of 8 sequences (default 4)")
    p.add_argument("--seed", type=number(SEED), default=0, help="seed of the calibration batches (default 0)")
    p = add("generate", cmd_generate, "teacher writes solutions; verifiers keep the correct ones (resumable)")
    p.add_argument("config", help="YAML generate config")
    p.add_argument("--out", help="output JSONL (default: output in the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add("cache-teacher", cmd_cache_teacher,
            "store the teacher's top-k or sampled targets and hidden states for a distill config")
    p.add_argument("config", help="YAML distill config")
    p.add_argument("--out", help="cache directory (default: teacher_cache in the config)")
    p.add_argument("--targets", choices=["topk", "sampled", "none"],
                   help="topk: the k largest logits and the log-normaliser (default; none for an encoder); sampled: "
                        "--samples draws from the teacher (unbiased); none: hidden states only")
    p.add_argument("--top-k", type=number(TOP_K), help="teacher logits kept per position (default 64)")
    p.add_argument("--samples", type=number(SAMPLES), help="draws per position for --targets sampled (default 64)")
    p.add_argument("--temperature", type=number(TEMPERATURE, float),
                   help="temperature of the log-normaliser and the draws (default: the config's constant "
                        "schedule.temperature, else 1); tail buckets and sampled targets serve only runs at it")
    p.add_argument("--seed", type=number(SEED), help="seed of the draws (default: train.seed)")
    p.add_argument("--no-hidden", action="store_true", help="do not store hidden states")
    p.add_argument("--examples-per-shard", type=number(EXAMPLES_PER_SHARD), default=1024,
                   help="examples per shard file (default 1024)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add("eval", cmd_eval, "pass@k with verifiers, teacher-student agreement and perplexity")
    p.add_argument("config", help="YAML eval config")
    p.add_argument("--out", help="results JSON (default: output in the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add("demo", cmd_demo, "the whole pipeline on synthetic addition: teacher, data distillation, "
                              "progressive distillation + RL, pass@1 table (CPU, no downloads)")
    p.add_argument("--task", choices=["addition", "hard"], default="addition",
                   help="addition: 2-digit sums (default); hard: 3-digit sums, a bigger teacher trained longer, "
                        "students that do not saturate (docs/benchmarks.md: Hard task: budget curves)")
    p.add_argument("--out", default=None,
                   help="run directory (default runs/demo, or runs/demo-hard for --task hard; the teacher is cached there)")
    p.add_argument("--quick", action="store_true",
                   help="the CI smoke version: 75 s on 2 busy shared CPU cores, under a minute on idle ones "
                        "(the full demo: 3 to 9 minutes); checks the plumbing, its students train too little to score")
    p.add_argument("--seed", type=number(SEED), default=0,
                   help="seed for the problem splits, the teacher's and students' initialisation and batch order "
                        "(default 0; docs/benchmarks.md: the demo across seeds)")
    p.add_argument("--threads", type=number(THREADS), default=1,
                   help="torch CPU threads (default 1: robust on a shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = add("init-config", cmd_init_config, "write an annotated starter distill config for a teacher/student pair")
    p.add_argument("--teacher", required=True, help="teacher model directory (Hugging Face, with config.json)")
    p.add_argument("--student", required=True, help="student model directory")
    p.add_argument("--out", help="YAML file to write (default: print to stdout)")
    p = add("probe", cmd_probe, "every teacher layer x every student layer: hidden-state CKA and attention KL")
    p.add_argument("run_dir", help="run directory (the --out of hkd distill)")
    p.add_argument("--step", type=number(STEP), help="checkpoint step (default: newest; 0 = the initial student)")
    p.add_argument("--final", action="store_true", help="probe the run's final/ model instead of a checkpoint")
    p.add_argument("--batches", type=number(BATCHES), default=4,
                   help="micro-batches of the run's data to measure on (default 4)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run model code from the run's model directories (never taken from the run's config.yaml)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickle (*.bin) weights (never taken from the run's config.yaml)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add("report", cmd_report, "HTML report of a run (finished or running): losses, schedule, layers, eval")
    p.add_argument("run_dir", help="run directory (the --out of hkd distill)")
    p.add_argument("--out", help="report directory (default RUN_DIR/report)")
    p.add_argument("--steps", help="steps for the layer heatmaps, e.g. 100,500 (default: last step of each phase)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except UsageError as exc:
        print(f"hkd: error: {exc}", file=sys.stderr)
        return 2
    defer_warnings()  # a refused command prints its one error line and nothing else
    try:
        if extra and args.command not in TAKES_OVERRIDES:
            raise HkdError(f"unrecognised argument(s) {extra}; see hkd {args.command} --help")
        check_flag_needs(args)
        code = args.func(args, extra)
        flush_warnings()
        return code
    except HkdError as exc:
        flush_warnings(show=isinstance(exc, StoppedEarly))
        if os.environ.get("HKD_DEBUG"):  # developers: the full chain, not the one-line summary
            raise
        if isinstance(exc, StoppedEarly):
            print(f"hkd: {exc}", file=sys.stderr)
            return 130
        print(f"hkd: error: {exc}", file=sys.stderr)
        return 2
    except (ImportError, AttributeError) as exc:  # a dependency's release that breaks an import: name it
        from hkd.versions import explain

        message = explain(exc)
        if message is None or os.environ.get("HKD_DEBUG"):
            raise
        print(f"hkd: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hkd: interrupted", file=sys.stderr)
        return 130
    finally:  # distill and generate join a torchrun process group; leave it explicitly (gloo)
        flush_warnings()
        if "hkd.train.distributed" in sys.modules:  # else no group was joined: report, stages... never import torch
            from hkd.train.distributed import shutdown_distributed

            shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
