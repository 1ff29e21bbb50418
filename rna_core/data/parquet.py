"""Image datasets as Parquet files: one row per image, the encoded PNG/JPEG bytes in it.

Why Parquet: one file per split travels through object stores and Ray's working dir, pyarrow
reads it from ``s3://``/``gs://``/local paths alike, and the class names ride along in the
schema metadata, so a file is self-describing.

Format: columns ``image`` (binary, encoded image file), ``label``
(int16), optional ``index_in_class`` (int32); schema metadata key ``dataset`` holds JSON with
at least ``classes``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image

from rna_core.data.tensor_dataset import ImageTensorDataset
from rna_core.errors import ConfigError, DatasetNotFoundError

METADATA_KEY = b"dataset"
PREPARE_HINT = "python jobs/prepare_data.py --dataset cifar10 --out DIR"
_ENCODINGS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG"}
# Chunks big enough that thread hand-off is negligible next to ~50 us per 32x32 decode.
_CHUNK = 2048


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem and in-filesystem path for a local path or a pyarrow-understood URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise ConfigError(
            f"cannot open dataset URI {uri!r}: {_first_line(e)}; "
            "use a local path or a URI pyarrow supports (file://, s3://, gs://)"
        ) from e


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _file_info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as e:  # object-store credentials, network, permissions
        raise DatasetNotFoundError(f"cannot reach dataset file {uri}: {_first_line(e)}") from e


def dataset_exists(uri: str) -> bool:
    """Whether ``uri`` names an existing file (used to pick Parquet over torchvision)."""
    fs, path = _resolve(uri)
    return _file_info(fs, path, uri).type == pafs.FileType.File


def _run_chunks(n: int, work: Callable[[int, int], None], threads: int | None) -> None:
    """Run ``work(start, stop)`` over ``[0, n)`` in chunks, optionally on a thread pool.

    The codecs release the GIL, but for 32x32 images the per-image Python overhead dominates:
    on 2 cores, 2 threads were no faster (often slower) than 1 for both decode and encode of
    CIFAR, hence the default of 1. ``threads=None`` uses every core, for larger images.
    """
    if threads is None:
        threads = os.cpu_count() or 1
    bounds = [(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]
    if threads <= 1 or len(bounds) <= 1:
        for s, e in bounds:
            work(s, e)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for f in [pool.submit(work, s, e) for s, e in bounds]:
            f.result()


def _decode_pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)


def _torchvision_decoder() -> Callable[[bytes], np.ndarray] | None:
    """torchvision's libjpeg-turbo/libpng decode: ~3x faster than PIL on 32x32 JPEGs, same pixels.

    torchvision 0.29 deprecates its image codecs (in favour of torchcodec); when they are gone
    or not built, this returns None and PIL takes over.
    """
    try:
        from torchvision.io import ImageReadMode, decode_image
    except Exception:
        return None

    def decode(data: bytes) -> np.ndarray:
        # bytearray: a writable copy (a few KB), since torch warns on read-only buffers.
        chw = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return chw.permute(1, 2, 0).numpy()

    return decode


def decode_images(blobs: Sequence[bytes], threads: int | None = 1, backend: str = "auto") -> torch.Tensor:
    """Decode encoded images (all one size) into one ``(N, 3, H, W)`` uint8 tensor.

    ``backend``: "torchvision", "pil", or "auto" (torchvision when it can decode the first
    image, else PIL). Both give identical pixels for PNG and for this project's JPEG files.
    """
    if backend not in ("auto", "torchvision", "pil"):
        raise ConfigError(f"unknown image decoder {backend!r}; use auto, torchvision or pil")
    n = len(blobs)
    if n == 0:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    with warnings.catch_warnings():
        # One deprecation notice per image would bury real warnings; see _torchvision_decoder.
        warnings.simplefilter("ignore", DeprecationWarning)
        decode, first = _pick_decoder(blobs[0], backend)
        if first.ndim != 3 or first.shape[2] != 3:
            raise ConfigError(f"image 0 decodes to shape {first.shape}, expected (H, W, 3)")
        out = np.empty((n, *first.shape), dtype=np.uint8)  # NHWC: what both decoders hand out
        out[0] = first

        def work(start: int, stop: int) -> None:
            for i in range(max(start, 1), stop):
                arr = _checked(decode, blobs[i], i)
                if arr.shape != first.shape:
                    raise ConfigError(
                        f"image {i} is {arr.shape[1]}x{arr.shape[0]} but image 0 is "
                        f"{first.shape[1]}x{first.shape[0]}; all images of a dataset must share one size"
                    )
                out[i] = arr

        _run_chunks(n, work, threads)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _checked(decode: Callable[[bytes], np.ndarray], data: bytes, i: int) -> np.ndarray:
    """Decode one image; a corrupt one is the file's fault, reported as one line."""
    try:
        return decode(data)
    except (OSError, RuntimeError, ValueError) as e:  # PIL: UnidentifiedImageError is an OSError
        raise ConfigError(f"image {i} cannot be decoded ({_first_line(e)})") from e


