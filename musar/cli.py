"""The ``musar`` command and the shared argument handling of every job entry point.

Every command and ``jobs/*.py`` script is a typed config dataclass plus a ``run(config)`` function.
:func:`job_main` gives each one the same interface: ``--config FILE.yaml``, a ``--flag`` for every
top-level scalar field (``--min-score 5`` is ``min_score=5``), ``dotted.key=value`` overrides for
anything nested, and ``--print-config``. Commands are imported lazily so ``musar --help`` stays fast
and never imports Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from pathlib import Path
from typing import Callable

from .config import ConfigError, dump_yaml, load_config

# command words -> ("module:CONFIG_CLASS:run_function", help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("quickstart",): ("musar.quickstart:QuickstartConfig:run_quickstart", "data -> 3 training stages -> generation, all local"),
    ("plan",): ("musar.plan:PlanConfig:run_plan", "capacity plan of a training config (memory, FLOPs, time, storage)"),
    ("eval",): ("evaluation.run:EvalConfig:run_eval", "DreamBench evaluation (DINO / CLIP-I / CLIP-T), one MLflow run"),
    ("serve",): ("musar.serving:ServeAppConfig:run_serve", "serve the model over HTTP with Ray Serve (tiny model by default)"),
    ("demo",): ("musar.demo:DemoConfig:run_demo", "generate a two-subject image with the embedded tiny model"),
    ("generate",): ("musar.generate:GenerateConfig:run_generate", "generate an image with subjects (MUSARPipeline)"),
    ("data", "synth"): ("pipelines.synthetic:SynthConfig:write_synthetic", "write a synthetic Subject200K-format set"),
    ("data", "build"): ("pipelines.build:DataBuildConfig:build_shards", "Subject200K -> single/diptych shards (Ray Data)"),
    ("toy", "base"): ("toystudy.base:ToyBaseConfig:build_toy_base", "pre-train the toy study's base model (world scenes)"),
    ("toy", "study"): ("toystudy.study:StudyConfig:run_study", "MUSAR vs its ablations at toy scale (needs a toy base)"),
    ("toy", "data"): ("toystudy.subject200k:ToyDataConfig:write_toy_subject200k", "toy single-subject Subject200K set"),
}

_SCALARS = (int, float, str, bool, Path)


def _is_scalar(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp in _SCALARS or (typing.get_origin(tp) in (typing.Union, __import__("types").UnionType)
                              and len(args) == 1 and args[0] in _SCALARS)  # fmt: skip


def job_main(config_cls: type, run: Callable, argv: list[str] | None = None, prog: str | None = None,
             description: str | None = None) -> int:  # fmt: skip
    """Parse arguments into ``config_cls``, then call ``run(config)``; returns the exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    redirect = getattr(config_cls, "__config_flag__", None)
    parser.add_argument("--config", help=f"YAML file for {redirect}" if redirect else "YAML config file (fields below override it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    hints = typing.get_type_hints(config_cls)
    flags = []
    for f in dataclasses.fields(config_cls):
        if f.name == "config":
            continue
        if _is_scalar(hints[f.name]):
            default = f.default if f.default is not dataclasses.MISSING else "required"
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f"field__{f.name}", metavar="VALUE",
                                help=f"{f.name} (default: {default})")  # fmt: skip
            flags.append(f.name)
        elif typing.get_origin(hints[f.name]) is list and typing.get_args(hints[f.name]) == (str,):
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f"field__{f.name}", metavar="VALUE",
                                action="append", help=f"{f.name} (repeatable)")  # fmt: skip
            flags.append(f.name)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. musar.subject_rank=64")
    args = parser.parse_intermixed_args(argv)  # overrides may stand before and after flags
    overrides = []
    for name in flags:
        value = getattr(args, "field__" + name)
        if value is not None:  # strings stay strings ("a: b" is a prompt, not a mapping)
            textual = str in typing.get_args(hints[name]) or hints[name] in (str, Path) or isinstance(value, list)
            overrides.append(f"{name}={json.dumps(value) if textual else value}")
    overrides += args.overrides
    config_file = args.config
    redirect = getattr(config_cls, "__config_flag__", None)
    if redirect and config_file is not None:  # --config names a field's file (e.g. the plan's training config)
        overrides.insert(0, f"{redirect}={json.dumps(config_file)}")
        config_file = None
    try:
        config = load_config(config_cls, config_file, overrides)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: config error: {err}\n")
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    try:
        run(config)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, (target, _) in sorted(COMMANDS.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            module, cls_name, fn_name = target.split(":")
            mod = importlib.import_module(module)
            return job_main(getattr(mod, cls_name), getattr(mod, fn_name), argv[len(words):],
                            prog="musar " + " ".join(words), description=mod.__doc__)  # fmt: skip
    parser = argparse.ArgumentParser(prog="musar", description="MUSAR: multi-subject customization on FLUX.")
    lines = "\n".join(f"  {' '.join(w):16s} {h}" for w, (_, h) in COMMANDS.items())
    parser.epilog = f"commands:\n{lines}\n\n'musar COMMAND --help' describes each one."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.usage = "musar COMMAND [options]"
    if argv and argv[0] not in ("-h", "--help"):
        parser.exit(2, f"musar: unknown command {' '.join(argv[:2])!r}\n\n{parser.format_help()}")
    parser.print_help()
    return 0 if argv else 2

if __name__ == "__main__":
    sys.exit(main())
