"""bitsandbytes pre-quantization of Linear weights, byte-identical to bitsandbytes' CPU backend.

The converter streams a checkpoint tensor by tensor, so it cannot afford what ``bitsandbytes`` does on
CPU: its 4-bit path (``backends/default/ops.py::quantize_4bit``, pure torch because the CPU backend
registers no 4-bit quantize kernel) runs ``torch.bucketize`` over a whole-tensor float32 copy and
allocates ~18x the fp16 tensor transiently at ~30-45 MB/s. This module re-implements the same
arithmetic in block-aligned chunks with bounded scratch memory, on a small thread pool, and produces
the *same bytes*.

On-disk format (what ``Linear4bit._save_to_state_dict`` / ``QuantState.as_dict(packed=True)`` and
``Linear8bitLt._save_to_state_dict`` write, and what transformers' ``Bnb4bitDeserialize`` /
``Bnb8bitDeserialize`` read back), keyed relative to the Linear module:

4-bit (``nf4``/``fp4``), weight of shape ``S`` with ``n = prod(S)`` elements and
``nb = ceil(n / blocksize)`` blocks:

* ``weight``: uint8 ``(ceil(n/2), 1)``, two codes per byte, element ``2i`` in the high nibble. The
  flattening is row-major over the whole tensor, so blocks may straddle rows.
* ``weight.absmax``: without double quant float32 ``(nb,)``; with double quant uint8 ``(nb,)``
  (the absmax values minus their mean, quantized blockwise with the 8-bit dynamic map).
* ``weight.quant_map``: float32 ``(16,)``, the nf4/fp4 code table.
* double quant only: ``weight.nested_absmax`` float32 ``(ceil(nb/256),)`` and
  ``weight.nested_quant_map`` float32 ``(256,)`` (the dynamic map).
* ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 ``(len,)``, the UTF-8 bytes of
  ``json.dumps({"quant_type", "blocksize", "dtype", "shape", ["nested_blocksize", "nested_dtype",
  "nested_offset"]})``.

int8 (LLM.int8, what ``Int8Params._quantize`` does on CPU):

* ``weight``: int8 ``(out, in)``; ``SCB``: float32 ``(out,)``; ``weight_format``: uint8 scalar ``0``
  ("row"; bitsandbytes only accepts row-major now and transformers ignores the key on load).

Exactness notes (why the code below looks the way it does):

* 4-bit codes: bitsandbytes computes ``clamp(x * (1 / absmax.clamp(min=1e-38)), -1, 1)`` in float32
  and picks ``bucketize(scaled, midpoints)`` (right=False: the number of midpoints strictly below the
  value, so an exact midpoint goes to the *lower* code; fp4 is then remapped through
  ``argsort(code)``). We reproduce the float32 arithmetic with the same torch ops and replace the
  binary search with a 65536-entry table indexed by the top 16 bits of the float32 value. A key whose
  float range contains a midpoint (or NaN/inf) is marked ambiguous and those few elements are
  resolved with ``torch.bucketize`` itself, so ties, -0.0, NaN and all-zero blocks match exactly.
* The trailing partial block uses ``x / absmax`` (a division, not a reciprocal multiply) and stores
  the *clamped* absmax (``1e-38`` for an all-zero tail), like bitsandbytes.
* Double quant: ``offset = absmax.mean()`` is computed over the whole tensor's absmax array in one
  torch call in the calling thread. Note that torch's float32 sum is split by thread count for more
  than 32768 elements, so bitsandbytes' own offset (and therefore every nested byte) depends on
  ``torch.get_num_threads()`` in the last ulp; we match bitsandbytes run with the same setting.
  The nested step goes through bitsandbytes' *C* CPU kernel (``cquantize_blockwise_cpu_fp32``),
  which in 0.50 uses a 65536-entry LUT with index ``trunc(fma((clamp(x/absmax)+1)*0.5, 65535, 0.5))``
  (verified against the shipped ``libbitsandbytes_cpu.so`` disassembly); NaNs are ignored in the
  block max and an all-zero block gets code 0.
* int8: bitsandbytes casts to float16 first (bf16/fp32 inputs included), then
  ``round(w * (127 / rowmax))`` in float32 where ``127 / t`` is torch's ``reciprocal(t) * 127``.
* NaN inputs: the codes are identical, and a block/row maximum keeps the input's NaN bits like
  bitsandbytes' ``max(dim)`` (``amax`` would canonicalize them). The one thing that cannot be pinned
  down is a NaN that went through a half->float conversion: torch's vectorized path yields
  ``0x7FC00000`` and its scalar tail loop ``0x7FFFFFFF``, so which one bitsandbytes stores for a
  float16 weight's NaN block depends on where that element falls in torch's loop split (thread
  count, tensor length). Finite inputs, inf, -0.0 and subnormals are exact.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np
import torch

__all__ = [
    "SUPPORTED_BLOCKSIZES",
    "quantize_weight",
]

#: Blocksizes ``bitsandbytes.functional.quantize_4bit`` accepts.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Blocksize bitsandbytes uses to quantize the absmax statistics with double quant.
NESTED_BLOCKSIZE = 256
#: Default elements per work item. 1M elements keeps each worker's scratch (~11 bytes per element)
#: around 11 MB and mostly cache-resident, which measured faster than larger chunks.
DEFAULT_CHUNK_ELEMENTS = 1 << 20
# Below this many elements a tensor is not split across workers (thread start-up would dominate).
_MIN_SPLIT_ELEMENTS = 1 << 18
#: Default cap on worker threads: beyond this the work is memory-bound and each extra worker only
#: adds its ~11 MB of scratch.
MAX_DEFAULT_THREADS = 8

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_AMBIGUOUS = 255  # table sentinel: resolve this element with torch.bucketize
# quantize_weight temporarily changes torch's process-wide thread count and must compute the
# double-quant mean under the caller's setting, so concurrent calls are serialized.
_CALL_LOCK = threading.Lock()
_LITTLE_ENDIAN = sys.byteorder == "little"


# ----------------------------------------------------------------------------------------------
# Code tables (reproduced from bitsandbytes so the module does not need it at runtime; the tests
# assert equality with bitsandbytes' own tables).
# ----------------------------------------------------------------------------------------------

_NF4_DATA = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
# Same literal list as bitsandbytes.functional.get_4bit_type("fp4"); its "-0" is the int 0.
_FP4_DATA = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


_FOUR_BIT_DATA = {"nf4": _NF4_DATA, "fp4": _FP4_DATA}


def _fourbit_code(quant_type: str) -> torch.Tensor:
    """The 16-entry code table exactly as ``bitsandbytes.functional.get_4bit_type`` builds it."""
    data = torch.tensor(_FOUR_BIT_DATA[quant_type])
    data.div_(data.abs().max())
    return data


def _create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """``bitsandbytes.functional.create_dynamic_map`` (the double-quant code), same float steps."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1,
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


