"""Eval-set adapters: each format -> a listing that `read_listing` accepts (pure Python, no Ray)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import IngestConfig
from pipeline.eval_sets import (
    FASHION_MNIST_CLASSES,
    read_idx,
    vqa_caption,
    vqa_facts,
    write_listing,
)
from pipeline.listing import read_listing


def _png(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)
    return path


def _read(path: Path) -> list[dict]:
    rows = read_listing(path, IngestConfig()).to_pylist()
    for r in rows:
        r["metadata"] = json.loads(r["metadata"]) if r["metadata"] else None
    return rows


def _assert_missing(made, name: str, rows: list[dict]) -> None:
    assert any(ref.endswith(name) and reason == "missing_file" for ref, reason in made.problems), made.problems
    assert not any(r["uri"].endswith(name) for r in rows)


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "imgs"
    _png(root / "a.png", (255, 0, 0))
    _png(root / "b.png", (0, 255, 0))
    _png(root / "val2014" / "c.png", (0, 0, 255))
    return root


def test_coco(tmp_path, images):
    ann = tmp_path / "captions_val.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}, {"id": 3, "file_name": "gone.png"},
                   {"id": 4, "file_name": "val2014/c.png"}],
        "annotations": [{"image_id": 1, "caption": "a red square"}, {"image_id": 1, "caption": " red block "},
                        {"image_id": 2, "caption": "a green square"}, {"image_id": 3, "caption": "lost"}],
    }))
    made = write_listing("coco", ann, tmp_path / "out" / "coco.parquet", image_root=images)
    rows = _read(made.path)
    assert made.kind == "coco" and made.rows == len(rows) == 2 and made.class_names is None
    assert [r["captions"] for r in rows] == [["a red square", "red block"], ["a green square"]]
    assert all(r["split"] == "test" and r["dense_captions"] == [] for r in rows)
    assert rows[0]["uri"] == str((images / "a.png").resolve()) and rows[0]["metadata"] == {"coco_id": 1}
    _assert_missing(made, "gone.png", rows)
    assert (str((images / "val2014" / "c.png").resolve()), "no_caption") in made.problems
    # default image_root is the JSON's folder; split option
    (tmp_path / "a.png").write_bytes((images / "a.png").read_bytes())
    made = write_listing("coco", ann, tmp_path / "c2.parquet", split="val")
    assert [r["split"] for r in _read(made.path)] == ["val"]


def test_coco_malformed(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"bad\.json.*'annotations'"):
        write_listing("coco", bad, tmp_path / "x.parquet")
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match=r"bad\.json.*images\[0\].*'file_name'"):
        write_listing("coco", bad, tmp_path / "x.parquet")
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        write_listing("coco", bad, tmp_path / "x.parquet")


def test_karpathy(tmp_path, images):
    src = tmp_path / "dataset_coco.json"
    src.write_text(json.dumps({"images": [
        {"filename": "a.png", "split": "test", "cocoid": 1, "sentences": [{"raw": "Red one."}, {"raw": "A red tile."}]},
        {"filename": "b.png", "split": "restval", "sentences": [{"raw": "Green one."}]},
        {"filepath": "val2014", "filename": "c.png", "split": "val", "sentences": [{"raw": "Blue one."}]},
        {"filename": "gone.png", "split": "test", "sentences": [{"raw": "Lost."}]},
    ]}))
    made = write_listing("karpathy", src, tmp_path / "k.parquet", image_root=images)
    rows = _read(made.path)
    assert made.rows == 1 and rows[0]["captions"] == ["Red one.", "A red tile."] and rows[0]["split"] == "test"
    assert rows[0]["metadata"] == {"cocoid": 1, "karpathy_split": "test"}
    _assert_missing(made, "gone.png", rows)
    made = write_listing("karpathy", src, tmp_path / "k2.parquet", image_root=images, splits=["restval", "val", "test"])
    rows = _read(made.path)
    assert {Path(r["uri"]).name: r["split"] for r in rows} == {"a.png": "test", "b.png": "train", "c.png": "val"}
    with pytest.raises(ValueError, match="splits"):
        write_listing("karpathy", src, tmp_path / "k3.parquet", splits=["dev"])
    src.write_text(json.dumps({"images": [{"split": "test", "sentences": []}]}))
    with pytest.raises(ValueError, match=r"dataset_coco\.json.*'filename'"):
        write_listing("karpathy", src, tmp_path / "k4.parquet")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_pairs(tmp_path, images, fmt):
    records = [
        {"img": str(images / "a.png"), "text": "a red square"},
        {"img": "imgs/a.png", "text": "red again"},
        {"img": "imgs/b.png", "text": "a green square"},
        {"img": "imgs/gone.png", "text": "lost"},
    ]
    src = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        records[2]["text"] = ["a green square", "green tile"]  # a list of captions
        src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), src)
    else:
        src.write_text("img,text\n" + "".join(f"{r['img']},{r['text']}\n" for r in records))
    made = write_listing("pairs", src, tmp_path / "out.parquet", image_column="img", caption_column="text")
    rows = _read(made.path)
    assert made.rows == 2 and [Path(r["uri"]).name for r in rows] == ["a.png", "b.png"]
    assert rows[0]["captions"] == ["a red square", "red again"]
    assert rows[1]["captions"] == (["a green square", "green tile"] if fmt == "jsonl" else ["a green square"])
    assert all(r["split"] == "test" and r["dense_captions"] == [] for r in rows)
    _assert_missing(made, "gone.png", rows)
    with pytest.raises(ValueError, match=r"pairs\.\w+.*'image'"):
        write_listing("pairs", src, tmp_path / "out2.parquet")


def test_pairs_uri_image_root(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"image": "x/1.jpg", "caption": "one"}) + "\n" + json.dumps({"image": None, "caption": "none"}))
    made = write_listing("pairs", src, tmp_path / "p.parquet", image_root="s3://bucket/set/")
    assert [r["uri"] for r in _read(made.path)] == ["s3://bucket/set/x/1.jpg"] and made.problems == [("None", "no_image")]


def test_long(tmp_path, images):
    src = tmp_path / "docci.jsonl"
    long_text = "A red square fills the frame. " * 5
    lines = [{"image": "imgs/a.png", "caption": long_text, "split": "val"},
             {"image": "imgs/b.png", "caption": "A green square on nothing at all."},
             {"image": "imgs/gone.png", "caption": "Lost."}]
    src.write_text("\n".join(json.dumps(r) for r in lines))
    made = write_listing("long", src, tmp_path / "long.parquet")
    rows = _read(made.path)
    assert made.rows == 2
    assert [r["dense_captions"] for r in rows] == [[long_text.strip()], ["A green square on nothing at all."]]
    assert all(r["captions"] == [] for r in rows)
    assert sorted(r["split"] for r in rows) == ["test", "val"]  # a row's own split wins
    _assert_missing(made, "gone.png", rows)


def test_folder(tmp_path):
    root = tmp_path / "tree"
    _png(root / "golden_retriever" / "1.png")
    _png(root / "golden_retriever" / "2.png")
    _png(root / "tabby_cat" / "x.png")
    (root / "tabby_cat" / "notes.txt").write_text("not an image")
    made = write_listing("folder", root, tmp_path / "f.parquet")
    rows = _read(made.path)
    assert made.class_names == ["golden retriever", "tabby cat"] and made.rows == 3 and made.problems == []
    assert [r["metadata"]["label"] for r in rows] == [0, 0, 1]
    assert rows[2]["metadata"] == {"label": 1, "class_name": "tabby cat"} and rows[2]["captions"] == ["tabby cat"]
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n")
    assert write_listing("folder", root, tmp_path / "f2.parquet", class_names=names).class_names == ["dog", "cat"]
    names_json = tmp_path / "names.json"
    names_json.write_text(json.dumps({"tabby_cat": "Cat", "golden_retriever": "Dog"}))
    made = write_listing("folder", root, tmp_path / "f3.parquet", class_names=names_json)
    assert made.class_names == ["Dog", "Cat"] and _read(made.path)[0]["captions"] == ["Dog"]
    names.write_text("dog\n")
    with pytest.raises(ValueError, match=r"names\.txt.*1 class names for 2"):
        write_listing("folder", root, tmp_path / "f4.parquet", class_names=names)
    names_json.write_text(json.dumps({"tabby_cat": "Cat"}))
    with pytest.raises(ValueError, match=r"names\.json.*'golden_retriever'"):
        write_listing("folder", root, tmp_path / "f5.parquet", class_names=names_json)


def _idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    magic = {3: 0x00000803, 1: 0x00000801}[array.ndim]
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_fashion_mnist_from_tiny_idx(tmp_path):
    src = tmp_path / "fm"
    src.mkdir()
    imgs = np.arange(4 * 28 * 28, dtype=np.uint32).reshape(4, 28, 28) % 256
    _idx(src / "t10k-images-idx3-ubyte.gz", imgs, gz=True)
    _idx(src / "t10k-labels-idx1-ubyte", np.array([9, 0, 9, 3]), gz=False)
    assert read_idx(src / "t10k-labels-idx1-ubyte").tolist() == [9, 0, 9, 3]
    made = write_listing("fashion_mnist", src, tmp_path / "out" / "fm.parquet", limit=3)
    rows = _read(made.path)
    assert made.kind == "fashion_mnist" and made.class_names == list(FASHION_MNIST_CLASSES) and made.rows == 3
    assert sorted((r["metadata"]["label"], r["captions"][0]) for r in rows) == [
        (0, "T-shirt/top"), (9, "Ankle boot"), (9, "Ankle boot")]
    first = next(r for r in rows if r["uri"].endswith("00000.png"))
    with Image.open(first["uri"]) as im:
        assert im.mode == "RGB" and im.size == (28, 28)
        assert np.array_equal(np.asarray(im)[..., 0], imgs[0].astype(np.uint8))
    made = write_listing("fashion_mnist", src, tmp_path / "out" / "fm.parquet", limit=1)  # earlier PNGs go
    assert made.rows == 1 and len(list((tmp_path / "out" / "fashion_mnist_test").rglob("*.png"))) == 1
    (tmp_path / "float.idx").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match=r"float\.idx: not an unsigned-byte IDX"):
        read_idx(tmp_path / "float.idx")
    (src / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09\x01")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.*do not match"):
        write_listing("fashion_mnist", src, tmp_path / "fm2.parquet")
    with pytest.raises(ValueError, match="no t10k-images"):
        write_listing("fashion_mnist", tmp_path, tmp_path / "fm3.parquet")


def test_fashion_mnist_debian_package(tmp_path):
    made = write_listing("fashion_mnist", None, tmp_path / "fm.parquet", limit=20)
    rows = _read(made.path)
    assert made.rows == 20 and made.problems == []
    assert all(r["captions"] == [FASHION_MNIST_CLASSES[r["metadata"]["label"]]] for r in rows)
    assert len({r["metadata"]["label"] for r in rows}) > 3


def test_vqa_rules():
    assert vqa_facts("what color is the shape?", "blue") == {"color": "blue"}
    assert vqa_facts("what is the color of the circle?", "red") == {"color": "red", "shape": "circle"}
    assert vqa_facts("what shape is in the image?", "circle") == {"shape": "circle"}
    assert vqa_facts("is there a red shape?", "yes") == {"color": "red"}
    assert vqa_facts("is there a red shape?", "no") == {}
    assert vqa_facts("is there not a teal triangle?", "no") == {"color": "teal", "shape": "triangle"}
    assert vqa_facts("is no green shape present?", "yes") == {}
    assert vqa_caption("blue", "circle") == "a blue circle"
    assert vqa_caption("blue", None) == "a blue shape" and vqa_caption(None, "circle") == "a circle"
    assert vqa_caption(None, None) is None


def test_easy_vqa_package(tmp_path):
    made = write_listing("easy_vqa", None, tmp_path / "vqa.parquet", limit=10)
    rows = _read(made.path)
    assert made.rows + len(made.problems) == 10 and made.rows >= 8
    for r in rows:
        (caption,) = r["captions"]
        meta = r["metadata"]
        assert caption == vqa_caption(meta.get("color"), meta.get("shape")) and r["split"] == "test"
        assert Path(r["uri"]).is_file()


def test_unknown_kind_and_bad_output(tmp_path, images):
    with pytest.raises(ValueError, match="unknown eval set kind 'imagenet'"):
        write_listing("imagenet", images, tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.jsonl.*\.parquet"):
        write_listing("folder", tmp_path, tmp_path / "x.jsonl")


# ---------------------------------------------------------------- sources on an S3-protocol server
@pytest.fixture
def bucket(s3, monkeypatch, request) -> str:
    """A fresh bucket on the rig's S3 server (conftest `s3`), its settings in this process's
    environment; a name unique to the test, as pipeline.uri keeps one filesystem per bucket."""
    import uuid

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3.bucket(f"evalsets-{request.node.name.replace('_', '-')[:30].lower()}-{uuid.uuid4().hex[:8]}")


def _put(bucket: str, key: str, data: bytes | str) -> str:
    import boto3

    # endpoint and credentials: the environment the `bucket` fixture set
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data.encode() if isinstance(data, str) else data)
    return f"s3://{bucket}/{key}"


def _png_bytes(color) -> bytes:
    import io

    out = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(out, "PNG")
    return out.getvalue()


def test_coco_and_pairs_on_s3(tmp_path, bucket):
    ann = _put(bucket, "coco/annotations/captions_val.json", json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "val/b.png"}, {"id": 3, "file_name": "s3://other/c.png"}],
        "annotations": [{"image_id": 1, "caption": "a red square"}, {"image_id": 2, "caption": "a green square"},
                        {"image_id": 3, "caption": "elsewhere"}]}))
    # relative images: beside the JSON by default, or under image_root (a URI prefix); URIs stay as they are
    made = write_listing("coco", ann, tmp_path / "coco.parquet")
    assert [r["uri"] for r in _read(made.path)] == [f"s3://{bucket}/coco/annotations/a.png",
                                                   f"s3://{bucket}/coco/annotations/val/b.png", "s3://other/c.png"]
    made = write_listing("coco", ann, tmp_path / "coco2.parquet", image_root=f"s3://{bucket}/coco/images/")
    rows = _read(made.path)
    assert made.path == tmp_path / "coco2.parquet" and made.rows == 3  # the listing is written locally
    assert rows[0]["uri"] == f"s3://{bucket}/coco/images/a.png" and rows[0]["captions"] == ["a red square"]
    # a local image_root under a URI source: checked on this disk as before
    _png(tmp_path / "imgs" / "a.png")
    made = write_listing("coco", ann, tmp_path / "coco3.parquet", image_root=tmp_path / "imgs")
    assert [r["uri"] for r in _read(made.path)] == [str((tmp_path / "imgs" / "a.png").resolve()), "s3://other/c.png"]
    _assert_missing(made, "b.png", [])

    records = [{"image": "a.png", "caption": "red"}, {"image": "a.png", "caption": "scarlet"}, {"image": "b.png", "caption": "green"}]
    jsonl = _put(bucket, "pairs/p.jsonl", "\n".join(json.dumps(r) for r in records))
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records), buf)
    parquet = _put(bucket, "pairs/p.parquet", buf.getvalue().to_pybytes())
    csv = _put(bucket, "pairs/p.csv", "image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in records))
    for source in (jsonl, parquet, csv):
        made = write_listing("pairs", source, tmp_path / "pairs.parquet")
        assert [(r["uri"], r["captions"]) for r in _read(made.path)] == [
            (f"s3://{bucket}/pairs/a.png", ["red", "scarlet"]), (f"s3://{bucket}/pairs/b.png", ["green"])], source
    made = write_listing("long", jsonl, tmp_path / "long.parquet")
    assert [r["dense_captions"] for r in _read(made.path)] == [["red", "scarlet"], ["green"]]


def test_folder_on_s3(tmp_path, bucket):
    for key, color in (("tree/golden_retriever/1.png", (1, 2, 3)), ("tree/golden_retriever/sub/2.png", (4, 5, 6)),
                       ("tree/tabby_cat/x.png", (7, 8, 9)), ("tree/.hidden/y.png", (0, 0, 0)),
                       ("tree/tabby_cat/.z.png", (0, 0, 0))):
        _put(bucket, key, _png_bytes(color))
    _put(bucket, "tree/tabby_cat/notes.txt", "not an image")
    _put(bucket, "tree/readme.png", _png_bytes((9, 9, 9)))  # right under the root: no class
    for root in (f"s3://{bucket}/tree", f"s3://{bucket}/tree/"):
        made = write_listing("folder", root, tmp_path / "f.parquet")
        rows = _read(made.path)
        assert made.class_names == ["golden retriever", "tabby cat"] and made.problems == []
        assert [(r["uri"], r["metadata"]["label"]) for r in rows] == [
            (f"s3://{bucket}/tree/golden_retriever/1.png", 0), (f"s3://{bucket}/tree/golden_retriever/sub/2.png", 0),
            (f"s3://{bucket}/tree/tabby_cat/x.png", 1)]
    names = _put(bucket, "names.json", json.dumps({"tabby_cat": "Cat", "golden_retriever": "Dog"}))
    made = write_listing("folder", f"s3://{bucket}/tree", tmp_path / "f2.parquet", class_names=names)
    assert made.class_names == ["Dog", "Cat"] and _read(made.path)[2]["captions"] == ["Cat"]
    names_txt = _put(bucket, "names.txt", "dog\ncat\n")
    assert write_listing("folder", f"s3://{bucket}/tree", tmp_path / "f3.parquet", class_names=names_txt).class_names == ["dog", "cat"]


def test_fashion_mnist_idx_on_s3(tmp_path, bucket):
    src = tmp_path / "fm"
    src.mkdir()
    imgs = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    _put(bucket, "fm/t10k-images-idx3-ubyte.gz", _idx(src / "i.gz", imgs, gz=True).read_bytes())
    _put(bucket, "fm/t10k-labels-idx1-ubyte", _idx(src / "l", np.array([9, 0, 3]), gz=False).read_bytes())
    made = write_listing("fashion_mnist", f"s3://{bucket}/fm", tmp_path / "out" / "fm.parquet")
    rows = _read(made.path)
    assert made.rows == 3 and sorted(r["metadata"]["label"] for r in rows) == [0, 3, 9]
    assert all(Path(r["uri"]).is_file() and r["uri"].startswith(str(tmp_path / "out")) for r in rows)  # PNGs: local


def test_cra_pairs_and_templates_on_s3(bucket):
    from pipeline.cra_sets import named_pairs
    from pipeline.eval_views import read_templates

    pairs = _put(bucket, "cra/my_pairs.jsonl", "\n".join(json.dumps({"first": f"a{i}", "second": f"b{i}"}) for i in range(3)))
    assert named_pairs(pairs) == ("my_pairs", [("a0", "b0"), ("a1", "b1"), ("a2", "b2")])
    templates = _put(bucket, "t.txt", "# comment\na photo of a {}.\n{} in a picture\n")
    assert read_templates(templates) == ["a photo of a {}.", "{} in a picture"]


def test_missing_sources_on_s3_are_one_line_errors(tmp_path, bucket):
    from pipeline.cra_sets import named_pairs
    from pipeline.eval_views import read_templates

    gone = f"s3://{bucket}/no/such.json"
    for kind, source in (("coco", gone), ("pairs", f"s3://{bucket}/no/such.jsonl"), ("folder", f"s3://{bucket}/no/tree"),
                         ("fashion_mnist", f"s3://{bucket}/no/fm"), ("coco", "s3://no-such-bucket-evalsets/x.json"),
                         ("folder", "s3://no-such-bucket-evalsets/tree")):
        with pytest.raises((ValueError, OSError)) as e:
            write_listing(kind, source, tmp_path / "x.parquet")
        message = str(e.value)
        assert source in message and "\n" not in message and len(message) < 400, (kind, message)
    with pytest.raises(ValueError, match=f"CRA set: .*{bucket}/no/p.jsonl does not exist"):
        named_pairs(f"s3://{bucket}/no/p.jsonl")
    with pytest.raises(ValueError, match=f"evaluate.templates: s3://{bucket}/no/t.txt does not exist"):
        read_templates(f"s3://{bucket}/no/t.txt")
