"""`check`: run an original checkpoint (the authors' forward pass, `reference.py`) and its conversion
(transformers 5) on the same images and prompt, and compare them stage by stage.

The two models are never resident together: the original runs first, its stage outputs are kept, it is freed,
then the converted model runs. Figures: logits max/mean abs diff and NMSE over the original vocabulary,
KL(original || converted), top-1 agreement, greedy generation, pixel_values and prompt-id agreement. Stage
localisation names the first stage (prompt ids, pixel values, vision features, projector, merge, embeddings,
each decoder layer, final norm, logits) beyond tolerance, with a hint where a known mistake fits.

Modules: `options` (CheckOptions), `original` (the authors' side), `converted` (the transformers side),
`compare` (stage table and hints), `report` (thresholds, report, verdict), `run` (check()).
"""

from .converted import PromptError
from .options import CheckOptions
from .report import CheckReport
from .run import check

__all__ = ["CheckOptions", "CheckReport", "PromptError", "check"]