class _FourBitTables:
    """Everything the 4-bit kernel needs for one quant type, built once."""

    def __init__(self, quant_type: str) -> None:
        self.quant_type = quant_type
        self.code = _fourbit_code(quant_type)
        # Same ops as bitsandbytes.backends.default.ops._get_4bit_quantize_bounds, so the midpoints
        # and the (tie-dependent) order of fp4's two zero codes are the ones bitsandbytes uses.
        self.order = torch.argsort(self.code)
        self.bounds = (self.code[self.order[:-1]] + self.code[self.order[1:]]) / 2
        self.remap = quant_type != "nf4"
        self.table = self._build_key_table()
        # Code of the zero bitsandbytes pads an odd element count with.
        self.pad_code = int(self._codes_of(torch.zeros(1))[0])

    def _codes_of(self, scaled: torch.Tensor) -> torch.Tensor:
        """Reference decision for float32 values: bucketize, then fp4's sorted->code remap."""
        q = torch.bucketize(scaled, self.bounds, out_int32=True)
        if self.remap:
            q = self.order[q]
        return q

    def _build_key_table(self) -> np.ndarray:
        # Each 16-bit key (sign, exponent, 7 mantissa bits) is a contiguous interval of floats, and
        # the decision is monotone in the value, so a key maps to a single code iff both ends of its
        # interval do. Keys spanning a midpoint, or containing NaN/inf, get the sentinel.
        keys = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
        first = torch.from_numpy(keys.view(np.float32).copy())
        last = torch.from_numpy((keys | np.uint32(0xFFFF)).view(np.float32).copy())
        q_first = self._codes_of(first)
        q_last = self._codes_of(last)
        special = ~(torch.isfinite(first) & torch.isfinite(last))
        table = torch.where((q_first == q_last) & ~special, q_first, torch.full_like(q_first, _AMBIGUOUS))
        return table.to(torch.uint8).numpy()


