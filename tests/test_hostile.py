"""Hostile and unlucky inputs: every one ends in exit 2 with one line naming the file or field at fault (or
128 + N for signal N), nothing left behind, the inputs untouched, in bounded time and memory.

Classes: pickles, safetensors headers, shard indexes, configs, adapters, images, outputs overlapping the
inputs, symlinks out of an input, signals, concurrent runs, disk full, names too long.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from builders import write_base, write_lora
from click.testing import CliRunner
from memwatch import PeakAnon

from llava_convert.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llava-v1.5-tiny"
TOWER = ROOT / "examples" / "clip-tiny"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, *fragments: str, code: int = 2) -> str:
    """Exit CODE with exactly one line on stderr, no traceback; returns the line."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "internal error" not in lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = "-> " + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def ws(tmp_path):
    """A copy of the bundled example and its tower; checks afterwards that OUT's parent holds no staging,
    set-aside or lock file."""
    src = tmp_path / "llava-v1.5-tiny"
    shutil.copytree(EXAMPLE, src)
    tower = tmp_path / "clip"
    shutil.copytree(TOWER, tower)
    w = SimpleNamespace(root=tmp_path, src=src, tower=tower, out=tmp_path / "out")
    yield w
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def convert(w, *extra, out=None):
    return run("convert", w.src, out if out is not None else w.out, "--vision-tower", w.tower, "--quiet", *extra)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------------------
# Pickles (.bin)
# ----------------------------------------------------------------------------------------------------------


class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def write_bin(path: Path, state: dict, storages: dict[str, bytes], *, compress_pickle: bool = False) -> None:
    """A torch.save-layout zip with a hand-made pickle: whatever offsets, shapes and strides a test needs."""
    import io

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue(), zipfile.ZIP_DEFLATED if compress_pickle else zipfile.ZIP_STORED)
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


def _one_tensor(offset=0, size=(4,), stride=(1,), numel=4, stored=16, key="0"):
    st = _Storage(key, numel)
    return {"model.norm.weight": _Tensor(st, offset, size, stride)}, {key: b"\0" * stored}


@pytest.mark.parametrize(
    "case, fragment",
    [
        (dict(offset=2, size=(4,)), "runs past its storage"),
        (dict(size=(2, 3), stride=(3, 1)), "runs past its storage"),
        (dict(numel=8, stored=16), "declares 8 elements but holds 4"),
        (dict(stride=(-1,)), "corrupt tensor record"),
        (dict(size=("4",)), "corrupt tensor record"),
        (dict(key="9"), "storage 9 is missing"),
    ],
)
def test_bin_tensor_outside_its_storage(ws, case, fragment):
    state, storages = _one_tensor(**case)
    if case.get("key") == "9":
        storages = {"0": b"\0" * 16}
    write_bin(ws.src / "pytorch_model-00001-of-00003.bin", state, storages)
    before = snapshot(ws.root)
    refused(convert(ws), "pytorch_model-00001-of-00003.bin", fragment)
    assert snapshot(ws.root) == before and not ws.out.exists()


def test_bin_refuses_code_and_non_tensors(ws):
    shard = ws.src / "pytorch_model-00001-of-00003.bin"

    class Evil:
        def __reduce__(self):
            return os.system, ("touch pwned",)

    write_bin(shard, {"x": Evil()}, {})
    refused(convert(ws), "refusing to unpickle posix.system")
    assert not (ws.root / "pwned").exists() and not Path("pwned").exists()
    write_bin(shard, {5: _one_tensor()[0]["model.norm.weight"]}, {"0": b"\0" * 16})
    refused(convert(ws), "not a string")
    write_bin(shard, {"model.norm.weight": [1, 2]}, {})
    refused(convert(ws), "is not a tensor")
    write_bin(shard, [1, 2, 3], {})
    refused(convert(ws), "expected a state dict")


