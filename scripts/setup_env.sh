#!/usr/bin/env bash
# Create .venv (if needed) and install the project into it; sourced by the two README commands.
# Usage: [VENV=dir] [PIP_EXTRA='pkg==x'] source scripts/setup_env.sh [requirements file]
# VENV picks another environment folder and PIP_EXTRA adds requirements (tests/run_oldest.sh: MindSpore 2.7.0).
set -euo pipefail
if ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ffmpeg (apt) for video encoding/decoding tools"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "note: ffmpeg not found; tests that generate videos with it are skipped (apt-get install ffmpeg)"
  fi
fi
# The test requirements include the web page test, which drives Debian's chromium (no browser download).
if [ "${1:-requirements.txt}" = requirements-test.txt ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (apt) for the web page test"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium not found; the web page test is skipped (apt-get install chromium)"
  fi
fi
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
# shellcheck disable=SC2086
python -m pip install -q -r "${1:-requirements.txt}" ${PIP_EXTRA:-} -e .
