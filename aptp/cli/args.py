"""Argument types and helpers that several subcommands share."""

from __future__ import annotations

import argparse
import sys


def _int_at_least(text: str, low: int, kind: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "non-negative")


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {value}")
    return value


def load_pipeline(command: str, path: str, device: str, dtype=None):
    """A bundle, teacher or diffusers folder, or None after printing why it cannot be loaded (a path that is none of
    them is answered before the model libraries are imported)."""
    from aptp.formats.kinds import folder_kind, not_a_model_folder

    if folder_kind(path) is None:
        print(f"aptp {command}: error: {not_a_model_folder(path)}", file=sys.stderr)
        return None
    from aptp.formats.files import ModelFileError
    from aptp.pipeline import RoutedPipeline

    try:
        return RoutedPipeline.load(path, device=device, dtype=dtype)
    except ModelFileError as e:
        print(f"aptp {command}: error: {e}", file=sys.stderr)
        return None
