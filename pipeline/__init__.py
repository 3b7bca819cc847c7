"""Video captioning pipeline: datasets, the captioning runner, training and evaluation."""
import sys

from pipeline import environment

try:
    environment.check_versions()
except environment.UnsupportedEnvironment as exc:
    sys.exit(f"error: {exc}")
environment.quiet_start()
