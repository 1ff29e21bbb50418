"""Tests of rna_core.data: Parquet format, batching, augmentation, synthetic data, prepare_data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rna_core.data import (
    BatchIterator,
    ImageTensorDataset,
    crop_flip,
    load_dataset,
    make_synthetic,
    num_classes_of,
    random_crop_flip,
    read_parquet_dataset,
    write_parquet_dataset,
)
from rna_core.data import parquet as parquet_mod
from rna_core.errors import ConfigError, DatasetNotFoundError

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10"
CLASSES = ["a", "b", "c"]


def _random_dataset(n: int = 40, size: int = 8, seed: int = 0) -> ImageTensorDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, len(CLASSES), (n,), generator=gen)
    return ImageTensorDataset(images, labels, list(CLASSES), "rand")


# ---------------------------------------------------------------------------------- Parquet


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_parquet_png_round_trip_is_exact(tmp_path: Path, layout: str) -> None:
    ds = _random_dataset()
    images = ds.images if layout == "nchw" else ds.images.permute(0, 2, 3, 1).numpy()
    path = write_parquet_dataset(tmp_path / "d.parquet", images, ds.labels, CLASSES, name="toy")
    back = read_parquet_dataset(str(path))
    assert torch.equal(back.images, ds.images)
    assert torch.equal(back.labels, ds.labels) and back.labels.dtype == torch.int64
    assert back.classes == CLASSES and back.name == "toy"
    table = pq.read_table(path)
    assert table.schema.field("label").type == pa.int16()
    assert json.loads(table.schema.metadata[b"dataset"])["classes"] == CLASSES
    idx = table.column("index_in_class").to_pylist()
    labels = ds.labels.tolist()
    assert idx == [labels[:i].count(labels[i]) for i in range(len(labels))]
    assert [p.name for p in tmp_path.iterdir()] == ["d.parquet"]  # no temp file left behind


def test_parquet_backends_agree_on_jpeg(tmp_path: Path) -> None:
    ramp = torch.linspace(0, 255, 16)
    smooth = (ramp[None, None, :, None] + ramp[None, None, None, :]) / 2 + torch.arange(3)[None, :, None, None] * 20
    images = (smooth + torch.arange(8)[:, None, None, None] * 3).clamp(0, 255).to(torch.uint8)
    path = write_parquet_dataset(tmp_path / "j.parquet", images, torch.zeros(8), ["x"], "j", encoding="jpeg")
    pil = read_parquet_dataset(str(path), backend="pil")
    auto = read_parquet_dataset(str(path), threads=2)
    assert torch.equal(pil.images, auto.images)
    assert (pil.images.float() - images.float()).abs().mean() < 4  # lossy but close


def test_parquet_file_uri(tmp_path: Path) -> None:
    ds = _random_dataset(n=5)
    path = write_parquet_dataset(tmp_path / "u.parquet", ds.images, ds.labels, CLASSES, name="u")
    back = read_parquet_dataset(path.as_uri(), name="renamed")
    assert back.name == "renamed" and torch.equal(back.images, ds.images)


def test_parquet_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "train.parquet"
    with pytest.raises(DatasetNotFoundError) as err:
        read_parquet_dataset(str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "prepare_data.py" in msg and "\n" not in msg


def test_parquet_wrong_schema(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"pixels": [b"x"], "label": pa.array([0], pa.int16())}), path)
    with pytest.raises(ConfigError, match="image"):
        read_parquet_dataset(str(path))
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError):
        read_parquet_dataset(str(path))
    pq.write_table(pa.table({"image": [b"junk"], "label": pa.array([0], pa.int16())}), path)
    with pytest.raises(ConfigError, match="cannot be decoded"):
        read_parquet_dataset(str(path))


def test_parquet_write_failure_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _random_dataset(n=4)
    dest = write_parquet_dataset(tmp_path / "d.parquet", ds.images, ds.labels, CLASSES, "old")
    before = dest.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(parquet_mod.pq, "write_table", boom)
    with pytest.raises(OSError):
        write_parquet_dataset(dest, ds.images, ds.labels, CLASSES, "new")
    assert dest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.parquet"]
    with pytest.raises(ConfigError):  # label 2 with only 2 classes: rejected before writing
        write_parquet_dataset(tmp_path / "e.parquet", ds.images, torch.full((4,), 2), ["a", "b"], "e")
    assert not (tmp_path / "e.parquet").exists()


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="shared CIFAR-10 copy not present (CI)")
def test_shared_exact_cifar_rows() -> None:
    ds = read_parquet_dataset(str(SHARED_CIFAR / "test_exact_first100.parquet")).head(10)
    assert ds.images.shape == (10, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.classes[:3] == ["airplane", "automobile", "bird"]
    assert ds.labels.tolist()[:4] == [3, 8, 8, 0]  # cat, ship, ship, airplane: CIFAR-10 test order


# ---------------------------------------------------------------------- dataset and batching


def test_subset_head_shard() -> None:
    ds = _random_dataset(n=10)
    assert len(ds.head(3)) == 3 and torch.equal(ds.head(3).images, ds.images[:3])
    assert torch.equal(ds.subset([4, 1]).labels, ds.labels[torch.tensor([4, 1])])
    shards = [ds.shard(r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # 10 % 3 = 1 row dropped so ranks step together
    rows = [tuple(s.images.flatten(1)[i].tolist()) for s in shards for i in range(len(s))]
    assert len(set(rows)) == 9  # disjoint
    with pytest.raises(ValueError):
        ds.shard(3, 3)


def test_batch_iterator_epochs() -> None:
    ds = _random_dataset(n=23)
    ds.labels = torch.arange(23)  # label = row id, to track coverage
    it = BatchIterator(ds, batch_size=5, shuffle=True, seed=7)
    assert len(it) == 5
    first = [y for _, y in it]
    again = [y for _, y in BatchIterator(ds, batch_size=5, shuffle=True, seed=7)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert sorted(torch.cat(first).tolist()) == list(range(23))
    it.set_epoch(1)
    second = torch.cat([y for _, y in it])
    assert sorted(second.tolist()) == list(range(23)) and not torch.equal(second, torch.cat(first))
    x, y = next(iter(BatchIterator(ds, 4, shuffle=False, seed=0)))
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3]
    assert torch.allclose(x * 255, ds.images[:4].float())
    assert len(BatchIterator(ds, 5, shuffle=False, seed=0, drop_last=True)) == 4
    assert sum(len(y) for _, y in BatchIterator(ds, 5, False, 0, drop_last=True)) == 20


def test_batch_iterator_augment_reproducible() -> None:
    ds = _random_dataset(n=16)
    a = [x for x, _ in BatchIterator(ds, 8, shuffle=True, seed=1, augment=True)]
    b = [x for x, _ in BatchIterator(ds, 8, shuffle=True, seed=1, augment=True)]
    plain = [x for x, _ in BatchIterator(ds, 8, shuffle=True, seed=1)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, plain))


# ------------------------------------------------------------------------------ augmentation


def test_crop_flip_identity_and_flip() -> None:
    x = torch.rand(4, 3, 6, 5)
    p = 2
    same = torch.full((4,), p)
    no = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(crop_flip(x, same, same, no, p), x)
    assert torch.equal(crop_flip(x, same, same, ~no, p), x.flip(-1))
    shifted = crop_flip(x, torch.zeros(4, dtype=torch.long), same, no, p)  # window moved up by p
    assert torch.equal(shifted[:, :, p:], x[:, :, :-p]) and (shifted[:, :, :p] == 0).all()


def test_random_crop_flip() -> None:
    x = torch.rand(64, 3, 8, 8)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    again = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, again)
    assert not torch.equal(out, random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(1)))
    changed = (out != x).flatten(1).any(1)
    assert changed.sum() > 32  # unchanged only for offset (2,2) and no flip: 1/50 per example
    assert ((out == 0).flatten(1).any(1)).sum() > 16  # off-centre crops bring in zero padding
    only_flip = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(2))
    is_flip = [torch.equal(only_flip[i], x[i].flip(-1)) for i in range(64)]
    is_same = [torch.equal(only_flip[i], x[i]) for i in range(64)]
    assert all(a or b for a, b in zip(is_flip, is_same)) and 10 < sum(is_flip) < 54


# -------------------------------------------------------------------------------- synthetic


def test_synthetic_reproducible_and_separable() -> None:
    train = make_synthetic(400, seed=5)
    again = make_synthetic(400, seed=5)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    test = make_synthetic(200, seed=5, split="test")
    assert not torch.equal(test.images[:50], train.images[:50])
    assert torch.bincount(train.labels).tolist() == [40] * 10
    xtr, xte = train.images.flatten(1).float(), test.images.flatten(1).float()
    means = torch.stack([xtr[train.labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(xte, means).argmin(1)
    assert (pred == test.labels).float().mean() > 0.9
    other = make_synthetic(200, seed=6, split="test")  # another task: train means do not fit
    assert (torch.cdist(other.images.flatten(1).float(), means).argmin(1) == other.labels).float().mean() < 0.5


def test_synthetic_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_synthetic(20)
    assert torch.equal(torch.rand(3), expected)


# -------------------------------------------------------------------------------- resolution


def test_load_dataset_resolution(tmp_path: Path) -> None:
    assert [len(load_dataset("synthetic", s, synthetic_size=100)) for s in ("train", "test")] == [100, 64]
    assert num_classes_of("cifar100") == 100
    with pytest.raises(ConfigError, match="cifar10, cifar100, synthetic"):
        load_dataset("imagenet", "train")
    with pytest.raises(ConfigError):
        load_dataset("synthetic", "val")
    ten = make_synthetic(20, image_size=8)
    write_parquet_dataset(tmp_path / "test.parquet", ten.images, ten.labels, ten.classes, "t")
    got = load_dataset("cifar10", "test", data_dir=tmp_path.as_uri())
    assert torch.equal(got.images, ten.images) and got.name == "cifar10-test"
    with pytest.raises(ConfigError, match="classes"):
        load_dataset("cifar100", "test", data_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", "train", data_dir=str(tmp_path))
    assert str(tmp_path) in str(err.value) and "prepare_data.py" in str(err.value)


# ------------------------------------------------------------------------------ prepare_data


def _prepare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "prepare_data.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.slow  # runs the job as a process (twice)
def test_prepare_data_bad_dataset(tmp_path: Path) -> None:
    res = _prepare("--dataset", "mnist", "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "mnist" in res.stderr and "Traceback" not in res.stderr
    out, root = str(tmp_path / "out"), str(tmp_path / "empty")
    res = _prepare("--dataset", "cifar10", "--out", out, "--root", root, "--no-download")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "drop --no-download" in res.stderr and "run `python jobs/prepare_data.py" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_prepare_data_writes_both_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import rna_core.data.torchvision_data as tv_data

    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "jobs" / "prepare_data.py")
    assert spec is not None and spec.loader is not None
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    fake = {
        True: make_synthetic(30, image_size=8, seed=1),
        False: make_synthetic(10, image_size=8, seed=1, split="test"),
    }
    monkeypatch.setattr(tv_data, "load_torchvision_cifar", lambda name, root, train, download: fake[train])
    assert job.main(["--dataset", "cifar10", "--out", str(tmp_path), "--no-download"]) == 0
    for split, train in (("train", True), ("test", False)):
        back = read_parquet_dataset(str(tmp_path / f"{split}.parquet"))
        assert torch.equal(back.images, fake[train].images) and back.name == f"cifar10-{split}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.parquet", "train.parquet"]
