"""DINO / CLIP-I / CLIP-T on constructed inputs, and strict loading of the metric models."""

import io
import json
import math
import shutil

import pyarrow as pa
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from evaluation.metric_models import (
    MetricModelError,
    build_tiny_clip,
    build_tiny_dino,
    load_clip,
    load_dino,
    metric_model_info,
)  # fmt: skip
from evaluation.metrics import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MetricModels,
    clip_t,
    cosine_matrix,
    dino_transform,
    image_scores,
    mean_similarity,
)  # fmt: skip
from evaluation.scoring import ScoringWorker, aggregate


@pytest.fixture(scope="module")
def tiny_metric_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric-models")
    return build_tiny_dino(root / "dino"), build_tiny_clip(root / "clip")


def picture(seed: int, size=(96, 80)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_cosine_and_mean_similarity_known_values():
    assert cosine_matrix(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(1 / math.sqrt(2))
    gen = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # scale does not matter
    refs = torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    expected = [(1 + 0 + 1 / math.sqrt(2)) / 3, (0 + 1 + 1 / math.sqrt(2)) / 3]
    assert mean_similarity(gen, refs).tolist() == pytest.approx(expected)


def test_clip_t_is_cosine_times_100_row_by_row():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[0.6, 0.8], [3.0, 4.0]])
    assert clip_t(images, texts).tolist() == pytest.approx([60.0, 80.0])
    assert clip_t(-images[:1], texts[:1]).item() == pytest.approx(-60.0)  # not clipped at 0


def test_multi_subject_scores_average_over_subjects():
    dino, clip_image, text = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])
    refs_a = (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0]]))  # dino 0.5, clip 1.0
    refs_b = (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # dino 1.0, clip 0.5
    s = image_scores(dino, clip_image, text, [refs_a, refs_b])
    assert s["per_subject"] == [pytest.approx({"dino": 0.5, "clip_i": 1.0}), pytest.approx({"dino": 1.0, "clip_i": 0.5})]
    assert (s["dino"], s["clip_i"], s["clip_t"]) == pytest.approx((0.75, 0.75, 100.0))


def test_dino_preprocessing_is_resize_256_crop_224_imagenet_norm():
    grey = Image.new("RGB", (400, 300), (128, 128, 128))
    x = dino_transform()(grey)
    assert x.shape == (3, 224, 224)
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(x[:, 100, 100], expected, atol=1e-4)


def test_identical_images_score_one_through_the_real_code_path(tiny_metric_models):
    models = MetricModels.load(*map(str, tiny_metric_models))
    a, b = picture(0), picture(1)
    d_refs, c_refs = models.references([a])
    d, c = models.dino([a, b]), models.clip.images([a, b])
    assert d.shape == (2, 32) and c.shape == (2, 16)
    same = image_scores(d[0], c[0], models.clip.texts(["a dog"])[0], [(d_refs, c_refs)])
    assert same["dino"] == pytest.approx(1.0, abs=1e-5) and same["clip_i"] == pytest.approx(1.0, abs=1e-5)
    other = image_scores(d[1], c[1], models.clip.texts(["a dog"])[0], [(d_refs, c_refs)])
    assert other["dino"] < 0.9999 and other["clip_i"] < 0.9999
    texts = models.clip.texts(["a dog", "a dog", "a cat in the snow"])
    assert torch.allclose(texts[0], texts[1]) and not torch.allclose(texts[0], texts[2])  # offline BPE tokenizer


def test_scoring_worker_and_aggregation(tiny_metric_models):
    """The Ray Data callable class, called in-process: one image equal to the references scores 1."""
    dino, clip = map(str, tiny_metric_models)
    a, b = picture(0), picture(1)
    worker = ScoringWorker(dino, clip, {"s1": [png(a)], "s2": [png(a), png(b)]})
    out = worker(pa.Table.from_pylist([
        {"key": "k0", "png": png(a), "prompt": "a dog", "subject_keys": json.dumps(["s1"])},
        {"key": "k1", "png": png(a), "prompt": "a dog and a cat", "subject_keys": json.dumps(["s1", "s2"])},
    ])).to_pylist()  # fmt: skip
    assert out[0]["dino"] == pytest.approx(1.0, abs=1e-5) and out[0]["clip_i"] == pytest.approx(1.0, abs=1e-5)
    per = json.loads(out[1]["per_subject"])
    assert per[0]["dino"] == pytest.approx(1.0, abs=1e-5) and per[1]["dino"] < 1.0
    assert out[1]["dino"] == pytest.approx((per[0]["dino"] + per[1]["dino"]) / 2)
    rows = [{"case_id": "c", "split": "multi", "prompt": "p", "subjects": "x+y", "subject_names": ["x", "y"], "seed": i,
             "dino": 0.5 + i / 10, "clip_i": 0.7, "clip_t": 30.0 + i,
             "per_subject": [{"dino": 0.4, "clip_i": 0.6}, {"dino": 0.6 + i / 5, "clip_i": 0.8}]} for i in range(2)]  # fmt: skip
    cases, metrics, breakdown = aggregate(rows)
    assert cases[0]["dino"] == pytest.approx(0.55) and metrics["multi/clip_t"] == pytest.approx(30.5)
    assert metrics["multi/cases"] == 1 and metrics["multi/images"] == 2
    assert breakdown["multi"]["y"]["dino"] == pytest.approx(0.7) and breakdown["multi"]["x"]["clip_i"] == pytest.approx(0.6)


@pytest.mark.parametrize("key, loader", [("dino_model", load_dino), ("clip_model", load_clip)])
def test_missing_or_unset_folder_names_the_config_key(tmp_path, key, loader):
    with pytest.raises(MetricModelError, match=f"^{key}: .*nope does not exist"):
        loader(tmp_path / "nope", key)
    with pytest.raises(MetricModelError, match=f"^{key} is not set"):
        loader(None, key)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetricModelError, match=f"^{key}: .* holds no weight file"):
        loader(tmp_path / "empty", key)


