"""Quiet transformers while we drive it: its warnings about the authors' config keys, torchvision fallbacks
and load progress bars are noise in a converter's or checker's output."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from transformers.utils import logging as hf_logging


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Python warnings and transformers' logging/progress bars (restored on exit): transformers warns
    about the authors' config keys and draws load bars, none of which a check report needs."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