@cache
def _fourbit_tables(quant_type: str) -> _FourBitTables:
    return _FourBitTables(quant_type)


@cache
def _dynamic_map_and_lut() -> tuple[torch.Tensor, np.ndarray]:
    """The dynamic map and the 65536-entry LUT bitsandbytes' C ``quantize_cpu_impl`` builds from it.

    ``build_quantize_lut``: ``mid[i] = 0.5f * (code[i] + code[i+1])``,
    ``val_i = -1.0f + (2.0f * i) / 65535``, ``lut[i] = #{mid < val_i}``; numpy float32 gives the same
    correctly rounded single-precision steps.
    """
    code = _create_dynamic_map()
    c = code.numpy()
    mids = (np.float32(0.5) * (c[:-1] + c[1:])).astype(np.float32)
    i = np.arange(1 << 16, dtype=np.float32)
    vals = np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(65535.0)
    lut = np.searchsorted(mids, vals, side="left").astype(np.uint8)
    return code, lut


# ----------------------------------------------------------------------------------------------
# Work scheduling
# ----------------------------------------------------------------------------------------------


@contextmanager
def _torch_threads(n: int):
    """Temporarily set torch's intra-op thread count (restored even on error)."""
    prev = torch.get_num_threads()
    if n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _run_chunks(
    n_chunks: int, threads: int, make_state: Callable[[], Any], work: Callable[[Any, int], None]
) -> None:
    """Run ``work(state, i)`` for every chunk, with one scratch ``state`` per worker thread.

    With several workers, torch's intra-op pool is set to 1 for the duration: torch and numpy both
    release the GIL, and measured on 2 cores a pool of single-threaded workers beats intra-op
    parallelism on cache-sized chunks (~1.3x), without oversubscribing the cores.
    """
    workers = max(1, min(threads, n_chunks))
    if workers == 1:
        state = make_state()
        # Single-threaded torch even for one chunk: an OpenMP fork/join per small op costs more than
        # it saves here, and on a busy machine each join can wait out a whole scheduler slice.
        with _torch_threads(1):
            for i in range(n_chunks):
                work(state, i)
        return

    local = threading.local()

    def run(i: int) -> None:
        state = getattr(local, "state", None)
        if state is None:
            state = local.state = make_state()
        work(state, i)

    with _torch_threads(1), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bnbq") as pool:
        # list() re-raises the first worker exception here.
        list(pool.map(run, range(n_chunks)))