def test_strict_dino_loading_rejects_missing_and_unexpected_weights(tiny_metric_models, tmp_path):
    dino, clip = tiny_metric_models
    for i, (change, word) in enumerate((
        (lambda sd: sd.pop("embeddings.cls_token"), "missing keys: embeddings.cls_token"),
        (lambda sd: sd.update({"pooler.dense.bias": torch.zeros(32)}), "unexpected keys: pooler.dense.bias"),
    )):  # fmt: skip
        bad = tmp_path / f"dino-{i}"
        shutil.copytree(dino, bad)
        sd = load_file(bad / "model.safetensors")
        change(sd)
        save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(MetricModelError, match=f"^dino_model: .*{word}"):
            load_dino(bad)
    with pytest.raises(MetricModelError, match="dino_model: .*no config.json"):
        load_dino(clip)


def test_strict_clip_loading_rejects_missing_weights(tiny_metric_models, tmp_path):
    _, clip = tiny_metric_models
    bad = shutil.copytree(clip, tmp_path / "clip")
    sd = load_file(bad / "open_clip_model.safetensors")
    del sd["visual.proj"]
    save_file(sd, bad / "open_clip_model.safetensors")
    with pytest.raises(MetricModelError, match=r"(?s)^clip_model: .*visual\.proj"):
        load_clip(bad)
    (bad / "open_clip_model.safetensors").rename(bad / "weights.txt")
    with pytest.raises(MetricModelError, match="^clip_model: .*no weight file"):
        load_clip(bad)


def test_metric_model_info_flags_non_standard_models(tiny_metric_models):
    info = metric_model_info(*tiny_metric_models)
    assert info["dino_standard"] is False and info["clip_standard"] is False
    assert len(info["dino_fingerprint"]) == len(info["clip_fingerprint"]) == 16