def test_compressed_pickle_bomb_refused_in_bounded_memory(ws):
    """1.1 MB that would inflate to 1 GiB: refused from the zip directory, nothing inflated."""
    shard = ws.src / "pytorch_model-00001-of-00003.bin"
    bomb = b"(" * 0 + b"\x80\x02}q\x00." + b"\0" * (128 << 20)  # a valid pickle, then 128 MiB of zeros
    with zipfile.ZipFile(shard, "w") as z:
        z.writestr("archive/data.pkl", bomb, zipfile.ZIP_DEFLATED)
        z.writestr("archive/version", "3\n")
    assert shard.stat().st_size < 1 << 20
    with PeakAnon() as mem:
        t0 = time.monotonic()
        refused(convert(ws), "compressed", "refusing to inflate")
    assert time.monotonic() - t0 < 20
    assert mem.peak - mem.base < 64 << 20


def test_legacy_and_garbage_bins(ws):
    shard = ws.src / "pytorch_model-00002-of-00003.bin"
    shard.write_bytes(b"\x80\x02garbage")
    refused(convert(ws), "legacy (pre-1.6) torch.save format")
    shard.write_bytes(b"PK\x03\x04" + os.urandom(200))
    refused(convert(ws), "pytorch_model-00002-of-00003.bin")


# ----------------------------------------------------------------------------------------------------------
# safetensors headers (the tower's model.safetensors)
# ----------------------------------------------------------------------------------------------------------


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(path: Path, header, data: bytes, *, raw: bytes | None = None) -> None:
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _mutate_first(header: dict, key: str | None = None) -> str:
    return key or next(k for k in header if k != "__metadata__" and k.startswith("vision_model.encoder"))


@pytest.mark.parametrize(
    "mutation, fragment",
    [
        ("list", "a JSON list, not an object"),
        ("string", "a JSON str, not an object"),
        ("infinity", "Infinity is not a JSON number"),
        ("overflow", "out of range"),
        ("deep", "nested too deeply"),
        ("overlap", "overlap"),
        ("negative", "unreadable header entry"),
        ("bool_shape", "unreadable header entry"),
        ("entry_not_object", "unreadable header entry"),
        ("shape_mismatch", "disagrees with its shape"),
        ("past_end", "lies outside the file"),
        ("header_length", "header length"),
        ("not_utf8", "not UTF-8"),
        ("int_dtype", "is a floating-point parameter"),
        ("metadata", "__metadata__"),
    ],
)
def test_safetensors_header(ws, mutation, fragment):
    st = ws.tower / "model.safetensors"
    header, data = _header(st)
    name = _mutate_first(header)
    entry = header[name]
    raw = None
    if mutation == "list":
        raw = b"[1, 2]"
    elif mutation == "string":
        raw = b'"hello"'
    elif mutation == "infinity":
        raw = json.dumps(header).replace(json.dumps(entry["data_offsets"]), "[0, Infinity]", 1).encode()
    elif mutation == "overflow":
        raw = json.dumps(header).replace(json.dumps(entry["data_offsets"]), "[0, 1e400]", 1).encode()
    elif mutation == "deep":
        raw = json.dumps(header)[:-1].encode() + b', "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    elif mutation == "overlap":
        other = next(k for k in header if k not in ("__metadata__", name) and header[k]["dtype"] == entry["dtype"]
                     and header[k]["shape"] == entry["shape"])
        header[name]["data_offsets"] = header[other]["data_offsets"]
    elif mutation == "negative":
        entry["data_offsets"] = [-4, entry["data_offsets"][1]]
    elif mutation == "bool_shape":
        entry["shape"] = [True] * len(entry["shape"])
    elif mutation == "entry_not_object":
        header[name] = [1, 2, 3]
    elif mutation == "shape_mismatch":
        entry["shape"] = [s * 2 for s in entry["shape"]]
    elif mutation == "past_end":
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        entry["data_offsets"] = [len(data) - size + 4, len(data) + 4]
    elif mutation == "header_length":
        st.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    elif mutation == "not_utf8":
        raw = json.dumps(header).encode()[:-1] + b', "\xff\xfe": 1}'
    elif mutation == "int_dtype":
        entry["dtype"] = "I32"
    elif mutation == "metadata":
        header["__metadata__"] = {"format": 5}
    if mutation != "header_length":
        _write_header(st, header, data, raw=raw)
    before = snapshot(ws.root)
    refused(convert(ws), "model.safetensors" if mutation != "int_dtype" else "dtype int32", fragment)
    assert snapshot(ws.root) == before and not ws.out.exists()


