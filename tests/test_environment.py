"""The supported stack is checked at start (one line, not a SystemError deep in an op), and the start is quiet."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import environment

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"mindspore": "2.10.0", "numpy": "1.26.4", "transformers": "5.25.0"}


def test_supported_ranges_are_those_of_requirements_txt():
    declared = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.fullmatch(r"([a-z]+)>=([\d.]+),<([\d.]+)", line.strip())
        if match:
            declared[match.group(1)] = (match.group(2), match.group(3))
    assert {name: (low, high) for name, low, high in environment.SUPPORTED} == {
        name: declared[name] for name, _, _ in environment.SUPPORTED}


@pytest.mark.parametrize("mindspore", ["2.7.0", "2.7.1.post1", "2.7.2", "2.9.0", "2.10.0", "2.10.3"])
def test_supported_versions_pass(mindspore):
    environment.check_versions({**GOOD, "mindspore": mindspore})


@pytest.mark.parametrize("name, version", [("mindspore", "2.6.0"), ("mindspore", "2.11.0"), ("numpy", "2.4.6"),
                                           ("numpy", "2.0.0rc1"), ("transformers", "4.56.2"),
                                           ("transformers", None)])
def test_unsupported_versions_stop_with_one_line(name, version):
    with pytest.raises(environment.UnsupportedEnvironment) as err:
        environment.check_versions({**GOOD, name: version})
    message = str(err.value)
    assert "\n" not in message
    assert f"{name} {version or 'not installed'}" in message
    assert "mindspore>=2.7.0,<2.11" in message and "numpy>=1.24,<2" in message
    assert f"pip install '{name}>=" in message


def test_numpy_2_stops_an_entry_script_at_start(tmp_path):
    """A numpy 2 that pip reports (a dist-info first on the path) stops the script before it touches MindSpore."""
    fake = tmp_path / "site" / "numpy-2.4.6.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 2.4.6\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"}
    result = subprocess.run([sys.executable, "-m", "pipeline.captioning.caption_colour", str(tmp_path / "x.csv")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "numpy 2.4.6" in lines[0] and "numpy>=1.24,<2" in lines[0] and "mindspore" in lines[0]


def _caption_colour(table: Path, *flags: str, env: dict | None = None) -> str:
    """The model-free captioner without --device, so it asks MindSpore whether Ascend is there."""
    result = subprocess.run([sys.executable, "-m", "pipeline.captioning.caption_colour", str(table),
                             "--output", str(table.with_name("out.csv")), "--overwrite", *flags],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_start_hides_the_ascend_probe_unless_verbose(tmp_path, monkeypatch):
    from pipeline.distributed import default_device
    from tests.video_factory import write_caption_clips

    monkeypatch.delenv(environment.VERBOSE_VARIABLE, raising=False)
    if default_device() == "Ascend":
        pytest.skip("this host has Ascend: there is no probe warning to hide")
    (tmp_path / "videos").mkdir()
    table = write_caption_clips(tmp_path / "videos")
    quiet = _caption_colour(table)
    assert "Ascend is not available" not in quiet and "loading plugin" not in quiet
    assert "INFO" in quiet  # the run's own log still shows
    assert "Ascend is not available" in _caption_colour(table, "--verbose")
    assert "Ascend is not available" in _caption_colour(table, env={environment.VERBOSE_VARIABLE: "1"})


def test_the_filter_hides_only_the_expected_notices(monkeypatch, caplog):
    monkeypatch.delenv(environment.VERBOSE_VARIABLE, raising=False)
    logger = logging.getLogger("tests.quiet")
    logger.addFilter(environment._FILTER)
    try:
        with caplog.at_level(logging.WARNING, logger="tests.quiet"):
            logger.warning("Backend Ascend is not available.")
            logger.warning("PyTorch was not found. Models won't be available and only tokenizers ...")
            logger.warning("For 'Add', the input is deprecated")
            logger.error("Device Ascend is not available; out of memory")  # an error that mentions it is kept
        assert [r.getMessage() for r in caplog.records] == ["For 'Add', the input is deprecated",
                                                            "Device Ascend is not available; out of memory"]
    finally:
        logger.removeFilter(environment._FILTER)
