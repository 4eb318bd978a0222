"""The ``musar`` command. Each subcommand takes ``--config FILE`` plus ``dotted.key=value`` overrides."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .config import ConfigError, dump_yaml, load_config


def _demo() -> tuple[type, Callable]:
    from .demo import DemoConfig, run_demo

    return DemoConfig, run_demo


# name -> (help, loader returning (config class, runner))
COMMANDS: dict[str, tuple[str, Callable[[], tuple[type, Callable]]]] = {
    "demo": ("generate a two-subject image with the embedded tiny model (or a FLUX folder)", _demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musar", description="MUSAR: multi-subject customization on FLUX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML config file")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config fields, e.g. steps=4")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    config_cls, runner = COMMANDS[args.command][1]()
    try:
        config = load_config(config_cls, args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"musar {args.command}: config error: {err}\n")
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    try:
        runner(config)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(1, f"musar {args.command}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