# ----------------------------------------------------------------------------------------------------------
# Shard indexes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b'{"weight_map": {"a": "\xff"}}', "not UTF-8"),
        (b'{"weight_map": {"model.norm.weight": 5}}', "must be a shard file name"),
        (b'{"weight_map": {"model.norm.weight": null}}', "must be a shard file name"),
        (b'{"weight_map": [1, 2]}', "no weight_map object"),
        (b'{"weight_map": {"a": "x.bin"}, "metadata": {"total_size": Infinity}}', "Infinity"),
        (b'{"weight_map": {"a": "x.bin"}, "metadata": {"total_size": 1e999}}', "out of range"),
        (b'{"weight_map": ' + b"[" * 50000 + b"]" * 50000 + b"}", "nested too deeply"),
        (b'{"weight_map": {"model.norm.weight": "../clip/model.safetensors"}}', "must be a file name inside"),
        (b'{"weight_map": {"model.norm.weight": "/etc/passwd"}}', "must be a file name inside"),
        (b'{"weight_map": {"model.norm.weight": "missing.bin"}}', "listed but missing"),
        (b"[]", "no weight_map object"),
    ],
)
def test_index(ws, raw, fragment):
    (ws.src / "pytorch_model.bin.index.json").write_bytes(raw)
    refused(convert(ws), "pytorch_model.bin.index.json", fragment)
    assert not ws.out.exists()


def test_index_naming_a_tensor_in_the_wrong_shard(ws):
    index = ws.src / "pytorch_model.bin.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = "pytorch_model-00001-of-00003.bin"
    index.write_text(json.dumps(data))
    refused(convert(ws), "model.norm.weight", "is not in shard")


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("vocab_size", "400", "vocab_size must be an integer, found '400'"),
        ("hidden_size", "abc", "hidden_size must be an integer"),
        ("hidden_size", 0, "hidden_size must be a positive integer"),
        ("num_attention_heads", -4, "num_attention_heads must be a positive integer"),
        ("max_position_embeddings", -1, "max_position_embeddings must be a positive integer"),
        ("num_hidden_layers", 10**9, "num_hidden_layers must be a positive integer"),
        ("num_hidden_layers", 3, "num_hidden_layers 3 but the weights hold layers 0-1 (2)"),
        ("num_hidden_layers", True, "num_hidden_layers must be an integer"),
        ("intermediate_size", 256, "intermediate_size 256 disagrees"),
        ("num_key_value_heads", 2, "num_key_value_heads 2 x head_dim 16 disagrees"),
        ("num_key_value_heads", 3, "not a multiple of num_key_value_heads 3"),
        ("rms_norm_eps", "tiny", "rms_norm_eps must be a finite number"),
        ("mm_vision_select_layer", 99, "mm_vision_select_layer 99 is outside the vision tower"),
        ("mm_vision_select_layer", "-2", "mm_vision_select_layer must be an integer"),
        ("mm_use_im_start_end", "yes", "mm_use_im_start_end must be true or false"),
        ("image_grid_pinpoints", [[336, "x"]], "image_grid_pinpoints must be"),
        ("hidden_act", 5, "hidden_act must be a string"),
        ("mm_hidden_size", 33, "mm_hidden_size 33 does not match"),
        ("rope_scaling", "linear", "rope_scaling must be an object"),
    ],
)
def test_config_field(ws, field, value, fragment):
    edit_json(ws.src / "config.json", **{field: value})
    line = refused(convert(ws), "config.json", fragment)
    assert "StrictDataclass" not in line


def test_config_nan_and_huge_numbers(ws):
    cfg = ws.src / "config.json"
    text = cfg.read_text()
    cfg.write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN'))
    refused(convert(ws), "config.json", "NaN is not a JSON number")
    cfg.write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e999'))
    refused(convert(ws), "config.json", "out of range")