def _pick_decoder(sample: bytes, backend: str) -> tuple[Callable[[bytes], np.ndarray], np.ndarray]:
    """The decoder to use and the decoded ``sample``; falls back to PIL when torchvision fails."""
    if backend != "pil":
        tv = _torchvision_decoder()
        if tv is not None:
            try:
                return tv, tv(sample)
            except RuntimeError:  # codec not built, or a format it does not read
                if backend == "torchvision":
                    return tv, _checked(tv, sample, 0)
        elif backend == "torchvision":
            raise ConfigError("torchvision image decoding is unavailable; install torchvision or use backend='pil'")
    return _decode_pil, _checked(_decode_pil, sample, 0)


def read_parquet_dataset(
    uri: str, name: str | None = None, threads: int | None = 1, backend: str = "auto"
) -> ImageTensorDataset:
    """Read a dataset file (local path or URI) and decode every image once."""
    table, schema, path = _open_dataset(uri, read=True)
    meta = _read_metadata(schema, uri)
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    try:
        images = decode_images(table.column("image").to_pylist(), threads=threads, backend=backend)
    except ConfigError as e:
        raise ConfigError(f"{uri}: {e}; recreate it with `{PREPARE_HINT}`") from e
    classes = meta.get("classes")
    if not classes:  # tolerate foreign files: name classes by their index
        classes = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    classes = [str(c) for c in classes]
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise ConfigError(
            f"{uri} has labels outside 0..{len(classes) - 1} for its {len(classes)} classes; "
            f"recreate it with `{PREPARE_HINT}`"
        )
    if name is None:
        name = str(meta.get("name") or Path(path).stem)
    return ImageTensorDataset(images=images, labels=labels, classes=classes, name=name)


def check_parquet_dataset(uri: str) -> None:
    """Fail with one line unless `uri` is a readable dataset file (schema and metadata only).

    For drivers: a corrupt or foreign file is reported before a cluster starts, not in a worker.
    """
    _, schema, _ = _open_dataset(uri, read=False)
    _read_metadata(schema, uri)


def dataset_rows(uri: str) -> int:
    """Number of examples in a dataset file, from the Parquet footer (no image is read)."""
    fs, path = _resolve(uri)
    with fs.open_input_file(path) as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def _open_dataset(uri: str, read: bool) -> tuple[pa.Table | None, pa.Schema, str]:
    """(the image and label columns if `read`, the schema, the path), or one-line errors."""
    fs, path = _resolve(uri)
    if _file_info(fs, path, uri).type != pafs.FileType.File:
        raise DatasetNotFoundError(
            f"dataset file not found: {uri}; create it with `{PREPARE_HINT}` or point data_dir elsewhere"
        )
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            missing = [c for c in ("image", "label") if c not in schema.names]
            if missing:
                raise ConfigError(
                    f"{uri} is not an image dataset file: missing column(s) {', '.join(missing)} "
                    f"(has {', '.join(schema.names)}); write it with `{PREPARE_HINT}`"
                )
            table = pf.read(columns=["image", "label"]) if read else None
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(
            f"{uri} is not a readable Parquet file ({_first_line(e)}); recreate it with `{PREPARE_HINT}`"
        ) from e
    return table, schema, path


