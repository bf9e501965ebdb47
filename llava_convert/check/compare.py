"""Comparing the two sides of `check` for one image: the stage table (prompt ids, pixel values, vision
features, projector, image merge, embeddings, each decoder layer, final norm, logits), the logit figures, and
for the first stage beyond tolerance a hint naming the mistake that fits (an alternative the original side
computed matches the converted output)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..authors.templates import CONV_TEMPLATES, authors_prompt
from ..reference import ImageStages
from ..reference_next import HINTS as NEXT_HINTS
from .converted import ConvertedRun, collapse_image_tokens
from .original import OriginalRun
from .report import ImageReport, StageDiff, Thresholds


def _diff(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    ref, got = ref.float(), got.float()
    d = (ref - got).abs()
    denom = float(ref.pow(2).sum())
    nmse = (
        float((ref - got).pow(2).sum()) / denom
        if denom > 0
        else (0.0 if float(d.max()) == 0 else float("inf"))
    )
    return float(d.max()), float(d.mean()), nmse


class _Stages:
    """Builds the stage table for one image."""

    def __init__(self, thresholds: Thresholds):
        self.t = thresholds
        self.rows: list[StageDiff] = []
        self.hints: dict[str, str] = {}

    def tol(self, ref: torch.Tensor) -> float | None:
        if self.t.atol is None:
            return None
        return self.t.atol + self.t.rtol * float(ref.float().abs().max()) if ref.numel() else self.t.atol

    def close(self, ref: torch.Tensor, got: torch.Tensor) -> bool:
        """Within this stage's tolerance (used to match alternatives too)."""
        if ref.shape != got.shape:
            return False
        mx, _, nmse = _diff(ref, got)
        if self.t.atol is None:
            return nmse <= (self.t.stage_nmse or 0.0)
        return mx <= (self.tol(ref) or 0.0)

    def add(
        self,
        stage: str,
        ref: torch.Tensor | None,
        got: torch.Tensor | None,
        hint: Callable[[], str | None] | None = None,
        note: str = "",
    ) -> StageDiff:
        if ref is None or got is None:
            row = StageDiff(stage, ok=False, note=note or "not produced by the converted model")
        elif ref.shape != got.shape:
            row = StageDiff(stage, ok=False, note=f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        else:
            mx, mean, nmse = _diff(ref, got)
            tol = self.tol(ref)
            ok = mx <= tol if tol is not None else nmse <= (self.t.stage_nmse or 0.0)
            row = StageDiff(stage, ok, mx, mean, nmse, tol, note)
        self.rows.append(row)
        if not row.ok and hint is not None:
            h = hint()
            if h:
                self.hints[stage] = h
        return row

    def first(self) -> tuple[str | None, str | None]:
        for r in self.rows:
            if not r.ok:
                return r.stage, self.hints.get(r.stage)
        return None, None


def compare(
    name: str,
    size: tuple[int, int],
    orig: OriginalRun,
    conv: ConvertedRun,
    thresholds: Thresholds,
    vocab: int,
    question: str,
    anyres: bool,
) -> ImageReport:
    """Figures and the stage table for one image, stage by stage in the order the model runs them."""
    st = _Stages(thresholds)
    rep = _prompt_ids(st, name, size, orig, conv, question)
    rep.pixel_max_diff = _pixel_values(st, orig, conv, anyres)
    if conv.error is None or conv.vision_features is not None:  # the vision stages may run before a failure
        _vision_stages(st, orig.stages, conv)
    rep.generated_original = orig.generated
    if conv.error:
        rep.error = conv.error
        st.rows.append(StageDiff("converted forward", ok=False, note=conv.error))
        st.hints["converted forward"] = "the converted model raised instead of running"
    else:
        aligned = _align(orig, conv)
        if anyres:
            _merge_stage(st, orig.stages, conv)
        if aligned is not None:
            lo, lc = _language_model_stages(st, orig, conv, aligned, vocab)
            _logit_figures(rep, lo, lc)
            rep.positions = len(aligned.orig)
        else:
            st.rows.append(StageDiff("embeddings", False, note="the sequences cannot be aligned"))
        rep.generated_converted = conv.generated
    rep.stages = st.rows
    rep.first_divergence, rep.hint = st.first()
    return rep


def _prompt_ids(
    st: _Stages, name: str, size: tuple[int, int], orig: OriginalRun, conv: ConvertedRun, question: str
) -> ImageReport:
    """The report for one image, opened with the prompt-id comparison (the image counted once)."""
    conv_text = collapse_image_tokens(conv.input_ids, conv.image_token_id)
    ids_match = conv_text == orig.input_ids
    rep = ImageReport(
        name,
        size,
        ids_match,
        (len(orig.input_ids), len(conv_text)),
        (orig.image_tokens, conv.image_tokens),
        None,
    )
    st.rows.append(StageDiff("prompt ids", ids_match))
    if not ids_match:
        st.hints["prompt ids"] = _bos_hint(orig.input_ids, conv_text) or _template_hint(conv, question)
        rep.notes.append("the figures below are computed on the authors' prompt ids")
    return rep


def _bos_hint(original: list[int], converted: list[int]) -> str | None:
    """The converted prompt lacks the second of the authors' two BOS (llava_llama_3)."""
    if len(original) >= 2 and original[0] == original[1] and converted == original[1:]:
        return (
            "prompt ids differ: one BOS where the authors have two (llava_llama_3: the rendered prompt starts "
            "with <|begin_of_text|> and the Llama-3 tokenizer adds its own); the converted chat template must "
            "reproduce the double BOS"
        )
    return None


def _template_hint(conv: ConvertedRun, question: str) -> str:
    if conv.prompt_error is not None:
        return f"prompt ids differ: the converted processor has no usable chat template ({conv.prompt_error})"
    for mode in CONV_TEMPLATES:
        if authors_prompt(question, mode) == conv.prompt:
            return f"prompt ids differ: wrong chat template? (the converted template renders the authors' {mode!r})"
    return "prompt ids differ: wrong chat template?"


def _pixel_values(st: _Stages, orig: OriginalRun, conv: ConvertedRun, anyres: bool) -> float | None:
    """The pixel_values row (tiles compared as a flat batch); returns the max abs diff when shapes agree."""
    t = st.t
    o_pv, c_pv = orig.stages.pixel_values, conv.pixel_values
    o_flat = o_pv.reshape(-1, *o_pv.shape[-3:])
    c_flat = c_pv.reshape(-1, *c_pv.shape[-3:])
    if c_pv.ndim == 5 and o_pv.ndim == 5:
        c_flat = c_flat[: o_flat.shape[0]] if c_flat.shape[0] >= o_flat.shape[0] else c_flat
    pix = StageDiff("pixel_values", ok=False)
    max_diff = None
    if o_flat.shape == c_flat.shape:
        mx, mean, nmse = _diff(o_flat, c_flat)
        max_diff = mx
        pix = StageDiff("pixel_values", mx <= t.pixel_atol, mx, mean, nmse, t.pixel_atol)
    else:
        pix.note = f"shape {tuple(c_flat.shape)}, expected {tuple(o_flat.shape)}"
    st.rows.append(pix)
    if not pix.ok:
        st.hints["pixel_values"] = _pixel_hint(orig, c_flat, t, anyres)
    return max_diff


def _vision_stages(st: _Stages, s: ImageStages, conv: ConvertedRun) -> None:
    st.add(
        "vision tower (features)",
        s.vision_features,
        conv.vision_features,
        lambda: _vision_hint(s, conv.vision_features, st),
    )
    st.add(
        "projector",
        s.image_features,
        conv.image_features,
        lambda: _projector_hint(s, conv.image_features, st),
    )


@dataclass(frozen=True)
class _Alignment:
    """Positions compared in the language model: text before the image, the image (when both sides have as
    many image tokens), text after it."""

    orig: torch.Tensor  # indices into the original's sequence
    conv: torch.Tensor  # the matching indices into the converted one
    note: str  # why image positions are left out, if they are


def _align(orig: OriginalRun, conv: ConvertedRun) -> _Alignment | None:
    """None when the text around the image differs in length (the sequences cannot be aligned)."""
    if conv.inputs_embeds is None:
        return None
    o_len, c_len = orig.inputs_embeds.shape[0], conv.inputs_embeds.shape[0]
    pre = orig.image_pos
    o_suf = o_len - pre - orig.image_tokens
    c_suf = c_len - conv.image_pos - conv.image_tokens
    if not (pre == conv.image_pos and o_suf == c_suf):
        return None
    same_image = orig.image_tokens == conv.image_tokens
    o_idx = list(range(pre)) + (list(range(pre, pre + orig.image_tokens)) if same_image else [])
    c_idx = list(range(pre)) + (list(range(pre, pre + conv.image_tokens)) if same_image else [])
    o_idx += list(range(pre + orig.image_tokens, o_len))
    c_idx += list(range(conv.image_pos + conv.image_tokens, c_len))
    note = (
        "" if same_image else f"image tokens {conv.image_tokens} vs {orig.image_tokens}: text positions only"
    )
    return _Alignment(torch.tensor(o_idx, dtype=torch.long), torch.tensor(c_idx, dtype=torch.long), note)


def _merge_stage(st: _Stages, s: ImageStages, conv: ConvertedRun) -> None:
    """anyres: the image features as spliced into the sequence (unpadded tiles and image_newline rows)."""
    got = (
        conv.inputs_embeds[conv.image_pos : conv.image_pos + conv.image_tokens]
        if conv.inputs_embeds is not None
        else None
    )
    st.add("image merge (unpad + newline)", s.merged, got, lambda: _merge_hint(s, got))


def _language_model_stages(
    st: _Stages, orig: OriginalRun, conv: ConvertedRun, al: _Alignment, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings, each decoder layer, final norm and logits at the aligned positions; returns both sides'
    logits there (the converted one cut to the original vocabulary)."""
    oi, ci, note = al.orig, al.conv, al.note
    quant = st.t.quantized

    def lm_hint(text: str) -> Callable[[], str]:
        if quant:
            return lambda: "quantization error exceeds the stage threshold from here on (a lighter quantization?)"
        return lambda: text

    st.add(
        "embeddings",
        orig.inputs_embeds[oi],
        conv.inputs_embeds[ci],
        lm_hint("text embeddings differ (embed_tokens rows or the image token's position?)"),
        note=note,
    )
    for i, (lo, lc) in enumerate(zip(orig.layers, conv.layers, strict=False)):
        st.add(
            f"decoder layer {i}",
            lo[oi],
            lc[ci],
            lm_hint(f"decoder layer {i} weights differ (corrupted, misordered or mis-mapped layer?)"),
            note=note,
        )
    if len(conv.layers) != len(orig.layers):
        st.rows.append(
            StageDiff("decoder layers", False, note=f"{len(conv.layers)} layers, expected {len(orig.layers)}")
        )
    st.add("final norm", orig.norm[oi], conv.norm[ci], lm_hint("final norm weight differs?"), note=note)
    lo_, lc_ = orig.logits[oi], conv.logits[ci][:, :vocab]
    st.add("logits", lo_, lc_, lm_hint("lm_head differs (tied or padded vocabulary rows?)"), note=note)
    return lo_, lc_


def _logit_figures(rep: ImageReport, lo: torch.Tensor, lc: torch.Tensor) -> None:
    """Max / mean abs diff, NMSE, KL(original || converted) and top-1 agreement over the compared positions."""
    rep.logits_max_abs, rep.logits_mean_abs, rep.logits_nmse = _diff(lo, lc)
    lp_o = torch.log_softmax(lo.double(), -1)
    lp_c = torch.log_softmax(lc.double(), -1)
    rep.kl = float((lp_o.exp() * (lp_o - lp_c)).sum(-1).mean())
    rep.top1 = float((lo.argmax(-1) == lc.argmax(-1)).float().mean())


def _pixel_hint(orig: OriginalRun, c_flat: torch.Tensor, t: Thresholds, anyres: bool) -> str:
    alt = orig.stages.alternatives
    for key, text in (
        (
            "pixel_values:crop",
            "pixel_values differ: pad vs centre-crop? (the converted processor centre-crops; "
            "the authors pad to a square with the mean colour: do_pad)",
        ),
        (
            "pixel_values:pad",
            "pixel_values differ: pad vs centre-crop? (the converted processor pads; the authors "
            "resize and centre-crop)",
        ),
    ):
        a = alt.get(key)
        if a is not None:
            a = a.reshape(-1, *a.shape[-3:])
            if a.shape == c_flat.shape and float((a - c_flat).abs().max()) <= t.pixel_atol:
                return text
    hint = _next_hint(alt, "pixel_values:", c_flat, lambda a, b: float((a - b).abs().max()) <= t.pixel_atol)
    if hint:
        return hint
    transposed = alt.get("pixel_values:pinpoints_hw")
    if transposed is not None:
        transposed = transposed.reshape(-1, *transposed.shape[-3:])
        if transposed.shape == c_flat.shape and float((transposed - c_flat).abs().max()) <= t.pixel_atol:
            return (
                "pixel_values differ: the transposed anyres grid; image_grid_pinpoints were copied as the authors "
                "wrote them, but the authors read each pair as (width, height) and transformers as (height, "
                "width), so where candidates tie (an image no larger than the tower) another grid wins; "
                "convert again with this llava-convert, which writes the pairs swapped"
            )
    if anyres and c_flat.shape[0] != orig.stages.pixel_values.reshape(-1, *c_flat.shape[-3:]).shape[0]:
        return "pixel_values differ: a different anyres grid (image_grid_pinpoints?)"
    return "pixel_values differ: image processor settings (size, crop, resample, mean/std, do_pad)?"


def _vision_hint(s: ImageStages, got: torch.Tensor | None, st: _Stages) -> str | None:
    if got is None:
        return None
    ref = s.vision_features
    if got.shape != ref.shape:
        if got.shape[:1] == ref.shape[:1] and abs(got.shape[1] - ref.shape[1]) == 1:
            return "vision_feature_select_strategy differs (CLS token kept vs dropped)?"
        return "vision features have another shape (tower config or crops differ)"
    for i, feats in s.vision_hidden_states.items():
        if i != s.select_layer and st.close(feats, got):
            return (
                f"vision_feature_layer off by one? (the converted features are the authors' "
                f"hidden_states[{i - s.num_hidden_states}], not [{s.select_layer - s.num_hidden_states}])"
            )
    hint = _next_hint(s.alternatives, "vision:", got, st.close)
    if hint:
        return hint
    if "vision:stock" in s.alternatives and st.close(s.alternatives["vision:stock"], got):
        return "stock CLIP instead of the checkpoint's fine-tuned tower?"
    if "vision:stray" in s.alternatives and st.close(s.alternatives["vision:stray"], got):
        return "the checkpoint's unused vision_tower.* weights instead of the tower directory's?"
    return "vision tower weights or config differ"


def _projector_hint(s: ImageStages, got: torch.Tensor | None, st: _Stages) -> str | None:
    if got is None:
        return None
    for key, text in (
        ("projector:swapped", "projector layers swapped?"),
        ("projector:no_activation", "projector activation missing (projector_hidden_act)?"),
        ("projector:gelu", "GELU applied to a linear projector (projector_hidden_act should be linear)?"),
    ):
        a = s.alternatives.get(key)
        if a is not None and st.close(a, got):
            return text
    return "projector weights differ (linear_1/linear_2 mapping?)"


def _next_hint(alternatives: dict, stage: str, got: torch.Tensor, close: Callable) -> str | None:
    """The LLaVA-NeXT families' known mistakes (`reference_next.HINTS`) that the converted STAGE output matches."""
    for key, text in NEXT_HINTS.items():
        a = alternatives.get(key)
        if not key.startswith(stage) or a is None:
            continue
        if stage == "pixel_values:":  # as `_pixel_values` does: the converted crops cut to the original's count
            a = a.reshape(-1, *a.shape[-3:])[: got.shape[0]]
        if a.shape == got.shape and close(a, got):
            return text
    return None


def _merge_hint(s: ImageStages, got: torch.Tensor | None) -> str | None:
    if got is None:
        return None
    hint = _next_hint(s.alternatives, "merge:", got, lambda a, b: float((a.float() - b.float()).abs().max()) <= 1e-3)
    if hint:
        return hint
    if got.shape != s.merged.shape:
        return "a different number of image features (anyres grid or unpadding: image_grid_pinpoints?)"
    rows = s.newline_rows
    diff = (s.merged.float() - got.float()).abs().amax(-1)
    if rows.any() and (~rows).any() and float(diff[~rows].max()) <= 1e-3 * float(diff[rows].max()):
        return "image_newline differs?"
    return "image features merged differently (unpad / tile order)?"