def test_twenty_thousand_layers_refused_before_any_model_is_built(ws):
    edit_json(ws.src / "config.json", num_hidden_layers=1000)
    with PeakAnon() as mem:
        t0 = time.monotonic()
        refused(convert(ws), "config.json", "num_hidden_layers 1000 but the weights hold layers 0-1")
        edit_json(ws.src / "config.json", num_hidden_layers=20000)
        refused(convert(ws), "config.json", "num_hidden_layers must be a positive integer in [1, 1024]")
    assert time.monotonic() - t0 < 10
    assert mem.peak - mem.base < 100 << 20


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("patch_size", 0, "patch_size must be a positive integer"),
        ("image_size", "336", "image_size must be an integer"),
        ("num_hidden_layers", 7, "num_hidden_layers 7 but the tower's weights hold"),
        ("hidden_size", 31, "hidden_size 31 is not a multiple of num_attention_heads"),
    ],
)
def test_tower_config_field(ws, field, value, fragment):
    cfg = ws.tower / "config.json"
    data = json.loads(cfg.read_text())
    (data["vision_config"] if "vision_config" in data else data)[field] = value
    cfg.write_text(json.dumps(data))
    refused(convert(ws), "clip/config.json", fragment)


def test_corrupt_tokenizer_model_is_named_not_blamed_on_tiktoken(ws):
    (ws.src / "tokenizer.model").write_bytes(os.urandom(300))
    line = refused(convert(ws), "tokenizer.model")
    assert "tiktoken" not in line


# ----------------------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def lora(tmp_path):
    base = write_base(tmp_path)
    return SimpleNamespace(root=tmp_path, base=base, adapter=lambda **o: write_lora(tmp_path, adapter_overrides=o))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"target_modules": "(.*.*)*y"}, "could take unbounded time to match"),
        ({"target_modules": "(a+)+$"}, "could take unbounded time to match"),
        ({"target_modules": ".*.*.*.*.*y"}, "unbounded repeats"),
        ({"target_modules": "(q_proj"}, "is not a valid regular expression"),
        ({"target_modules": 5}, "target_modules must be"),
        ({"target_modules": [1, 2]}, "target_modules must be a list of module names"),
        ({"rank_pattern": {"(a*)*b": 4}}, "could take unbounded time"),
        ({"alpha_pattern": {"q_proj": -1}}, "must be a positive finite number"),
        ({"r": "8"}, "r must be a positive integer"),
        ({"r": 0}, "r must be a positive integer"),
        ({"lora_alpha": None}, "lora_alpha must be a positive finite number"),
    ],
)
def test_adapter_config(lora, overrides, fragment):
    adapter = lora.adapter(**overrides)
    t0 = time.monotonic()
    refused(run("convert", adapter, lora.root / "out", "--base", lora.base, "--quiet"), "adapter_config.json", fragment)
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_lora_alpha_not_finite(lora, value):
    adapter = lora.adapter()
    cfg = adapter / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"lora_alpha": 8', f'"lora_alpha": {value}'))
    refused(run("convert", adapter, lora.root / "out", "--base", lora.base, "--quiet"), "adapter_config.json")


def test_simple_target_pattern_still_merges(lora):
    adapter = lora.adapter(target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    r = run("convert", adapter, lora.root / "out", "--base", lora.base, "--quiet")
    assert r.exit_code == 0, r.output


# ----------------------------------------------------------------------------------------------------------
# Images (check --image)
# ----------------------------------------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares WIDTH x HEIGHT and whose data is one tiny compressed chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    out = root / "llava-v1.5-tiny-hf"
    r = run("convert", EXAMPLE, out, "--vision-tower", TOWER, "--quiet")
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("pixels, fragment", [((10000, 10000), "100 M"), ((30000, 30000), "more than")])
def test_check_refuses_image_bombs(tmp_path, converted, pixels, fragment):
    img = tmp_path / "bomb.png"
    _png_header_only(img, *pixels)
    assert img.stat().st_size < 1000
    with PeakAnon() as mem:
        line = refused(run("check", EXAMPLE, converted, "--vision-tower", TOWER, "--image", img, "--quiet"),
                       "bomb.png", fragment, "limited to 50 M pixels")
    assert "DecompressionBomb" not in line
    assert mem.peak - mem.base < 200 << 20


def test_check_refuses_unwritable_report_and_corrupt_image(tmp_path, converted):
    refused(run("check", EXAMPLE, converted, "--json", tmp_path, "--quiet"), "it is a directory")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    refused(run("check", EXAMPLE, converted, "--vision-tower", TOWER, "--image", bad, "--quiet"), "bad.png",
            "cannot read the image")


# ----------------------------------------------------------------------------------------------------------
# Outputs overlapping the inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, fragment",
    [
        ("src", "it is SOURCE"),
        ("root", "it contains SOURCE"),
        ("inside", "it lies inside SOURCE"),
        ("tower", "it is the vision tower"),
        ("link_to_src", "it is SOURCE"),
        ("cwd", "it is the current directory"),
    ],
)
def test_output_overlapping_an_input_is_refused_even_with_force(ws, monkeypatch, where, fragment):
    out = {"src": ws.src, "root": ws.root, "inside": ws.src / "hf", "tower": ws.tower,
           "link_to_src": ws.root / "link", "cwd": Path(".")}[where]
    if where == "link_to_src":
        out.symlink_to(ws.src)
    if where == "cwd":
        monkeypatch.chdir(ws.root)
    before = snapshot(ws.root)
    refused(convert(ws, "--force", out=out), "Cannot write to", fragment)
    assert snapshot(ws.root) == before


