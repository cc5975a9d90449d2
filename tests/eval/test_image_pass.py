"""The fast image pass gives the plain loop's features and logits (to 1e-6), and its defaults."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_eval import image_pass, tasks, zero_shot
from clip_eval.cli import build_parser
from clip_eval.image_pass import CPU_CHUNK, default_num_workers, image_features
from clip_eval.metrics import classification_metrics
from clip_eval.tasks import zero_shot_task
from clip_eval.zero_shot import build_zero_shot_classifier

CLASSES = ["ant", "bee", "cat", "dog", "eel"]


@pytest.fixture
def two_threads():
    """Two intra-op threads whatever the machine has, so chunks really run on two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("chunk", [1, 3, 4, CPU_CHUNK, None])
def test_chunked_features_equal_the_whole_batch(tiny_encoder, chunk, two_threads):
    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny_encoder.encode_image(images)
        with image_features(tiny_encoder, torch.device("cpu"), chunk) as encode:
            got = encode(images)
            got_again = encode(images[:7])  # a short last batch
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_again, want[:7], atol=1e-6, rtol=0)
    assert torch.get_num_threads() == 2


def test_thread_count_restored_after_an_error(tiny_encoder, two_threads):
    with (
        pytest.raises(RuntimeError, match="boom"),
        torch.no_grad(),
        image_features(tiny_encoder, torch.device("cpu"), 2) as encode,
    ):
        encode(torch.randn(6, 3, 32, 32))
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def _plain_logits(encoder, paths, classifier, batch_size):
    """The loop CLIP_benchmark and open_clip_train run: whole batches, one thread, no workers."""
    logits = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = []
            for path in paths[start : start + batch_size]:
                with Image.open(path) as img:
                    batch.append(encoder.preprocess(img))
            features = F.normalize(encoder.encode_image(torch.stack(batch)), dim=-1)
            logits.append(features @ classifier)
    return torch.cat(logits)


@pytest.mark.parametrize("batch_size", [5, 64])
def test_zero_shot_defaults_give_the_plain_loops_logits(
    tiny_encoder, tmp_path, write_images, monkeypatch, two_threads, batch_size
):
    paths, labels = [], []
    for c, name in enumerate(CLASSES):
        written = write_images(tmp_path / "data" / name, 8 + c, seed=c, size=48, ext="jpg")
        paths += written
        labels += [c] * len(written)
    seen = {}

    def capture(logits, targets):
        seen["logits"], seen["labels"] = logits, targets
        return classification_metrics(logits, targets)

    monkeypatch.setattr(zero_shot, "classification_metrics", capture)
    # Default workers and chunks: batches of 64 (50 images) run as 32 + 18 on two threads.
    got = zero_shot_task(
        tiny_encoder,
        tmp_path / "data",
        classnames=CLASSES,
        templates=["a {}"],
        batch_size=batch_size,
    )
    classifier = build_zero_shot_classifier(tiny_encoder, CLASSES, ["a {}"], "cpu")
    want_logits = _plain_logits(tiny_encoder, paths, classifier, batch_size)
    want = classification_metrics(want_logits, torch.tensor(labels))

    assert seen["labels"].tolist() == labels
    torch.testing.assert_close(seen["logits"], want_logits, atol=1e-6, rtol=0)
    assert got["num_samples"] == len(paths)
    assert got["acc1"] == want["acc1"] and got["acc5"] == want["acc5"]
    assert got["mean_per_class_recall"] == pytest.approx(want["mean_per_class_recall"], abs=1e-6)


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 1), (3, 1), (4, 2), (8, 4), (64, 4)])
def test_default_workers_are_min_4_and_half_the_cpus(monkeypatch, cpus, workers):
    monkeypatch.setattr(image_pass, "available_cpus", lambda: cpus)
    assert default_num_workers() == workers


@pytest.mark.parametrize("given, used", [(None, "default"), (0, 0), (3, 3)])
def test_zero_shot_task_workers_default_and_override(
    tiny_encoder, tmp_path, write_images, monkeypatch, given, used
):
    for c, name in enumerate(CLASSES[:2]):
        write_images(tmp_path / "data" / name, 2, seed=c)
    monkeypatch.setattr(image_pass, "available_cpus", lambda: 6)  # default: 3
    made = []
    real = tasks.FileLoader

    def loader(images, transform, batch_size, num_workers, pin=False):
        made.append(num_workers)
        return real(
            images, transform, batch_size, 0, pin
        )  # the count is what is checked; run in-process

    monkeypatch.setattr(tasks, "FileLoader", loader)
    kwargs = {} if given is None else {"num_workers": given}
    zero_shot_task(
        tiny_encoder, tmp_path / "data", classnames=CLASSES[:2], templates=["a {}"], **kwargs
    )
    assert made == [3 if used == "default" else used]


def test_cli_num_workers_defaults_to_the_tasks_own(monkeypatch):
    from clip_eval import cli

    args = build_parser().parse_args(["zero-shot", "--model", "m", "--data", "d"])
    assert args.num_workers is None
    assert (
        build_parser()
        .parse_args(["zero-shot", "--model", "m", "--data", "d", "-j", "0"])
        .num_workers
        == 0
    )

    calls = []
    monkeypatch.setattr(cli, "_check_data", lambda *a: None)
    monkeypatch.setattr(cli, "load_encoder", lambda *a: object())
    monkeypatch.setattr(
        tasks, "zero_shot_task", lambda encoder, data, **opts: calls.append(opts) or {"acc1": 1.0}
    )
    assert cli.main(["zero-shot", "--model", "m", "--data", "d", "--device", "cpu"]) == 0
    assert cli.main(["zero-shot", "--model", "m", "--data", "d", "--device", "cpu", "-j", "0"]) == 0
    assert "num_workers" not in calls[0]  # zero_shot_task's default: default_num_workers()
    assert calls[1]["num_workers"] == 0
    assert inspect.signature(zero_shot_task).parameters["num_workers"].default is None
