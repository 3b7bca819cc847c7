"""YAML configs whose values become argparse defaults, so command-line flags override them."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import yaml


class ConfigError(ValueError):
    pass


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return data


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def apply_config(parser: argparse.ArgumentParser, path: str | Path) -> None:
    """Make the YAML file's values the parser's defaults.

    Keys are the flags' names without dashes (``max_new_tokens: 64``); an unknown
    key is an error naming the file, so a typo never passes silently.
    """
    values = load_yaml(path)
    dests = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {unknown}; known: {sorted(dests - {'help'})}")
    parser.set_defaults(**values)


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                      base_config: str | Path | None = None) -> argparse.Namespace:
    """Parse ``argv`` over defaults from ``base_config``, then ``--config FILE``, then the flags."""
    if base_config is not None:
        apply_config(parser, base_config)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        apply_config(parser, known.config)
    _show_defaults(parser)
    return parser.parse_args(argv)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each flag's effective default (the configs' values included) to its --help text."""
    for action in parser._actions:
        default = action.default
        if not action.help or action.help == argparse.SUPPRESS or any(default is v for v in (None, False,
                                                                                           argparse.SUPPRESS)):
            continue
        if "default" not in action.help:
            action.help += " (default: " + str(default).replace("%", "%%") + ")"