def test_output_over_the_tower_named_by_the_config(ws):
    edit_json(ws.src / "config.json", mm_vision_tower=str(ws.tower))
    before = snapshot(ws.root)
    refused(run("convert", ws.src, ws.tower, "--force", "--quiet"), "it is the vision tower")
    assert snapshot(ws.root) == before


def test_quantize_into_its_source_is_refused(converted, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(converted, src)
    before = snapshot(tmp_path)
    refused(run("quantize", src, src, "--quantize", "int8", "--force", "--quiet"), "it is SOURCE")
    refused(run("quantize", src, tmp_path, "--quantize", "int8", "--force", "--quiet"), "it contains SOURCE")
    assert snapshot(tmp_path) == before


def _hub_cache(root: Path, src: Path) -> Path:
    """SRC laid out as a Hub cache snapshot: relative links into the repo's blobs/."""
    repo = root / "hub" / "models--org--llava-v1.5-tiny"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snap


def test_hub_cache_links_are_read_and_the_cache_is_protected(ws):
    snap = _hub_cache(ws.root, ws.src)
    repo = snap.parent.parent
    before = snapshot(ws.root / "hub")
    for out, fragment in ((repo / "blobs", "SOURCE"), (repo, "it contains SOURCE"),
                          (repo / "blobs" / next(iter(os.listdir(repo / "blobs"))), "SOURCE")):
        refused(run("convert", snap, out, "--vision-tower", ws.tower, "--force", "--quiet"), fragment)
    assert snapshot(ws.root / "hub") == before
    r = run("convert", snap, ws.out, "--vision-tower", ws.tower, "--quiet")
    assert r.exit_code == 0, r.output
    assert snapshot(ws.root / "hub") == before


# ----------------------------------------------------------------------------------------------------------
# Symlinks leading out of an input
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json", "tokenizer.model",
                                  "pytorch_model-00002-of-00003.bin", "config.json"])
def test_symlink_out_of_the_source_is_refused(ws, name):
    secret_dir = ws.root / "elsewhere"
    secret_dir.mkdir()
    secret = secret_dir / name
    shutil.move(ws.src / name, secret)
    (ws.src / name).symlink_to(secret)
    refused(convert(ws), name, "a symlink to", "outside")
    assert not ws.out.exists()


def test_symlink_inside_the_source_is_fine(ws):
    shutil.move(ws.src / "generation_config.json", ws.src / "gen.json")
    (ws.src / "generation_config.json").symlink_to("gen.json")
    r = convert(ws)
    assert r.exit_code == 0, r.output


