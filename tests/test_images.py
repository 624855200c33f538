"""Image checks and normalisation on a corpus of bad and odd files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ImageLimits, IngestConfig
from pipeline.images import decode_rgb, inspect_image, read_uri, to_rgb
from pipeline.listing import ListingError, read_listing
from tests.bad_images import EXPECTED, LIMITS, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder)
    return folder


@pytest.mark.parametrize("name", sorted(n for n, r in EXPECTED.items() if n not in ("missing.png", "a_directory.png")))
def test_each_file_is_accepted_or_rejected_with_its_reason(corpus, name):
    check = inspect_image((corpus / name).read_bytes(), ImageLimits(**LIMITS))
    expected = EXPECTED[name]
    if expected is None:
        assert check.ok, (name, check)
        assert len(check.sha256) == 64 and check.width > 0 and check.height > 0
        rgb = decode_rgb((corpus / name).read_bytes(), ImageLimits(**LIMITS))
        assert rgb.mode == "RGB" and rgb.size == (check.width, check.height)
    else:
        assert not check.ok and check.reason == expected, (name, check)
        assert check.detail


def test_read_uri_errors(corpus):
    with pytest.raises(FileNotFoundError):
        read_uri(str(corpus / "missing.png"))
    with pytest.raises(IsADirectoryError):
        read_uri(str(corpus / "a_directory.png"))
    with pytest.raises(OverflowError):
        read_uri(str(corpus / "good.png"), max_bytes=10)


def test_to_rgb_keeps_information():
    gray16 = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    out = np.asarray(to_rgb(gray16))
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255 and 0 < out[0, 1, 0] < out[1, 0, 0] < 255  # rescaled, not clipped
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]  # transparent -> background
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


def test_same_bytes_same_id(corpus):
    data = (corpus / "good.png").read_bytes()
    a, b = inspect_image(data, ImageLimits()), inspect_image(bytes(data), ImageLimits())
    assert a.image_id == b.image_id and len(a.image_id) == 16


def test_listing_formats(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    cfg = IngestConfig(caption_columns=["caption", "alt"], image_column="path")
    rows = [{"path": "good.png", "caption": "one", "alt": ["two", "three"], "split": "val"}, {"path": str(corpus / "rgba.png"), "caption": None, "alt": ["x"], "split": "bogus"}]
    pq.write_table(pa.Table.from_pylist(rows), corpus / "l.parquet")
    table = read_listing(corpus / "l.parquet", cfg)
    assert table.column("uri").to_pylist() == [str(corpus / "good.png"), str(corpus / "rgba.png")]
    assert table.column("captions").to_pylist() == [["one", "two", "three"], ["x"]]
    assert table.column("split").to_pylist() == ["val", None]
    pacsv.write_csv(pa.table({"path": ["good.png"], "caption": ["from csv"]}), corpus / "l.csv")
    assert read_listing(corpus / "l.csv", cfg).column("captions").to_pylist() == [["from csv"]]
    with pytest.raises(ListingError, match="no image column 'picture'"):
        read_listing(corpus / "l.csv", IngestConfig(image_column="picture"))
    with pytest.raises(ListingError, match="does not exist"):
        read_listing(tmp_path / "nothing.jsonl", cfg)


def test_folder_with_sidecar_captions(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first caption\n\nsecond caption\n")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "sub" / "b.jpg")
    table = read_listing(tmp_path, IngestConfig())
    assert table.column("uri").to_pylist() == [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.jpg")]
    assert table.column("captions").to_pylist() == [["first caption", "second caption"], []]
