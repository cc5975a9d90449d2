"""Image folders (ImageNet layouts, class trees), label files and caption tables, read directly."""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clip_eval.datasets import FileLoader, caption_table, class_folder, flat_folder, folder_kind
from clip_eval.metrics import retrieval_metrics
from clip_eval.tasks import retrieval_task, zero_shot_task
from data_tools.errors import DataError

# The first two and the last ImageNet-1k synsets, in their standard (sorted) order.
SYNSETS = {"n01440764": 0, "n01443537": 1, "n15075141": 999}


@pytest.fixture
def imagenet_tree(tmp_path, write_images):
    root = tmp_path / "val"
    for i, synset in enumerate(SYNSETS):
        write_images(root / synset, 2, seed=i, ext="JPEG")
    return root


def test_synset_folders_map_to_standard_indices(imagenet_tree):
    for dataset in ("imagenet", None):  # synset folders are recognised without --dataset too
        images = class_folder(imagenet_tree, dataset=dataset)
        assert images.classnames == list(open_clip.IMAGENET_CLASSNAMES)
        assert [p.parent.name for p in images.paths] == [s for s in SYNSETS for _ in range(2)]
        assert images.labels == [i for i in SYNSETS.values() for _ in range(2)]


def test_zero_shot_on_imagenet_folder(tiny_encoder, imagenet_tree):
    # one template keeps this quick: 1000 prompts (the named sets are checked below)
    m = zero_shot_task(
        tiny_encoder,
        imagenet_tree,
        dataset="imagenet",
        templates=["a photo of a {}."],
        batch_size=4,
    )
    assert m["num_samples"] == 6 and m["num_classes"] == 1000
    assert 0 <= m["acc1"] <= m["acc5"] <= 1


def test_named_template_sets(tmp_path):
    from clip_eval.prompts import resolve_templates

    openai, source = resolve_templates("openai", None)
    assert (
        openai == list(open_clip.OPENAI_IMAGENET_TEMPLATES)
        and len(openai) == 80
        and "openai" in source
    )
    assert resolve_templates(None, "simple")[0] == list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    (tmp_path / "t.txt").write_text("a {}\n\nart of {}\n")
    assert resolve_templates(tmp_path / "t.txt", "openai")[0] == ["a {}", "art of {}"]


def test_folder_not_a_synset_is_one_line(tiny_encoder, imagenet_tree, write_images):
    write_images(imagenet_tree / "cats", 1)
    with pytest.raises(DataError) as info:
        zero_shot_task(tiny_encoder, imagenet_tree, dataset="imagenet", templates=["{}"])
    message = str(info.value)
    assert "'cats'" in message and "\n" not in message


def test_class_folder_names_and_lookup(tmp_path, write_images):
    for name in ("golden_retriever", "tabby", "zebra"):
        write_images(tmp_path / "pets" / name, 1)
    plain = class_folder(tmp_path / "pets")
    assert plain.classnames == ["golden retriever", "tabby", "zebra"] and plain.labels == [0, 1, 2]
    # class names file: by name, underscores for spaces, or folder<TAB>name; its order sets indices
    names = ["zebra", "tabby\ta tabby cat", "golden retriever", "unused"]
    mapped = class_folder(tmp_path / "pets", names, source="names.txt")
    assert mapped.labels == [2, 1, 0]
    assert mapped.classnames == ["zebra", "a tabby cat", "golden retriever", "unused"]
    with pytest.raises(DataError, match="'zebra'.*names.txt"):
        class_folder(tmp_path / "pets", ["tabby", "golden retriever"], source="names.txt")


def test_flat_folder_label_files(tmp_path, write_images):
    root = tmp_path / "flat"
    paths = write_images(root, 4)
    (tmp_path / "ints.txt").write_text("3\n0\n999\n1\n")
    images = flat_folder(root, tmp_path / "ints.txt", dataset="imagenet")
    assert images.labels == [3, 0, 999, 1] and len(images.classnames) == 1000
    # filename,label rows in any order, a header, stems, synsets as labels
    rows = [
        "ImageId,label",
        f"{paths[2].stem},n15075141",
        f"{paths[0].name},3",
        f"{paths[3].name},1",
        f"{paths[1].name},0",
    ]
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    assert flat_folder(root, tmp_path / "rows.csv", dataset="imagenet").labels == [3, 0, 999, 1]
    # custom classes: labels may be class names
    (tmp_path / "named.csv").write_text("\n".join(f"{p.name},{c}" for p, c in zip(paths, "abba")))
    assert flat_folder(root, tmp_path / "named.csv", ["a", "b"]).labels == [0, 1, 1, 0]


@pytest.mark.parametrize(
    "labels, match",
    [
        ("0\n1\n2\n", "3 labels but .* 4 images"),
        ("img_000.png,0\nimg_001.png,0\nimg_002.png,0\n", "no row for image img_003.png"),
        (
            "img_000.png,0\nimg_001.png,0\nimg_002.png,0\nimg_003.png,0\nother.png,1\n",
            "'other.png'",
        ),
        ("0\n1\n2\nfoo\n", "line 4: label 'foo'"),
        ("0\n1\n2\n1000\n", "label 1000, outside"),
    ],
)
def test_flat_folder_label_errors(tmp_path, write_images, labels, match):
    write_images(tmp_path / "flat", 4)
    (tmp_path / "labels.txt").write_text(labels)
    with pytest.raises(DataError, match=match):
        flat_folder(tmp_path / "flat", tmp_path / "labels.txt", dataset="imagenet")