def test_quantize_copies_only_the_format_files_and_names_them(converted, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(converted, src)
    (src / "notes.txt").write_text("not part of the format")
    (src / "secret.json").write_text('{"token": "hf_..."}')
    out = tmp_path / "q"
    r = run("quantize", src, out, "--quantize", "int8", "--quiet")
    assert r.exit_code == 0, r.output
    assert not (out / "notes.txt").exists() and not (out / "secret.json").exists()
    prov = json.loads((out / "provenance.json").read_text())
    copied = {Path(f["path"]).name for f in prov["files"] if f["role"] != "weights"}
    for f in copied:
        assert (out / f).exists()
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= copied
    assert all(len(f["sha256"]) == 64 for f in prov["files"] if f["role"] != "weights")
    # a symlink out of SOURCE is refused, not copied
    shutil.rmtree(out)
    secret = tmp_path / "token.json"
    secret.write_text("{}")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(secret)
    refused(run("quantize", src, out, "--quantize", "int8", "--quiet"), "tokenizer.json", "outside")
    assert not out.exists()


def test_provenance_names_every_input_file(ws):
    r = convert(ws)
    assert r.exit_code == 0, r.output
    prov = json.loads((ws.out / "provenance.json").read_text())
    names = {(f["role"], Path(f["path"]).name) for f in prov["files"]}
    assert ("tokenizer", "tokenizer.model") in names and ("generation_config", "generation_config.json") in names
    assert {n for r_, n in names if r_ == "weights"} == {p.name for p in ws.src.glob("*.bin")} | {"model.safetensors"}
    tok = next(f for f in prov["files"] if f["path"].endswith("tokenizer.model"))
    assert tok["sha256"] == hashlib.sha256((ws.src / "tokenizer.model").read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Replacing, racing, locking, stale staging, durability, environment failures
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "symlink", "dir"])
def test_force_replaces_file_symlink_or_dir_and_leaves_nothing(ws, kind):
    target = ws.root / "target"
    target.mkdir()
    (target / "keep").write_text("keep")
    if kind == "file":
        ws.out.write_text("old")
    elif kind == "symlink":
        ws.out.symlink_to(target)
    else:
        ws.out.mkdir()
        (ws.out / "old").write_text("old")
    refused(convert(ws), "already exists. Pass --force")
    r = convert(ws, "--force")
    assert r.exit_code == 0, r.output
    assert ws.out.is_dir() and not ws.out.is_symlink() and (ws.out / "config.json").is_file()
    assert (target / "keep").read_text() == "keep"


def test_output_appearing_meanwhile_is_not_replaced(ws, monkeypatch):
    import llava_convert.convert as conv

    real = conv.write_shards

    def racing(*a, **k):
        ws.out.mkdir()
        (ws.out / "theirs").write_text("theirs")
        return real(*a, **k)

    monkeypatch.setattr(conv, "write_shards", racing)
    refused(convert(ws), "appeared while this run was writing")
    assert sorted(os.listdir(ws.out)) == ["theirs"]
    shutil.rmtree(ws.out)
    # an empty directory appearing meanwhile is not silently replaced either (plain rename would)
    monkeypatch.setattr(conv, "write_shards", lambda *a, **k: (ws.out.mkdir(), real(*a, **k))[1])
    refused(convert(ws), "appeared while this run was writing")
    assert ws.out.is_dir() and not os.listdir(ws.out)


