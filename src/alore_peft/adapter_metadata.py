"""What ALoRE adds to the metadata of ``adapter_model.safetensors``, and the checks made on load.

A safetensors file carries a ``str -> str`` metadata map in its header. PEFT
writes ``{"format": "pt"}``; every ALoRE adapter saved with this package also
gets

- ``alore.sha256``: a JSON object ``{tensor name: SHA-256 of its bytes}``, so
  that bytes changed inside the data region (which the header does not
  describe, and safetensors does not notice) are caught on load;
- ``alore.labels``: a JSON list of the class names in id order, when the base
  model's config names its classes (``id2label`` other than ``LABEL_0, ...``),
  so that a merged model and a reloaded classifier keep them.

:func:`verify_adapter_file` reads every tensor and refuses a file whose bytes
do not match its digests, or that holds NaN or infinite values. A file saved
without digests (by an older release or another tool) loads after a one-line
notice per file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = [
    "DIGEST_KEY",
    "LABELS_KEY",
    "classifier_head",
    "read_labels",
    "tensor_sha256",
    "verify_adapter_file",
    "write_metadata",
]

DIGEST_KEY = "alore.sha256"
LABELS_KEY = "alore.labels"


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as safetensors stores them (row-major, little-endian): its saved digest."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _labels_of(model: Any) -> Optional[list[str]]:
    """The class names of a transformers model's config, unless they are the defaults ``LABEL_i``."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if not id2label:
        return None
    labels = [str(id2label[i]) for i in sorted(id2label, key=int)]
    if labels == [f"LABEL_{i}" for i in range(len(labels))]:
        return None
    return labels


def _read_raw(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (JSON) and data region, as stored."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _stored_digests(header: dict, data: bytes) -> dict[str, str]:
    """SHA-256 of every tensor's bytes in the data region (``data_offsets`` are relative to its start)."""
    return {
        name: hashlib.sha256(data[entry["data_offsets"][0] : entry["data_offsets"][1]]).hexdigest()
        for name, entry in sorted(header.items())
        if name != "__metadata__"
    }


def write_metadata(path: str | os.PathLike, base_model: Any = None) -> None:
    """Add the tensors' digests (and ``base_model``'s class names) to a saved safetensors file, in place.

    Only the header changes: the data region is copied byte for byte, and the
    metadata is written with sorted keys, so the same tensors always give the
    same file. It is written to a temporary name next to the original and
    renamed over it, so an interruption leaves either the old or the new file.
    """
    path = Path(path)
    header, data = _read_raw(path)
    metadata = dict(header.pop("__metadata__", None) or {})
    metadata[DIGEST_KEY] = json.dumps(_stored_digests(header, data), sort_keys=True)
    labels = _labels_of(base_model)
    if labels is not None:
        metadata[LABELS_KEY] = json.dumps(labels)
    text = json.dumps({"__metadata__": dict(sorted(metadata.items())), **header}, separators=(",", ":"))
    encoded = text.encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data region to 8 bytes
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    os.replace(temporary, path)


def _metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def read_labels(path: str | os.PathLike) -> Optional[list[str]]:
    """The class names recorded in an adapter file, or ``None``."""
    if not Path(path).is_file():
        return None
    try:
        text = _metadata(path).get(LABELS_KEY)
        labels = json.loads(text) if text else None
    except Exception:  # an unreadable file is reported by whoever loads its tensors
        return None
    return [str(name) for name in labels] if isinstance(labels, list) else None


def classifier_head(path: str | os.PathLike) -> Optional[tuple[int, Optional[list[str]]]]:
    """``(num_labels, class names or None)`` of the classifier head saved in an adapter file, if it has one.

    The head is a ``modules_to_save`` weight whose name ends in ``classifier.weight``
    (the name transformers' image classifiers use).
    """
    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            rows = [
                handle.get_slice(key).get_shape()[0]
                for key in handle.keys()
                if key.endswith("classifier.weight") and len(handle.get_slice(key).get_shape()) == 2
            ]
    except Exception:  # an unreadable file is reported by whoever loads its tensors
        return None
    if not rows:
        return None
    labels = read_labels(path)
    return rows[0], labels if labels is not None and len(labels) == rows[0] else None


_NOTICED: set[str] = set()


def verify_adapter_file(path: str | os.PathLike) -> None:
    """Read every tensor of an adapter file; refuse damaged bytes and non-finite weights.

    Raises:
        ValueError: If the file cannot be read, a tensor's bytes differ from the
            digest written when it was saved, or a weight is NaN or infinite.
            The message names the file and the tensors.
    """
    from safetensors import safe_open

    path = str(path)
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ValueError(
            f"The adapter weights file {path} is truncated or corrupted ({type(exc).__name__}: {exc}). Nothing was "
            "loaded and the base model is unchanged; save the adapter again (model.save_pretrained) or copy the "
            "file again."
        ) from exc
    fix = (
        "Nothing was loaded and the base model is unchanged; copy the file again from where it was saved, or save "
        "the adapter again (model.save_pretrained)."
    )
    if DIGEST_KEY in metadata:
        try:
            digests = json.loads(metadata[DIGEST_KEY])
        except json.JSONDecodeError as exc:
            raise ValueError(f"The adapter weights file {path} has an unreadable {DIGEST_KEY} digest. {fix}") from exc
        stored = _stored_digests(*_read_raw(Path(path)))
        changed = sorted(key for key in tensors if digests.get(key) != stored.get(key))
        gone = sorted(set(digests) - set(tensors))
        if changed or gone:
            detail = []
            if changed:
                detail.append(f"the bytes of {len(changed)} tensor(s) differ from their saved SHA-256: {changed[:3]}")
            if gone:
                detail.append(f"{len(gone)} saved tensor(s) are missing: {gone[:3]}")
            raise ValueError(f"The adapter weights file {path} is corrupted: {'; '.join(detail)}. {fix}")
    elif path not in _NOTICED:
        _NOTICED.add(path)
        warnings.warn(
            f"{path} has no {DIGEST_KEY} integrity digest (saved by an older alore-peft or another tool), so damaged "
            "bytes cannot be detected; save it again with alore-peft to add one.",
            UserWarning,
            stacklevel=3,
        )
    bad = sorted(key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise ValueError(
            f"The adapter weights file {path} holds NaN or infinite values in {len(bad)} tensor(s): {bad[:3]}. The "
            "training that produced it diverged; nothing was loaded and the base model is unchanged. Train again "
            "(e.g. with a lower learning rate) or load an earlier checkpoint."
        )