def test_zero_shot_flat_folder_equals_class_folder(tiny_encoder, tmp_path, write_images):
    for i, name in enumerate(["cat", "dog", "car"]):
        write_images(tmp_path / "tree" / name, 2, seed=i)
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = []
    for i, path in enumerate(sorted((tmp_path / "tree").glob("*/*.png"))):
        target = flat / f"{i:02d}.png"
        target.write_bytes(path.read_bytes())
        lines.append(f"{target.name},{path.parent.name}")
    (tmp_path / "labels.csv").write_text("\n".join(lines))
    templates = ["a photo of a {}."]
    tree = zero_shot_task(tiny_encoder, tmp_path / "tree", templates=templates, batch_size=4)
    flat_m = zero_shot_task(
        tiny_encoder,
        flat,
        labels=tmp_path / "labels.csv",
        classnames=["car", "cat", "dog"],
        templates=templates,
        batch_size=4,
    )
    assert tree == flat_m


def test_empty_and_broken_folders(tiny_encoder, tmp_path, write_images):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        zero_shot_task(tiny_encoder, tmp_path / "empty", templates=["{}"])
    write_images(tmp_path / "broken" / "cat", 2)
    (tmp_path / "broken" / "cat" / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg") as info:
        zero_shot_task(tiny_encoder, tmp_path / "broken", templates=["{}"])
    assert "\n" not in str(info.value)
    write_images(tmp_path / "flatonly", 2)
    assert folder_kind(tmp_path / "flatonly") == "flat-folder"
    with pytest.raises(DataError, match="--labels"):
        zero_shot_task(tiny_encoder, tmp_path / "flatonly", templates=["{}"])


# ---------------------------------------------------------------- caption tables


def _table_set(tmp_path, write_images, n=4):
    paths = write_images(tmp_path / "imgs", n)
    captions = [[f"caption {i} {j}" for j in range(1 + i % 3)] for i in range(n)]
    return paths, captions


def test_csv_rows_are_merged_per_image(tmp_path, write_images):
    paths, captions = _table_set(tmp_path, write_images)
    rows = ["filepath,title"] + [f"imgs/{p.name},{c}" for p, cs in zip(paths, captions) for c in cs]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    images = caption_table(tmp_path / "t.csv")
    assert images.paths == paths and images.captions == captions


def test_jsonl_caption_lists(tmp_path, write_images):
    paths, captions = _table_set(tmp_path, write_images)
    lines = [json.dumps({"file": str(p), "captions": c}) for p, c in zip(paths, captions)]
    (tmp_path / "t.jsonl").write_text("\n".join(lines))
    images = caption_table(tmp_path / "t.jsonl", image_column="file")
    assert images.paths == paths and images.captions == captions


@pytest.mark.parametrize(
    "content, match",
    [
        ("image,caption\nimgs/missing.png,a cat\n", "line 2: image 'imgs/missing.png' not found"),
        ("image,words\nimgs/img_000.png,a cat\n", "no caption column"),
        ("image,caption\n", "no rows"),
        ("image,caption\nimgs/img_000.png,\n", "line 2: 'caption' must be"),
        ("image,caption\nimgs/img_000.png,a,b\n", "line 2: more fields"),
    ],
)
def test_caption_table_errors(tmp_path, write_images, content, match):
    _table_set(tmp_path, write_images)
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(DataError, match=match) as info:
        caption_table(tmp_path / "t.csv")
    assert "\n" not in str(info.value)


def test_retrieval_from_table_matches_metric(tiny_encoder, tmp_path, write_images):
    paths, captions = _table_set(tmp_path, write_images, n=6)
    rows = ["image\tcaption"] + [
        f"imgs/{p.name}\t{c}" for p, cs in zip(paths, captions) for c in cs
    ]
    (tmp_path / "t.tsv").write_text("\n".join(rows))
    got = retrieval_task(tiny_encoder, tmp_path / "t.tsv", batch_size=4)
    images = caption_table(tmp_path / "t.tsv")
    with torch.no_grad():
        pixels = torch.cat([b["image"] for b in FileLoader(images, tiny_encoder.preprocess, 4)])
        image_features = F.normalize(tiny_encoder.encode_image(pixels), dim=-1)
        texts = [c for cs in captions for c in cs]
        text_features = tiny_encoder.encode_text(tiny_encoder.tokenizer(texts))
    owner = torch.tensor([i for i, cs in enumerate(captions) for _ in cs])
    want = retrieval_metrics(image_features, text_features, owner)
    assert got["num_images"] == 6 and got["num_texts"] == len(texts)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_imagenet_shards_with_synset_classnames_are_remapped(tiny_encoder, tmp_path, write_images):
    """Shards of a partial synset tree (labels 0..k-1 + classnames.txt of synsets) map back to
    0..999."""
    import io
    import tarfile

    import clip_eval.tasks as tasks

    paths = write_images(tmp_path / "imgs", 4)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    with tarfile.open(shard_dir / "val-000000.tar", "w") as tf:
        for i, path in enumerate(paths):
            for name, data in (
                (f"s{i}.png", path.read_bytes()),
                (f"s{i}.cls", str(i % 2).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    (shard_dir / "classnames.txt").write_text("n01443537\nn15075141\n")
    stream = tasks._Labelled(
        tiny_encoder,
        shard_dir,
        classnames=None,
        dataset="imagenet",
        labels=None,
        batch_size=2,
        num_workers=0,
        device=torch.device("cpu"),
    )
    labels = torch.cat([b["label"] for b in stream]).tolist()
    stream.close()
    assert labels == [1, 999, 1, 999] and len(stream.classnames) == 1000
    m = zero_shot_task(tiny_encoder, shard_dir, dataset="imagenet", templates=["{}"])
    assert m["num_samples"] == 4 and m["num_classes"] == 1000