def test_second_run_on_the_same_output_is_locked_out(ws):
    fd = os.open(ws.root / ".out.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        refused(convert(ws), "another llava-convert run is writing it")
    finally:
        os.close(fd)
        os.unlink(ws.root / ".out.lock")
    assert not ws.out.exists()


def test_stale_staging_of_dead_runs_is_removed(ws):
    (ws.root / ".out.partial-999999").mkdir()
    (ws.root / ".out.partial-999999" / "model.safetensors").write_bytes(b"\0" * 1000)
    (ws.root / ".out.old-999998").write_text("x")
    (ws.root / ".other.partial-1").mkdir()  # another OUTPUT's: not ours to remove
    r = convert(ws)
    assert r.exit_code == 0, r.output
    assert "left by an interrupted run" in r.stderr
    assert not (ws.root / ".out.partial-999999").exists() and not (ws.root / ".out.old-999998").exists()
    assert (ws.root / ".other.partial-1").exists()
    shutil.rmtree(ws.root / ".other.partial-1")


def test_every_file_and_directory_is_fsynced(ws, monkeypatch):
    import llava_convert.writer as writer

    synced = []
    real = os.fsync
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    r = convert(ws)
    assert r.exit_code == 0, r.output
    staged = {Path(p).name for p in synced}
    assert {p.name for p in ws.out.iterdir()} <= staged
    assert str(ws.root) in synced  # the parent, after the rename


def test_name_too_long_and_missing_parent(ws):
    refused(convert(ws, out=ws.root / ("x" * 250)), "name too long")
    refused(convert(ws, out=ws.root / "no" / "such" / "out"), "does not exist")


def test_debug_shows_the_traceback(ws):
    edit_json(ws.src / "config.json", vocab_size="400")
    r = CliRunner().invoke(main, ["--debug", "convert", str(ws.src), str(ws.out), "--vision-tower", str(ws.tower)])
    assert r.exit_code == 2
    assert "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("Error: ")


def _can_mount_tmpfs(path: Path) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_leaves_nothing(ws):
    """A 256 KB file system for a ~430 KB output: ENOSPC mid-write. tmpfs where this machine can mount one,
    else a 256 KB file-size limit (EFBIG) in a child process."""
    small = ws.root / "small"
    if _can_mount_tmpfs(small):
        try:
            before = snapshot(ws.src)
            line = refused(convert(ws, out=small / "out"), "Cannot write to", "No space left on device")
            assert str(small / "out") in line
            assert os.listdir(small) == [] and snapshot(ws.src) == before
        finally:
            subprocess.run(["umount", str(small)], check=True)
        small.rmdir()
        return
    small.rmdir()

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    p = subprocess.run([sys.executable, "-m", "llava_convert.cli", "convert", ws.src, ws.out, "--vision-tower",
                        ws.tower, "--quiet"], capture_output=True, text=True, preexec_fn=limit, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "File too large" in p.stderr
    assert not ws.out.exists()


# ----------------------------------------------------------------------------------------------------------
# Signals (real processes)
# ----------------------------------------------------------------------------------------------------------

_STALL = """
import sys, time
import llava_convert.convert as conv
real, marker = conv.write_shards, sys.argv[1]
def stall(*a, **k):
    n = real(*a, **k)
    open(marker, "w").close()
    time.sleep(120)
    return n
conv.write_shards = stall
from llava_convert.cli import main
sys.argv = ["llava-convert", *sys.argv[2:]]
main()
"""


@pytest.mark.slow
def test_signals_mid_write_clean_up_and_exit_128_plus_n(tmp_path):
    """SIGTERM (timeout, CI cancel), SIGHUP (closed terminal), SIGINT (Ctrl-C) while the shards are written:
    staging removed, exit 128 + N, one line; meanwhile a second run on the same OUTPUT is locked out."""
    src = tmp_path / "llava-v1.5-tiny"
    shutil.copytree(EXAMPLE, src)
    before = snapshot(src)
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        d = tmp_path / sig.name
        d.mkdir()
        marker = d / "marker"
        cmd = [sys.executable, "-c", _STALL, str(marker), "convert", str(src), str(d / "out"),
               "--vision-tower", str(TOWER), "--quiet"]
        procs[sig] = (subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), d, marker)
    deadline = time.monotonic() + 240
    for sig, (p, d, marker) in procs.items():
        while not marker.exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [x for x in os.listdir(d) if ".partial-" in x]
        if sig == signal.SIGTERM:
            w = SimpleNamespace(src=src, tower=TOWER)
            refused(convert(w, out=d / "out"), "another llava-convert run is writing it")
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 128 + sig, err
        lines = err.strip().splitlines()
        assert lines == [f"Interrupted ({sig.name})"], err
        assert sorted(os.listdir(d)) == ["marker"]
    assert snapshot(src) == before


def test_permuted_lm_head_of_an_unquantized_model_gets_no_quantization_hint(tmp_path, converted):
    """The example's float32 tower is stored as float16 (judged by KL, not atol): still not a quantized model."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "permuted"
    shutil.copytree(converted, out)
    sd = load_file(str(out / "model.safetensors"))
    (key,) = [k for k in sd if k.endswith("lm_head.weight")]
    sd[key] = sd[key].roll(1, dims=0).contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    r = run("check", EXAMPLE, out, "--vision-tower", TOWER, "--quiet")
    assert r.exit_code == 1, r.output
    assert "lm_head" in r.output and "quantiz" not in r.output.lower()
