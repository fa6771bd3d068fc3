"""The WildlifeDatasets CSV loader: parsing, path resolution, and errors a person can act on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reidal.core.validation import check_labels
from reidal.data.wildlife import load_wildlife_csv

ZEBRA = Path("/work/shared/data/zebra-rapid/metadata.csv")


def write(folder: Path, text: str, images: tuple[str, ...] = (), name: str = "meta.csv") -> Path:
    for rel in images:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"not really a jpeg")
    csv_path = folder / name
    csv_path.write_text(text)
    return csv_path


def test_loads_required_and_optional_columns(tmp_path):
    csv_path = write(
        tmp_path,
        "image_id,identity,path,species,date,split,viewpoint,camera\n"
        "a,zed,img/a.jpg,zebra,2024-01-02,train,left,c1\n"
        "b,,img/b.jpg,zebra,,test,right,c2\n"
        "c,Unknown,img/c.jpg,zebra,,test,left,c1\n"
        "d,zed,img/d.jpg,zebra,,train,left,c3\n"
        "e,amy,img/e.jpg,zebra,,database,left,c3\n",
        images=("img/a.jpg", "img/b.jpg", "img/c.jpg", "img/d.jpg", "img/e.jpg"),
    )
    ds = load_wildlife_csv(csv_path)
    assert len(ds) == 5
    assert ds.root == tmp_path
    assert list(ds.image_ids) == ["a", "b", "c", "d", "e"]
    assert list(ds.identities) == ["zed", None, None, "zed", "amy"]
    assert ds.identity_names == ["amy", "zed"]
    labels = ds.labels()
    assert labels.tolist() == [1, -1, -1, 1, 0]
    check_labels(labels, len(ds))  # the -1 convention the core accepts
    assert ds.is_labelled.tolist() == [True, False, False, True, True]
    assert ds[0].path == tmp_path / "img" / "a.jpg"
    assert ds[0].metadata == {
        "species": "zebra", "date": "2024-01-02", "split": "train", "viewpoint": "left",
        "camera": "c1",
    }
    assert list(ds.splits) == ["train", "test", "test", "train", "database"]
    assert list(ds.column("camera")) == ["c1", "c2", "c1", "c3", "c3"]
    assert ds.column("no_such_column") is None

    train = ds.filter_split("train")
    assert [r.image_id for r in train] == ["a", "d"]
    assert [r.image_id for r in ds.filter_split("test", "database")] == ["b", "c", "e"]
    with pytest.raises(ValueError, match="unknown split"):
        ds.filter_split("validation")
    sub = ds.subset(np.array([True, False, False, False, True]))
    assert [r.image_id for r in sub] == ["a", "e"]
    assert [r.image_id for r in ds.subset([4, 0])] == ["e", "a"]
    with pytest.raises(ValueError, match="length 5"):
        ds.subset(np.array([True, False]))


def test_paths_resolve_against_root_and_absolute_paths_stay(tmp_path):
    images = tmp_path / "elsewhere"
    absolute = tmp_path / "abs" / "x.jpg"
    absolute.parent.mkdir()
    absolute.write_bytes(b"x")
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    csv_path = write(
        meta_dir,
        f"image_id,identity,path\nr,1,pics/r.jpg\nx,2,{absolute}\n",
    )
    write(images, "", images=("pics/r.jpg",), name="unused.csv")
    ds = load_wildlife_csv(csv_path, root=images)
    assert ds.root == images
    assert ds[0].path == images / "pics" / "r.jpg"
    assert ds[1].path == absolute
    assert ds.splits is None
    with pytest.raises(ValueError, match="no 'split' column"):
        ds.filter_split("train")


def test_byte_order_mark_and_blank_lines_are_tolerated(tmp_path):
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(
        "\ufeffimage_id,identity,path\n\na,1,a.jpg\n\n".encode()
    )
    ds = load_wildlife_csv(csv_path, check_files=False)
    assert list(ds.image_ids) == ["a"]


def test_missing_column_names_file_line_and_column(tmp_path):
    csv_path = write(tmp_path, "image_id,path\na,a.jpg\n")
    with pytest.raises(ValueError) as err:
        load_wildlife_csv(csv_path)
    msg = str(err.value)
    assert str(csv_path) in msg and "line 1" in msg and "identity" in msg


def test_duplicate_image_id_names_both_lines(tmp_path):
    csv_path = write(
        tmp_path, "image_id,identity,path\na,1,a.jpg\nb,1,b.jpg\na,2,c.jpg\n",
        images=("a.jpg", "b.jpg", "c.jpg"),
    )
    with pytest.raises(ValueError, match=r"line 4: duplicate image_id 'a' \(first on line 2\)"):
        load_wildlife_csv(csv_path)


def test_missing_file_is_reported_unless_checks_are_off(tmp_path):
    csv_path = write(
        tmp_path, "image_id,identity,path\na,1,a.jpg\nb,1,gone.jpg\n", images=("a.jpg",)
    )
    with pytest.raises(ValueError, match=r"line 3: image file not found: .*gone\.jpg"):
        load_wildlife_csv(csv_path)
    assert len(load_wildlife_csv(csv_path, check_files=False)) == 2


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("a,1\n", "line 2: expected 3 fields, found 2"),
        ("a,1,a.jpg,extra\n", "line 2: expected 3 fields, found 4"),
        (",1,a.jpg\n", "line 2: empty image_id"),
        ("a,1,\n", "line 2: empty path"),
    ],
)
def test_malformed_rows_name_the_line(tmp_path, body, problem):
    csv_path = write(tmp_path, "image_id,identity,path\n" + body)
    with pytest.raises(ValueError, match=problem):
        load_wildlife_csv(csv_path, check_files=False)


def test_empty_and_absent_files(tmp_path):
    empty = write(tmp_path, "")
    with pytest.raises(ValueError, match="empty"):
        load_wildlife_csv(empty)
    with pytest.raises(ValueError, match="cannot open"):
        load_wildlife_csv(tmp_path / "nope.csv")
    dup = write(tmp_path, "image_id,identity,path,path\n", name="dup.csv")
    with pytest.raises(ValueError, match="more than once"):
        load_wildlife_csv(dup)


@pytest.mark.skipif(not ZEBRA.is_file(), reason="zebra-rapid is not present on this machine")
def test_loads_the_zebra_rapid_set():
    ds = load_wildlife_csv(ZEBRA)
    assert len(ds) == 362
    assert len(ds.identity_names) == 35
    assert ds.is_labelled.all()
    assert set(ds.splits) == {"database", "query"}
    assert len(ds.filter_split("query")) == 84
    assert all(r.path.is_file() for r in ds)
    assert set(ds.column("viewpoint")) == {"left"}
