"""llava_convert.quant: byte equality with bitsandbytes' CPU backend, the config, and loading.

bitsandbytes is the reference for every byte: 4-bit = ``functional.quantize_4bit`` +
``QuantState.as_dict(packed=True)`` (what ``Linear4bit`` saves), int8 = ``Int8Params`` moved to the
CPU (what ``Linear8bitLt`` saves and what transformers' ``Bnb8bitQuantize`` does).
"""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds  # noqa: E402

from llava_convert import quant as Q  # noqa: E402
from llava_convert.layouts import to_legacy  # noqa: E402
from llava_convert.quant import quantize_weight  # noqa: E402
from llava_convert.quantize import (  # noqa: E402
    QUANT_TYPES,
    bnb_quantization_config,
    expand_skip_modules,
    module_is_skipped,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FOUR_BIT = ("nf4", "fp4")


# ------------------------------------------------------------------------------------------------
# references and comparison
# ------------------------------------------------------------------------------------------------


def bnb_4bit(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> dict[str, torch.Tensor]:
    q, state = F.quantize_4bit(
        w.clone(), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    out = {"weight": q}
    out.update({"weight." + k: v for k, v in state.as_dict(packed=True).items()})
    return out


def bnb_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    lin = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False)
    lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    return dict(lin.to("cpu").state_dict())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_identical(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(ref)
    for k in ref:
        a, b = ours[k], ref[k]
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), k
        if not torch.equal(_bits(a), _bits(b)):
            bad = (_bits(a) != _bits(b)).nonzero().view(-1)[:8].tolist()
            raise AssertionError(f"{k}: bytes differ at {bad}")


def randw(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", FOUR_BIT)
def test_tables_are_bitsandbytes_tables(quant_type):
    tables = Q._fourbit_tables(quant_type)
    assert torch.equal(_bits(tables.code), _bits(F.get_4bit_type(quant_type, device="cpu")))
    bounds, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    assert torch.equal(_bits(tables.bounds), _bits(bounds))
    assert torch.equal(tables.order, order)
    assert torch.equal(_bits(Q._create_dynamic_map()), _bits(F.create_dynamic_map()))


# ------------------------------------------------------------------------------------------------
# 4-bit byte equality
# ------------------------------------------------------------------------------------------------

# (64, 96): whole blocks; (37, 53): 1961 elements, a partial tail block and an odd count;
# (3, 700): a tail for every blocksize; (1, 5): smaller than one block.
SHAPES = ((64, 96), (37, 53), (3, 700), (1, 5))


@pytest.mark.parametrize(
    "quant_type,double_quant,blocksize,dtype",
    list(itertools.product(FOUR_BIT, (False, True), (32, 64, 256, 4096), DTYPES)),
)
def test_4bit_matches_bitsandbytes(quant_type, double_quant, blocksize, dtype):
    for i, shape in enumerate(SHAPES):
        w = randw(shape, dtype, seed=i)
        w.view(-1)[::11] = 0  # exact zeros everywhere
        ref = bnb_4bit(w, quant_type, blocksize, double_quant)
        # Small chunks so several work items (and the thread pool) are exercised.
        assert_identical(
            quantize_weight(
                w,
                quant_type=quant_type,
                blocksize=blocksize,
                double_quant=double_quant,
                chunk_elements=blocksize * 3,
            ),
            ref,
        )


def adversarial(quant_type: str, dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    """Blocks whose absmax is exactly 1, so the scaled values are the chosen float32 values."""
    bounds, _ = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    code = F.get_4bit_type(quant_type, device="cpu")
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    vals = torch.cat(
        [
            bounds,  # exact midpoints: bitsandbytes takes the lower code
            torch.nextafter(bounds, up),
            torch.nextafter(bounds, down),
            code,
            torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45, -1e-45, 0.5, -0.5]),
        ]
    )
    blocks = []
    for i in range(0, len(vals), blocksize - 1):
        blk = torch.zeros(blocksize)
        blk[0] = 1.0
        part = vals[i : i + blocksize - 1]
        blk[1 : 1 + len(part)] = part
        blocks.append(blk)
    big = torch.finfo(dtype).max
    specials = [
        torch.zeros(blocksize),  # all-zero block: absmax 0
        -torch.zeros(blocksize),  # all -0.0
        torch.tensor([0.0, -3.0, 3.0] + [1.0] * (blocksize - 3)),  # +-absmax ties
        torch.full((blocksize,), big) * torch.linspace(-1, 1, blocksize),  # largest finite values
        torch.full((blocksize,), float(torch.finfo(dtype).smallest_normal) / 4),  # subnormals
        torch.cat([torch.tensor([float("inf")]), torch.randn(blocksize - 1)]),  # inf -> NaN scale
        torch.cat([torch.tensor([-float("inf")]), torch.zeros(blocksize - 1)]),
    ]
    # For float16/bfloat16 the cast rounds the float32 midpoints (exact ties are a float32 case), but
    # the neighbours, zeros, extremes and subnormals remain.
    return torch.cat(blocks + specials).to(dtype)


@pytest.mark.parametrize(
    "quant_type,double_quant,dtype", list(itertools.product(FOUR_BIT, (False, True), DTYPES))
)
def test_4bit_adversarial_values(quant_type, double_quant, dtype):
    for blocksize in (32, 64):
        base = adversarial(quant_type, dtype, blocksize)
        tails = (
            torch.empty(0, dtype=dtype),
            torch.zeros(1, dtype=dtype),  # odd count, all-zero tail: absmax stored as 1e-38
            torch.zeros(5, dtype=dtype),
            torch.tensor([0.25, -0.5, 0.0], dtype=dtype),  # tail whose values hit codes exactly
            randw((blocksize // 2 + 1,), dtype, seed=3, std=0.1),
        )
        for tail in tails:
            w = torch.cat([base, tail])
            ref = bnb_4bit(w, quant_type, blocksize, double_quant)
            ours = quantize_weight(
                w,
                quant_type=quant_type,
                blocksize=blocksize,
                double_quant=double_quant,
                chunk_elements=blocksize * 2,
            )
            assert_identical(ours, ref)


@pytest.mark.parametrize("quant_type", FOUR_BIT)
def test_4bit_nan_codes(quant_type):
    """NaN blocks: same codes, and absmax NaN wherever bitsandbytes has it (bits may differ, see
    the module docstring; for bfloat16 and float32 they are exact)."""
    for dtype in DTYPES:
        w = randw((8, 64), dtype, seed=5)
        w[2, 7] = float("nan")
        w[5] = float("nan")
        ref = bnb_4bit(w, quant_type, 64, False)
        ours = quantize_weight(w, quant_type=quant_type, blocksize=64, double_quant=False)
        assert torch.equal(ours["weight"], ref["weight"])
        assert torch.equal(torch.isnan(ours["weight.absmax"]), torch.isnan(ref["weight.absmax"]))
        if dtype != torch.float16:
            assert_identical(ours, ref)


def test_4bit_larger_than_chunk_and_thread_counts():
    """A tensor spanning many default-size chunks, with a tail, across thread counts.

    With more than 32768 blocks torch splits the float32 mean over threads, so bitsandbytes' own
    double-quant offset depends on ``torch.get_num_threads()``; we must match it under each setting.
    """
    w = randw((1031, 2050), torch.float16, seed=7)  # 2.11M elements (> 2 default chunks), 66K blocks of 32
    assert w.numel() > 2 * Q.DEFAULT_CHUNK_ELEMENTS and w.numel() % 32 != 0
    prev = torch.get_num_threads()
    try:
        for n in sorted({1, 2, prev}):
            torch.set_num_threads(n)
            ref = bnb_4bit(w, "nf4", 32, True)
            for threads in (1, 2, 3):
                ours = quantize_weight(w, quant_type="nf4", blocksize=32, double_quant=True, threads=threads)
                assert_identical(ours, ref)
                assert torch.get_num_threads() == n  # restored
    finally:
        torch.set_num_threads(prev)


def test_nested_quantization_matches_c_kernel():
    """The double-quant step emulates bitsandbytes' C LUT kernel; probe it where rounding is tight."""
    import numpy as np

    i = np.arange(65536, dtype=np.float32)
    grid = np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(65535.0)  # LUT sample points
    k = np.arange(1, 65536, dtype=np.float64)
    edges = ((k - 0.5) * 2 / 65535 - 1).astype(np.float32)  # where trunc(t) changes
    code = F.create_dynamic_map().numpy()
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    vals = np.concatenate(
        [
            grid,
            edges,
            np.nextafter(edges, 2),
            np.nextafter(edges, -2),
            mids,
            np.nextafter(mids, 2),
            np.nextafter(mids, -2),
        ]
    ).astype(np.float32)
    vals = torch.from_numpy(np.clip(vals, -1, 1))
    x = torch.cat([torch.cat([torch.tensor([1.0]), b]) for b in vals.split(255)])  # absmax exactly 1
    special = torch.randn(256 * 5)
    special[:256] = 0.0
    special[256:512] = -0.0
    special[600] = float("nan")
    special[800] = float("inf")
    special[1000] = -float("inf")
    special[1100:1280] = float("nan")
    for data in (x, special, torch.randn(100_003) * 1e-3, torch.rand(257) - 0.5):
        q, state = F.quantize_blockwise(data.clone(), blocksize=256)
        codes, absmax = Q._quantize_blockwise_dynamic(data)
        assert torch.equal(codes, q)
        assert torch.equal(_bits(absmax), _bits(state.absmax))


def test_4bit_format_is_what_linear4bit_saves():
    """Same keys, dtypes, shapes and bytes as a bitsandbytes Linear4bit's state_dict on the CPU."""
    w = randw((48, 96), torch.bfloat16, seed=11)
    for quant_type, dq in itertools.product(FOUR_BIT, (False, True)):
        lin = bnb.nn.Linear4bit(
            96, 48, bias=False, compute_dtype=torch.float32, compress_statistics=dq, quant_type=quant_type
        )
        lin.weight = bnb.nn.Params4bit(
            w.clone(), requires_grad=False, compress_statistics=dq, quant_type=quant_type
        )
        lin = lin.to("cpu")
        sd = {k: v for k, v in lin.state_dict().items()}
        ours = quantize_weight(w, quant_type=quant_type, double_quant=dq)
        assert_identical(ours, sd)
        meta = json.loads(bytes(ours[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
        assert meta["shape"] == [48, 96] and meta["dtype"] == "bfloat16" and meta["blocksize"] == 64
        assert ours["weight"].shape == (48 * 96 // 2, 1)
        if dq:
            assert ours["weight.absmax"].dtype == torch.uint8 and meta["nested_blocksize"] == 256
        else:
            assert ours["weight.absmax"].dtype == torch.float32 and "nested_offset" not in meta


def test_4bit_non_contiguous_and_3d():
    w = randw((96, 64), torch.float16, seed=2).t()  # non-contiguous view
    assert_identical(quantize_weight(w, quant_type="nf4"), bnb_4bit(w.contiguous(), "nf4", 64, True))
    w3 = randw((4, 10, 33), torch.float32, seed=3)
    assert_identical(
        quantize_weight(w3, quant_type="fp4", double_quant=False), bnb_4bit(w3, "fp4", 64, False)
    )


# ------------------------------------------------------------------------------------------------
# int8
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_matches_bitsandbytes(dtype):
    for i, shape in enumerate(((64, 96), (37, 53), (300, 1000), (1, 7), (5, 1))):
        w = randw(shape, dtype, seed=i, std=0.05)
        if shape[0] >= 5:
            w[1] = 0.0  # zero row: 127/0 -> inf, 0*inf -> NaN -> int8 0
            w[2] = -0.0
            w[3, 0] = 70000.0 if dtype != torch.float16 else float("inf")  # inf once cast to float16
            w[4, :] = 1.0  # ties at exactly 127
        ref = bnb_int8(w)
        assert_identical(quantize_weight(w, quant_type="int8", chunk_elements=150), ref)
        assert_identical(quantize_weight(w, quant_type="int8"), ref)
        # The functional form bitsandbytes documents gives the same tensors.
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        assert torch.equal(ref["weight"], cb) and torch.equal(_bits(ref["SCB"]), _bits(scb))
    out = quantize_weight(randw((4, 8), dtype), quant_type="int8")
    assert (
        out["weight_format"].shape == ()
        and out["weight_format"].dtype == torch.uint8
        and out["weight_format"].item() == 0
    )


def test_int8_larger_than_chunk():
    w = randw((700, 3000), torch.bfloat16, seed=4)
    ref = bnb_int8(w)
    for threads in (1, 2):
        assert_identical(quantize_weight(w, quant_type="int8", threads=threads, chunk_elements=1 << 18), ref)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_errors():
    w = randw((8, 64), torch.float16)
    with pytest.raises(ValueError, match="unknown quant_type 'int4'"):
        quantize_weight(w, quant_type="int4")
    for bs in (16, 100, 8192, 0, -64):
        with pytest.raises(ValueError, match=f"unsupported blocksize {bs}"):
            quantize_weight(w, quant_type="nf4", blocksize=bs)
    # bitsandbytes rejects the same blocksizes
    with pytest.raises(ValueError):
        F.quantize_4bit(w, blocksize=16, quant_type="nf4")
    with pytest.raises(ValueError, match="dtype"):
        quantize_weight(w.to(torch.int32), quant_type="nf4")
    with pytest.raises(ValueError, match="dtype"):
        quantize_weight(w.to(torch.float64), quant_type="int8")
    with pytest.raises(ValueError, match="empty"):
        quantize_weight(torch.empty(0, 64, dtype=torch.float16), quant_type="fp4")
    with pytest.raises(ValueError, match="CPU"):
        quantize_weight(torch.empty(8, 64, dtype=torch.float16, device="meta"), quant_type="nf4")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(randw((2, 3, 4), torch.float16), quant_type="int8")
    with pytest.raises(ValueError, match="threads"):
        quantize_weight(w, quant_type="nf4", threads=0)
    with pytest.raises(ValueError, match="chunk_elements"):
        quantize_weight(w, quant_type="nf4", chunk_elements=0)
    assert QUANT_TYPES == ("int8", "nf4", "fp4")


# ------------------------------------------------------------------------------------------------
# quantization_config and skip lists
# ------------------------------------------------------------------------------------------------

LLAVA_SKIP = ["lm_head", "vision_tower", "multi_modal_projector"]


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("int8", False)])
def test_config_is_transformers_bitsandbytes_config(quant_type, double_quant):
    from transformers import BitsAndBytesConfig

    cfg = bnb_quantization_config(
        quant_type=quant_type, double_quant=double_quant, compute_dtype="bfloat16", skip_modules=LLAVA_SKIP
    )
    json.dumps(cfg)
    skip = [
        "lm_head",
        "language_model.lm_head",
        "vision_tower",
        "model.vision_tower",
        "multi_modal_projector",
        "model.multi_modal_projector",
    ]
    assert cfg["llm_int8_skip_modules"] == skip
    kwargs = dict(llm_int8_skip_modules=skip, bnb_4bit_compute_dtype=torch.bfloat16)
    if quant_type == "int8":
        expected = BitsAndBytesConfig(load_in_8bit=True, **kwargs)
    else:
        expected = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            **kwargs,
        )
    assert cfg == expected.to_dict()
    loaded = BitsAndBytesConfig.from_dict(dict(cfg))
    assert loaded.to_dict() == cfg
    assert loaded.quantization_method() == ("llm_int8" if quant_type == "int8" else quant_type)


def test_config_errors():
    with pytest.raises(ValueError, match="quant_type"):
        bnb_quantization_config(quant_type="nf8", double_quant=True, compute_dtype="float16", skip_modules=[])
    with pytest.raises(ValueError, match="compute_dtype"):
        bnb_quantization_config(quant_type="nf4", double_quant=True, compute_dtype="fp16", skip_modules=[])
    with pytest.raises(ValueError, match="skip module"):
        bnb_quantization_config(
            quant_type="nf4", double_quant=True, compute_dtype="float16", skip_modules=[""]
        )
    with pytest.raises(ValueError, match="skip module"):
        expand_skip_modules(["vision_tower."])


def _legacy(path: str) -> str:
    """transformers 5.x LLaVA path -> the legacy (checkpoint, and pre-4.52 in-memory) path."""
    return to_legacy(path)


def _layout_452(legacy: str) -> str:
    """Legacy path -> transformers 4.52-4.57 in-memory path (``vision_model`` level still there)."""
    for old, new in (
        ("language_model.lm_head", "lm_head"),
        ("language_model.model", "model.language_model"),
        ("vision_tower", "model.vision_tower"),
        ("multi_modal_projector", "model.multi_modal_projector"),
    ):
        if legacy == old or legacy.startswith(old + "."):
            return new + legacy[len(old) :]
    return legacy


# The three skip rules, transcribed from transformers' source (4.x is not installed here).
def skipped_436(path: str, keys: list[str]) -> bool:
    """4.36 ``_replace_with_bnb_linear``: child name in list, or any key is a substring."""
    return path.rsplit(".", 1)[-1] in keys or any(k in path for k in keys)


def skipped_4x(path: str, keys: list[str]) -> bool:
    """~4.40-4.57: child name in list, or ``key + '.'`` substring, or exact match."""
    return path.rsplit(".", 1)[-1] in keys or any((k + "." in path) or (k == path) for k in keys)


def skipped_5x(path: str, keys: list[str]) -> bool:
    from transformers.quantizers.quantizers_utils import should_convert_module

    return not should_convert_module(path, keys)


def tiny_llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=300,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def llava_linear_paths() -> list[str]:
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(tiny_llava_config())
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]


@pytest.mark.parametrize(
    "skip",
    [
        LLAVA_SKIP,
        ["language_model.lm_head", "vision_tower.vision_model", "model.multi_modal_projector"],
        ["lm_head", "model.vision_tower", "language_model.model.layers.1.mlp"],
        ["lm_head", "multi_modal_projector.linear_2", "k_proj"],
        ["lm_head", "model.vision_tower.encoder.layers.0", "vision_tower.vision_model.encoder.layers.1.mlp"],
    ],
)
def test_skip_list_means_the_same_in_transformers_4_and_5(skip):
    current = llava_linear_paths()  # transformers 5.x in-memory paths
    assert "lm_head" in current and "model.vision_tower.encoder.layers.0.self_attn.q_proj" in current
    keys = bnb_quantization_config(
        quant_type="nf4", double_quant=True, compute_dtype="float16", skip_modules=skip
    )["llm_int8_skip_modules"]
    for path in current:
        old = _legacy(path)
        mid = _layout_452(old)
        expected = module_is_skipped(path, skip)
        assert module_is_skipped(old, skip) == expected == module_is_skipped(mid, skip)
        assert module_is_skipped(path + ".weight", skip) == expected
        assert skipped_5x(path, keys) == expected, ("5.x", path)
        assert skipped_4x(mid, keys) == expected, ("4.52-4.57 layout", mid)
        assert skipped_4x(old, keys) == expected, ("4.4x legacy layout", old)
        assert skipped_436(old, keys) == expected, ("4.36", old)
    decided = {p: module_is_skipped(p, skip) for p in current}
    if skip is LLAVA_SKIP:
        assert {p for p, s in decided.items() if not s} == {
            p for p in current if p.startswith("model.language_model.layers.")
        }
    # Why every spelling is needed: the bare names alone do not skip the 5.x vision tower.
    assert not skipped_5x("model.vision_tower.encoder.layers.0.self_attn.q_proj", ["vision_tower"])


# ------------------------------------------------------------------------------------------------
# end to end: transformers 5 loads what we write, with no quantization_config argument
# ------------------------------------------------------------------------------------------------


def _write(tmp_path, config, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    config.save_pretrained(tmp_path)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("int8", False)])
def test_end_to_end_llama(tmp_path, quant_type, double_quant):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    ref = LlamaForCausalLM(config).eval()
    for p in ref.parameters():  # larger weights than the init so quantization error is visible but small
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.05)
    state = {}
    quantized = set()
    for name, tensor in ref.state_dict().items():
        module = name.removesuffix(".weight")
        if re.fullmatch(r"model\.layers\.\d+\..*_proj\.weight", name):
            for suffix, t in quantize_weight(
                tensor, quant_type=quant_type, double_quant=double_quant
            ).items():
                state[f"{module}.{suffix}"] = t
            quantized.add(module)
        else:
            state[name] = tensor
    # The decoder Linears only: lm_head stays float via the skip list (the default skip is gone once a
    # list is given).
    config.quantization_config = bnb_quantization_config(
        quant_type=quant_type, double_quant=double_quant, compute_dtype="float32", skip_modules=["lm_head"]
    )
    _write(tmp_path, config, state)

    model = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    cls = bnb.nn.Linear8bitLt if quant_type == "int8" else bnb.nn.Linear4bit
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, k in kinds.items() if issubclass(k, cls)} == quantized
    assert kinds["lm_head"] is torch.nn.Linear
    assert len(quantized) == 2 * 7
    # The loaded bitsandbytes modules serialize back to exactly the tensors we wrote.
    assert_identical(dict(model.state_dict()), state)

    # The loaded weights are exactly bitsandbytes' quantization of the originals.
    lin = model.model.layers[1].mlp.down_proj
    w = ref.model.layers[1].mlp.down_proj.weight.data
    if quant_type == "int8":
        assert torch.equal(lin.weight.data, bnb_int8(w)["weight"])
    else:
        deq = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        q, st = F.quantize_4bit(w.clone(), compress_statistics=double_quant, quant_type=quant_type)
        assert torch.equal(deq, F.dequantize_4bit(q, st))

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids).logits
    rel = (got - expected).norm() / expected.norm()
    assert rel < (0.05 if quant_type == "int8" else 0.3), rel
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_end_to_end_llava_legacy_layout(tmp_path):
    """Legacy checkpoint keys + the doubled skip list: 5.x renames the quantized stats and converts
    exactly the language-model decoder Linears."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = tiny_llava_config()
    ref = LlavaForConditionalGeneration(config).eval()
    linears = {n for n, m in ref.named_modules() if type(m) is torch.nn.Linear}
    state = {}
    quantized = set()
    for name, tensor in ref.state_dict().items():
        legacy = _legacy(name)
        module = legacy.removesuffix(".weight")
        if (
            name.endswith(".weight")
            and name.removesuffix(".weight") in linears
            and not module_is_skipped(module, LLAVA_SKIP)
        ):
            for suffix, t in quantize_weight(tensor, quant_type="nf4").items():
                state[f"{module}.{suffix}"] = t
            quantized.add(name.removesuffix(".weight"))
        else:
            state[legacy] = tensor
    assert any(k.startswith("language_model.model.layers.0.self_attn.q_proj.weight.") for k in state)
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in state  # legacy keys
    assert "language_model.lm_head.weight" in state
    config.quantization_config = bnb_quantization_config(
        quant_type="nf4", double_quant=True, compute_dtype="float32", skip_modules=LLAVA_SKIP
    )
    _write(tmp_path, config, state)

    model = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    four = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four == quantized
    assert four and all(n.startswith("model.language_model.layers.") for n in four)
    assert type(model.lm_head) is torch.nn.Linear
    assert torch.equal(
        model.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight,
        ref.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight,
    )

    ids = torch.tensor([[1, 300, 300, 300, 300, 7, 8, 9]])  # 2x2 patches -> 4 image tokens
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels).logits
        got = model(input_ids=ids, pixel_values=pixels).logits
    rel = (got - expected).norm() / expected.norm()
    assert rel < 0.3, rel
