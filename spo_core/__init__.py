"""SPO: step-aware preference optimisation for text-to-image diffusion models."""

from . import library_logs

library_logs.install()
