"""The installed stack: the versions this project supports, checked before anything runs, and a quiet start.

A MindSpore outside the tested range, or numpy 2 (MindSpore's wheels are built against numpy 1.x), fails deep
inside an op with a SystemError; checking the installed versions first turns that into one line that says what
to install. On a host without Ascend, MindSpore's Ascend probe and transformers' "PyTorch was not found" notice
print warnings that read like errors but are expected here: they are hidden unless ``MSCAPTION_VERBOSE=1``
(or an entry script's ``--verbose``) asks for everything. Other warnings and errors always pass.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import re
from importlib import metadata
from typing import Iterator

# (package, lowest supported, first unsupported): the same bounds as requirements.txt (a test checks they agree)
SUPPORTED = (
    ("mindspore", "2.7.0", "2.11"),
    ("numpy", "1.24", "2"),
    ("transformers", "5.2", "6"),
)
VERBOSE_VARIABLE = "MSCAPTION_VERBOSE"

# Expected on hosts without Ascend or without torch; nothing the user can act on.
_EXPECTED_NOISE = re.compile(
    r"(Backend|Device) Ascend is not available"
    r"|error when loading plugin for MindSpore"
    r"|PyTorch was not found\. Models won't be available"
)


class UnsupportedEnvironment(RuntimeError):
    """An installed package is outside the supported range; the message is one line."""


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: '2.7.1.post1' -> (2, 7, 1), '5.25.0.dev0' -> (5, 25, 0)."""
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    return tuple(parts)


def installed_versions() -> dict[str, str | None]:
    """The installed version of each package in SUPPORTED (None when it is not installed)."""
    found = {}
    for name, _, _ in SUPPORTED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_versions(installed: dict[str, str | None] | None = None) -> None:
    """Raise UnsupportedEnvironment naming every installed version and the supported ranges, if any is outside."""
    installed = installed_versions() if installed is None else installed
    bad = [name for name, low, high in SUPPORTED
           if installed.get(name) is None
           or not _release(low) <= _release(installed[name]) < _release(high)]
    if not bad:
        return
    ranges = ", ".join(f"{name}>={low},<{high}" for name, low, high in SUPPORTED)
    found = ", ".join(f"{name} {installed.get(name) or 'not installed'}" for name, _, _ in SUPPORTED)
    pins = " ".join(f"'{name}>={low},<{high}'" for name, low, high in SUPPORTED if name in bad)
    raise UnsupportedEnvironment(f"unsupported environment: installed {found}; supported {ranges}. "
                                 f"Fix it with: pip install {pins} (or pip install -r requirements.txt)")


def verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE, "").lower() not in ("", "0", "false", "no")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show everything, including MindSpore's 'Ascend is not available' warnings on hosts "
                             f"without Ascend (hidden by default); {VERBOSE_VARIABLE}=1 does the same for any "
                             "command, and also shows transformers' notice that PyTorch is not installed")


def set_verbose(on: bool) -> None:
    """``--verbose``: show the expected start-up notices too, for this process and the ones it starts."""
    if on:
        os.environ[VERBOSE_VARIABLE] = "1"


class _ExpectedNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        expected = record.levelno <= logging.WARNING and _EXPECTED_NOISE.search(record.getMessage())
        return verbose() or not expected


_FILTER = _ExpectedNoiseFilter()


def quiet_start() -> None:
    """Hide transformers' no-PyTorch notice (emitted when it is imported); call before importing it."""
    logger = logging.getLogger("transformers")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


@contextlib.contextmanager
def quiet_device_probe() -> Iterator[None]:
    """Hide MindSpore's 'Ascend is not available' warnings while asking whether Ascend is available, on a host
    without NPU devices; where there are some, the plugin's load error is the reason the run falls back to CPU."""
    if glob.glob("/dev/davinci[0-9]*"):
        yield
        return
    # MindSpore logs through one logger per process, named after the process id (mindspore/log.py)
    logger = logging.getLogger(f"ME.mindspore.log.{os.getpid()}")
    logger.addFilter(_FILTER)
    try:
        yield
    finally:
        logger.removeFilter(_FILTER)
