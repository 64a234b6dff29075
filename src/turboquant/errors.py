"""Errors a user can hit: each names the problem and the fix, and renders as one line."""

from __future__ import annotations

from typing import Iterable


class TurboQuantError(Exception):
    """A bad input or a refused operation, with the fix a user should apply.

    The CLI prints ``str(error)`` as a single line and exits non-zero; the API raises it as is.
    """

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(f"{self.problem}. Fix: {self.fix}.")


class ConfigError(TurboQuantError, ValueError):
    """A method config, scheme or plan that cannot be valid."""


class ModelLoadError(TurboQuantError):
    """A checkpoint that cannot be read safely or is of an unsupported kind."""


class DataError(TurboQuantError):
    """Evaluation or calibration data that cannot be used."""


class OutputError(TurboQuantError):
    """An output location that cannot be written."""


class PublishError(TurboQuantError):
    """An artifact that may not be published (not approved, changed since export) or a Hub that refused it."""


class ProvenanceError(TurboQuantError):
    """An input whose recorded version cannot be found or verified, or a DVC command that failed."""


def check_keys(given: Iterable[str], allowed: Iterable[str], problem: str, fix: str | None = None) -> None:
    """Refuse keys outside ``allowed`` — the one strict-keys check of plans, configs, schemes, gates, watch lists
    and format options. ``problem`` names the place, with ``{unknown}`` where the offending keys go; the fix lists
    the allowed keys unless ``fix`` says otherwise."""
    allowed = sorted(allowed)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(problem.format(unknown=", ".join(map(str, unknown))),
                          fix or f"use only: {', '.join(allowed) or 'none'}")


def first_line(e: BaseException) -> str:
    """The first line of a third-party exception's text (its type name when empty), to quote inside our own."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
