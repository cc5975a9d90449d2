"""Linear probe (vs scikit-learn's logistic regression) and few-shot prototype episodes."""

import math

import pytest
import torch
import torch.nn.functional as F

from clip_eval.probe import few_shot, fit_logistic_regression, linear_probe
from clip_eval.tasks import few_shot_task, linear_probe_task
from data_tools.errors import ConfigError, DataError
from data_tools.synth import SynthConfig, class_names, write_synth


def _blobs(n_per_class=30, num_classes=4, dim=8, spread=1.0, seed=0):
    """Gaussian blobs around fixed class centres; `seed` draws the noise (train vs test sets)."""
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    features = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return features, labels


def test_logistic_regression_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(spread=2.0)
    wd = 1e-2
    weight, bias = fit_logistic_regression(x, y, 4, wd)
    # sklearn minimizes C * sum(CE) + ||W||^2 / 2, i.e. ours (mean CE + wd/2 ||W||^2)
    # with C = 1/(wd N)
    ref = sklearn.LogisticRegression(C=1.0 / (wd * len(y)), tol=1e-10, max_iter=10000).fit(
        x.double().numpy(), y.numpy()
    )
    ours = F.softmax(x @ weight + bias, dim=1).double()
    torch.testing.assert_close(
        ours, torch.from_numpy(ref.predict_proba(x.double().numpy())), atol=1e-4, rtol=0
    )


def test_linear_probe_separable_and_deterministic():
    x, y = _blobs(spread=0.3)
    tx, ty = _blobs(spread=0.3, seed=1)
    threads = torch.get_num_threads()
    a = linear_probe(x, y, tx, ty, weight_decays=(1e-4, 1e-2), seed=3)
    b = linear_probe(x, y, tx, ty, weight_decays=(1e-4, 1e-2), seed=3)
    assert a == b
    assert torch.get_num_threads() == threads  # small fits run on one thread, then restore
    assert a["lp_acc1"] == 1.0 and a["lp_mean_per_class_recall"] == 1.0
    assert a["weight_decay"] == 1e-2  # ties on validation go to the stronger regularization
    assert a["num_train"] == 120 and a["num_classes"] == 4


def test_linear_probe_sweep_picks_best_validation(monkeypatch):
    import clip_eval.probe as probe

    x, y = _blobs(spread=3.0, seed=1)
    tx, ty = _blobs(spread=3.0, seed=2)
    seen = []
    real = probe.fit_logistic_regression
    monkeypatch.setattr(
        probe, "fit_logistic_regression", lambda *a, **k: seen.append(a[3]) or real(*a, **k)
    )
    m = linear_probe(x, y, tx, ty, weight_decays=(1e-6, 1e-1, 10.0))
    assert seen[:3] == [1e-6, 1e-1, 10.0] and seen[3] == m["weight_decay"] and len(seen) == 4
    assert 0.25 < m["lp_acc1"] <= 1.0


def test_linear_probe_bad_options():
    x, y = _blobs()
    with pytest.raises(ConfigError):
        linear_probe(x, y, x, y, weight_decays=())
    with pytest.raises(ConfigError):
        linear_probe(x, y, x, y, val_fraction=1.0)


def test_few_shot_reference_and_seed():
    x, y = _blobs(n_per_class=20, num_classes=6, spread=1.5)
    a = few_shot(x, y, n_way=3, k_shot=2, n_query=5, episodes=50, seed=1)
    assert a == few_shot(x, y, n_way=3, k_shot=2, n_query=5, episodes=50, seed=1)
    assert a != few_shot(x, y, n_way=3, k_shot=2, n_query=5, episodes=50, seed=2)
    assert 1 / 3 < a["fewshot_acc"] < 1.0 and a["fewshot_acc_ci95"] > 0

    # Re-run the same episodes by hand (same generator calls) with explicit distances.
    g = torch.Generator().manual_seed(1)
    feats = F.normalize(x, dim=-1)
    accs = []
    for _ in range(50):
        classes = torch.arange(6)[torch.randperm(6, generator=g)[:3]]
        protos, queries = [], []
        for c in classes.tolist():
            members = (y == c).nonzero().squeeze(1)
            pick = members[torch.randperm(len(members), generator=g)[:7]]
            protos.append(feats[pick[:2]].mean(0))
            queries.append(feats[pick[2:]])
        dists = ((torch.cat(queries)[:, None, :] - torch.stack(protos)[None]) ** 2).sum(-1)
        accs.append(
            (dists.argmin(1) == torch.arange(3).repeat_interleave(5)).double().mean().item()
        )
    mean = sum(accs) / 50
    std = math.sqrt(sum((v - mean) ** 2 for v in accs) / 49)
    assert a["fewshot_acc"] == pytest.approx(mean, abs=1e-12)
    assert a["fewshot_acc_ci95"] == pytest.approx(1.96 * std / math.sqrt(50), abs=1e-12)


def test_few_shot_needs_enough_classes():
    x, y = _blobs(n_per_class=3, num_classes=4)
    with pytest.raises(DataError, match="only 0 have"):
        few_shot(x, y, n_way=2, k_shot=1, n_query=5)
    with pytest.raises(ConfigError, match="n_way"):
        few_shot(x, y, n_way=1)


# ---------------------------------------------------------------- tasks on real data paths


@pytest.fixture(scope="module")
def synth_zeroshot(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_synth")
    write_synth(
        out,
        SynthConfig(
            seed=1,
            train_samples=1,
            zeroshot_per_class=6,
            retrieval_samples=1,
            image_size=32,
            samples_per_shard=64,
        ),
    )
    return out / "zeroshot"


def test_probe_and_few_shot_tasks_on_shards(tiny_encoder, synth_zeroshot):
    m = linear_probe_task(
        tiny_encoder,
        synth_zeroshot,
        synth_zeroshot,
        weight_decays=(1e-3,),
        max_iter=50,
        batch_size=64,
    )
    assert m["num_train"] == m["num_test"] == 6 * len(class_names())
    assert m["num_classes"] == len(class_names()) and 0 <= m["lp_acc1"] <= 1
    f = few_shot_task(
        tiny_encoder, synth_zeroshot, n_way=3, k_shot=1, n_query=2, episodes=20, batch_size=64
    )
    assert f["episodes"] == 20 and 0 <= f["fewshot_acc"] <= 1


def test_probe_task_matches_test_folders_by_name(tiny_encoder, tmp_path, write_images):
    for i, name in enumerate(["ant", "bee", "cow"]):
        write_images(tmp_path / "train" / name, 4, seed=i)
    for i, name in enumerate(["cow", "ant"]):  # a subset, in another order
        write_images(tmp_path / "test" / name, 2, seed=10 + i)
    m = linear_probe_task(
        tiny_encoder,
        tmp_path / "train",
        tmp_path / "test",
        weight_decays=(1e-3,),
        max_iter=50,
        batch_size=8,
    )
    assert m["num_classes"] == 3 and m["num_test"] == 4
    write_images(tmp_path / "test" / "dog", 1)
    with pytest.raises(DataError, match="'dog'"):
        linear_probe_task(
            tiny_encoder, tmp_path / "train", tmp_path / "test", weight_decays=(1e-3,)
        )