def _read_metadata(schema: pa.Schema, uri: str) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{uri} has invalid JSON in schema metadata key 'dataset' ({e.msg}); recreate it with `{PREPARE_HINT}`"
        ) from e
    return meta if isinstance(meta, dict) else {}


def _to_nhwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 NHWC numpy array; NCHW input (channels at dim 1) is transposed."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ConfigError(f"images must be a uint8 array of shape (N,H,W,3) or (N,3,H,W), got {arr.dtype} {arr.shape}")
    if arr.shape[1] == 3:  # NCHW wins ties (N,3,H,3): it is this project's layout
        arr = arr.transpose(0, 2, 3, 1)
    elif arr.shape[3] != 3:
        raise ConfigError(f"images must have 3 channels in dim 1 or 3, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def index_in_class(labels: np.ndarray) -> np.ndarray:
    """For each row, how many earlier rows share its label (0-based rank within the class)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_labels)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    out = np.empty(len(labels), dtype=np.int32)
    out[order] = np.arange(len(labels)) - group_start
    return out


def write_parquet_dataset(
    path: str | os.PathLike[str],
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    classes: Sequence[str],
    name: str,
    encoding: str = "png",
    jpeg_quality: int = 95,
    threads: int | None = 1,
) -> Path:
    """Write a dataset file atomically: readers never see a half-written file.

    The file is written next to its destination and moved into place with ``os.replace``,
    so an interrupted run leaves either the old file or none. Only local paths (or
    ``file://`` URIs) are supported: write locally, then copy to an object store.
    """
    fmt = _ENCODINGS.get(encoding.lower())
    if fmt is None:
        raise ConfigError(f"unknown image encoding {encoding!r}; use one of png, jpeg")
    path_s = os.fspath(path)
    if path_s.startswith("file://"):
        path_s = pafs.FileSystem.from_uri(path_s)[1]
    elif "://" in path_s:
        raise ConfigError(f"cannot write {path_s} directly; write a local file, then copy it to the object store")
    dest = Path(path_s).expanduser().resolve()

    arr = _to_nhwc(images)
    lab = (labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)).astype(np.int64)
    if lab.shape != (arr.shape[0],):
        raise ConfigError(f"got {arr.shape[0]} images but labels of shape {lab.shape}")
    if len(lab) and (lab.min() < 0 or lab.max() >= len(classes)):
        raise ConfigError(
            f"labels must lie in 0..{len(classes) - 1} for {len(classes)} classes, got {lab.min()}..{lab.max()}"
        )

    blobs: list[bytes] = [b""] * len(arr)
    save_kw: dict[str, Any] = {"quality": jpeg_quality} if fmt == "JPEG" else {}

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            buf = io.BytesIO()
            Image.fromarray(arr[i]).save(buf, format=fmt, **save_kw)
            blobs[i] = buf.getvalue()

    _run_chunks(len(arr), work, threads)

    meta = {
        "name": name,
        "classes": [str(c) for c in classes],
        "encoding": fmt.lower(),
        "num_rows": int(len(arr)),
        "image_size": [int(arr.shape[1]), int(arr.shape[2])] if len(arr) else [0, 0],
        "order": "as written",
    }
    table = pa.table(
        {
            "image": pa.array(blobs, type=pa.binary()),
            "label": pa.array(lab.astype(np.int16), type=pa.int16()),
            "index_in_class": pa.array(index_in_class(lab), type=pa.int32()),
        }
    ).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the shared dataset unreadable to others
        pq.write_table(table, tmp)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return dest