def _split(total: int, unit: int, chunk_elements: int, threads: int) -> int:
    """Chunk length in elements: a multiple of ``unit``, at most ``chunk_elements`` (but at least one
    unit), and small enough that mid-sized tensors still give every worker a share."""
    chunk = max(unit, (chunk_elements // unit) * unit)
    if threads > 1 and total >= _MIN_SPLIT_ELEMENTS:
        share = -(-total // threads)
        chunk = min(chunk, max(unit, -(-share // unit) * unit))
    return chunk


# ----------------------------------------------------------------------------------------------
# 4-bit
# ----------------------------------------------------------------------------------------------


def _pack_pairs_into(q: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """``out[i] = q[2i] << 4 | q[2i+1]`` for uint8 codes < 16, via one uint16 view (little-endian)."""
    q16 = q.view(np.uint16)  # q[2i] | q[2i+1] << 8
    m = q16.shape[0]
    a = scratch[:m]
    b = scratch[m : 2 * m]
    np.left_shift(q16, 4, out=a)  # low byte: q[2i] << 4 (q[2i+1] << 12 lands in the high byte)
    np.right_shift(q16, 8, out=b)  # q[2i+1]
    np.bitwise_or(a, b, out=a)
    np.copyto(out, a, casting="unsafe")  # uint16 -> uint8 keeps the low byte


def _quantize_4bit_codes(
    flat: torch.Tensor,
    blocksize: int,
    tables: _FourBitTables,
    threads: int,
    chunk_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes ``((n+1)//2, 1)`` uint8 and float32 absmax ``(nb,)`` of a flat CPU tensor."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    n_blocks = full // blocksize + (1 if rem else 0)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(n_blocks, dtype=torch.float32)
    packed_np = packed.numpy().reshape(-1)
    table = tables.table

    chunk = _split(full, blocksize, chunk_elements, threads)
    n_chunks = -(-full // chunk)

    def make_state() -> dict[str, Any]:
        return {
            "x": torch.empty(chunk, dtype=torch.float32),
            "abs": torch.empty(chunk, dtype=torch.float32),
            "q": np.empty(chunk, dtype=np.uint8),
            "pack": np.empty(chunk, dtype=np.uint16),
        }

    def work(st: dict[str, Any], ci: int) -> None:
        e0 = ci * chunk
        e1 = min(e0 + chunk, full)
        length = e1 - e0
        b0, b1 = e0 // blocksize, e1 // blocksize
        x = st["x"][:length]
        x.copy_(flat[e0:e1])  # exact upcast; the same float32 values bitsandbytes works on
        xb = x.view(-1, blocksize)
        a = st["abs"][:length]
        torch.abs(x, out=a)
        am = absmax[b0:b1]
        torch.amax(a.view(-1, blocksize), dim=1, out=am)  # == abs().max(dim=-1)[0] unless NaN
        nan_blocks = torch.isnan(am)
        if nan_blocks.any():
            # amax returns a canonical NaN, max(dim) the input's own NaN bits (which bitsandbytes
            # then stores, e.g. 0x7FFF0000 from a bf16 NaN); redo those few blocks bnb's way.
            rows = torch.nonzero(nan_blocks).view(-1)
            am[rows] = a.view(-1, blocksize)[rows].max(dim=-1)[0]
        scale = 1.0 / am.clamp(min=1e-38)  # same expression => same reciprocal rounding
        torch.mul(xb, scale.view(-1, 1), out=xb)
        x.clamp_(-1.0, 1.0)

        xn = x.numpy()
        q = st["q"][:length]
        if _LITTLE_ENDIAN:
            np.take(table, xn.view(np.uint16)[1::2], out=q)  # high 16 bits of each float32
        else:  # pragma: no cover - no big-endian CI
            np.take(table, xn.view(np.uint32) >> np.uint32(16), out=q)
        if q.max() == _AMBIGUOUS:
            idx = np.flatnonzero(q == _AMBIGUOUS)
            q[idx] = tables._codes_of(torch.from_numpy(xn[idx])).numpy()
        _pack_pairs_into(q, packed_np[e0 // 2 : e1 // 2], st["pack"])

    if n_chunks:
        _run_chunks(n_chunks, threads, make_state, work)

    if rem:
        # Trailing partial block: bitsandbytes divides by the clamped absmax and stores it clamped.
        tail = flat[full:].float()
        am_t = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am_t
        scaled = torch.clamp(tail / am_t, -1, 1)
        if n % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q_t = tables._codes_of(scaled).to(torch.uint8)
        packed_np[full // 2 :] = ((q_t[::2] << 4) | q_t[1::2]).numpy()
    return packed, absmax


def _quantize_blockwise_dynamic(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' C CPU ``quantize_blockwise`` (fp32, dynamic map, blocksize 256), emulated.

    Per block: ``am = max(0, max |x| over non-NaN x)``; all-zero block -> codes 0; else
    ``c = clamp(x * (1.0f / am), -1, 1)``, ``t = fma((c + 1) * 0.5, 65535, 0.5)`` (one rounding:
    the product and sum are exact in float64 because ``c + 1`` is a multiple of 2^-24, then rounded to
    float32 once), ``code = lut[trunc(t)]``; NaN -> index 0 (cvttss2si gives INT_MIN, low 16 bits 0).
    """
    # numpy, single-threaded, in place: the input is only n/blocksize elements and a handful of
    # torch ops here would each pay an OpenMP fork/join (and a fresh allocation).
    _, lut = _dynamic_map_and_lut()
    n = values.numel()
    bs = NESTED_BLOCKSIZE
    nb = -(-n // bs)
    x = np.zeros(nb * bs, dtype=np.float32)
    x[:n] = values.numpy()
    xb = x.reshape(nb, bs)
    a = np.abs(x)
    np.fmax(a, np.float32(0.0), out=a)  # NaN -> 0: std::max(am, NaN) keeps am
    am = a.reshape(nb, bs).max(axis=1)  # the C max starts from 0, so zero padding is neutral
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.float32(1.0) / am
        np.multiply(xb, inv[:, None], out=xb)
        np.clip(x, np.float32(-1.0), np.float32(1.0), out=x)  # NaN stays NaN, like std::clamp
        np.add(x, np.float32(1.0), out=x)
        np.multiply(x, np.float32(0.5), out=x)
        t = x.astype(np.float64)
        np.multiply(t, 65535.0, out=t)
        np.add(t, 0.5, out=t)
        t32 = t.astype(np.float32)
        np.nan_to_num(t32, copy=False, nan=0.0)
        idx = t32.astype(np.int32)  # truncation toward zero, like cvttss2si
    codes = np.take(lut, idx)
    codes.reshape(nb, bs)[am == 0] = 0  # all-zero block: memset(0)
    return torch.from_numpy(codes[:n].copy()), torch.from_numpy(am)


def _quant_state_json(payload: dict[str, Any]) -> torch.Tensor:
    """``bitsandbytes.utils.pack_dict_to_tensor``."""
    return torch.tensor(list(json.dumps(payload).encode("utf-8")), dtype=torch.uint8)


def _dtype_name(dtype: torch.dtype) -> str:
    # QuantState.as_dict writes str(dtype).strip("torch.") (a character-set strip; harmless here).
    return str(dtype).strip("torch.")


def _quantize_4bit(
    weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, threads: int, chunk: int
) -> dict[str, torch.Tensor]:
    tables = _fourbit_tables(quant_type)
    flat = weight.reshape(-1)
    packed, absmax = _quantize_4bit_codes(flat, blocksize, tables, threads, chunk)
    quant_map = tables.code.clone()
    meta: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "dtype": _dtype_name(weight.dtype),
        "shape": list(weight.shape),
    }
    out: dict[str, torch.Tensor] = {"weight": packed}
    if double_quant:
        # One whole-tensor mean, in the calling thread with the caller's torch thread count, exactly
        # as quantize_4bit does it (chunking this would change the float32 summation order).
        offset = absmax.mean()
        qabsmax, nested_absmax = _quantize_blockwise_dynamic(absmax - offset)
        out["weight.absmax"] = qabsmax
        out["weight.quant_map"] = quant_map
        out["weight.nested_absmax"] = nested_absmax
        out["weight.nested_quant_map"] = _dynamic_map_and_lut()[0].clone()
        meta.update(
            {
                "nested_blocksize": NESTED_BLOCKSIZE,
                "nested_dtype": _dtype_name(torch.float32),
                "nested_offset": offset.item(),
            }
        )
    else:
        out["weight.absmax"] = absmax
        out["weight.quant_map"] = quant_map
    out[f"weight.quant_state.bitsandbytes__{quant_type}"] = _quant_state_json(meta)
    return out


# ----------------------------------------------------------------------------------------------
# int8
# ----------------------------------------------------------------------------------------------


def _quantize_int8(weight: torch.Tensor, threads: int, chunk: int) -> dict[str, torch.Tensor]:
    if weight.dim() != 2:
        raise ValueError(f"int8 quantization expects a 2-D Linear weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    out = torch.empty((rows, cols), dtype=torch.int8)
    # Row maxima stay float16 until the end and are widened in one call like bitsandbytes'
    # ``.values.float()``: torch's scalar and vector half->float paths give different NaN bits.
    rowmax16 = torch.empty(rows, dtype=torch.float16)
    rows_per_chunk = _split(rows * cols, cols, chunk, threads) // cols
    n_chunks = -(-rows // rows_per_chunk)

    def make_state() -> dict[str, torch.Tensor]:
        return {
            "h": torch.empty((rows_per_chunk, cols), dtype=torch.float16),
            "habs": torch.empty((rows_per_chunk, cols), dtype=torch.float16),
            "f": torch.empty((rows_per_chunk, cols), dtype=torch.float32),
        }

    def work(st: dict[str, torch.Tensor], ci: int) -> None:
        r0 = ci * rows_per_chunk
        r1 = min(r0 + rows_per_chunk, rows)
        m = r1 - r0
        src = weight[r0:r1]
        if src.dtype == torch.float16:
            h = src
        else:
            h = st["h"][:m]
            h.copy_(src)  # Int8Params._quantize casts to float16 before quantizing
        habs = st["habs"][:m]
        torch.abs(h, out=habs)
        rowmax = rowmax16[r0:r1]
        torch.amax(habs, dim=1, out=rowmax)  # == torch.max(A.abs(), dim=1).values unless NaN
        nan_rows = torch.isnan(rowmax)
        if nan_rows.any():  # keep the input's NaN bits like max(dim) does (see the 4-bit path)
            idx = torch.nonzero(nan_rows).view(-1)
            rowmax[idx] = torch.max(habs[idx], dim=1).values
        scale = 127.0 / rowmax.float().unsqueeze(-1)  # same expression: reciprocal() * 127.0
        f = st["f"][:m]
        torch.mul(h, scale, out=f)  # fp16 * fp32 -> computed in float32, like A * scale
        torch.round(f, out=f)
        out[r0:r1].copy_(f)

    _run_chunks(n_chunks, threads, make_state, work)
    scb = rowmax16.float()
    return {"weight": out, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def quantize_weight(
    weight: torch.Tensor,
    *,
    quant_type: str,
    blocksize: int = 64,
    double_quant: bool = True,
    threads: int | None = None,
    chunk_elements: int | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize one Linear weight into the tensors bitsandbytes/transformers serialize for it.

    The result is byte-identical to ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    compress_statistics=double_quant, quant_type=quant_type)`` followed by
    ``QuantState.as_dict(packed=True)`` (4-bit), or to ``Int8Params`` quantizing ``w`` on CPU
    (``int8_vectorwise_quant(w.to(float16))``) plus ``Linear8bitLt``'s extra keys (int8), for
    bitsandbytes 0.50's CPU backend. See the module docstring for the exact layout.

    Args:
        weight: CPU float16/bfloat16/float32 tensor (a Linear weight, ``(out_features, in_features)``;
            4-bit accepts any non-empty shape). Non-contiguous input is copied once.
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        blocksize: 4-bit block size, one of :data:`SUPPORTED_BLOCKSIZES`. Ignored for int8.
        double_quant: 4-bit only: also quantize the absmax statistics (``bnb_4bit_use_double_quant``).
        threads: worker threads; ``None`` uses ``torch.get_num_threads()`` capped at
            :data:`MAX_DEFAULT_THREADS`. While the workers run,
            torch's (process-wide) intra-op thread count is set to 1 and restored afterwards;
            concurrent calls are serialized. The result does not depend on ``threads``; with double
            quant it does depend on ``torch.get_num_threads()`` exactly as bitsandbytes' does.
        chunk_elements: elements per work item (rounded down to whole blocks); bounds scratch memory
            to about 11 bytes per element per worker. Defaults to :data:`DEFAULT_CHUNK_ELEMENTS`.

    Returns:
        Mapping from key suffix (relative to the Linear module, e.g. ``"weight"``,
        ``"weight.absmax"``, ``"SCB"``) to a CPU tensor owning its own storage.

    Raises:
        ValueError: unknown ``quant_type``, unsupported ``blocksize``, unsupported dtype, non-CPU or
            empty tensor, non-2-D weight for int8, or a non-positive ``threads``/``chunk_elements``.
    """
    if quant_type != "int8" and quant_type not in _FOUR_BIT_DATA:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of int8, {', '.join(_FOUR_BIT_DATA)}")
    if quant_type != "int8" and blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(
            f"unsupported blocksize {blocksize!r} for {quant_type}; bitsandbytes supports "
            f"{', '.join(map(str, SUPPORTED_BLOCKSIZES))}"
        )
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight dtype must be float16, bfloat16 or float32, got {weight.dtype}")
    if weight.device.type != "cpu":
        raise ValueError(
            f"weight must be on the CPU (bitsandbytes' CPU backend is the reference), got {weight.device}"
        )
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    threads = min(torch.get_num_threads(), MAX_DEFAULT_THREADS) if threads is None else threads
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    chunk = DEFAULT_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_elements must be a positive integer, got {chunk_elements!r}")

    weight = weight.detach()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    with _CALL_LOCK:
        if quant_type == "int8":
            return _quantize_int8(weight, threads, chunk)
        return _quantize_4bit(weight, quant_type, blocksize, double_quant, threads, chunk)
