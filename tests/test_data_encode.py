"""The optional encode stage with the tiny FLUX model: tensor shards training can read instead of images."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from musar_core.encoding import FluxEncoders, encode_images, reference_tensor
from musar_core.tiny import build_tiny_flux
from pipelines.build import DataBuildConfig, build_shards
from pipelines.encode import EncoderConfig, load_tensors
from pipelines.panels import PanelGeometry
from pipelines.schema import DATASETS
from pipelines.synthetic import SynthConfig, write_synthetic
from training.batches import encode_samples, samples_from_batch
from training.config import TrainConfig
from training.driver import resolve_data_source, run_stage
from training.encoded import encoded_batch


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    """The tiny model with a 160-token T5 limit, so that diptych prompts fit as in the quickstart."""
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux-160", t5_max_length=160)


@pytest.fixture(scope="module")
def encoded_shards(tmp_path_factory, flux_path, ray_local):
    tmp_path = tmp_path_factory.mktemp("encode")
    geometry = PanelGeometry(scale=0.125)
    write_synthetic(SynthConfig(output=str(tmp_path / "in"), rows=16, geometry=geometry, collection_2_fraction=1.0,
                                low_quality_fraction=0.0, rare_categories=0))  # fmt: skip
    out = tmp_path / "out"
    manifest = build_shards(DataBuildConfig(
        input=str(tmp_path / "in"), output=str(out), geometry=geometry, diptych_size=(128, 64), quiet=True,
        encode=True, encode_model=str(flux_path), encoder=EncoderConfig(batch_size=5, condition_size=64),
    ))  # fmt: skip
    return out, manifest


def test_encode_stage_with_tiny_model(encoded_shards, flux_path):
    out, manifest = encoded_shards
    enc = FluxEncoders.from_pretrained(flux_path)
    for name in DATASETS:
        samples = {r["sample_id"]: r for r in pq.read_table(out / name).to_pylist()}
        encoded = pq.read_table(out / "encoded" / name).to_pylist()
        stats = manifest["encoded"]["datasets"][name]
        assert sorted(r["sample_id"] for r in encoded) == sorted(samples) and stats["rows"] == len(samples) > 0
        assert stats["bytes"] == sum(len(r["tensors"]) for r in encoded) and stats["bytes_per_sample_mean"] > 0
        conditions = 1 if name == "single" else 2
        for row in encoded[:3]:
            sample = samples[row["sample_id"]]
            assert row["content_hash"] == sample["content_hash"]
            tensors = load_tensors(row["tensors"])
            names = {"target_latents", "target_t5", "target_clip", "target_grid"}
            names |= {f"condition_{kind}_{k}" for kind in ("latents", "t5", "clip") for k in range(conditions)}
            names |= {"phrase_spans"} if conditions > 1 else set()
            assert set(tensors) == names and tensors["target_latents"].dtype == torch.bfloat16
            w, h = sample["target_width"], sample["target_height"]
            assert tensors["target_grid"].tolist() == [h // 16, w // 16]
            assert tuple(tensors["target_latents"].shape) == (h // 16 * w // 16, 16)
            target = torch.from_numpy(np.asarray(Image.open(io.BytesIO(sample["target_image"])).convert("RGB"),
                                                 dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)  # fmt: skip
            expected, _ = encode_images(enc.vae, target[None])
            torch.testing.assert_close(tensors["target_latents"].float(), expected[0], atol=0.05, rtol=0.02)
            for k in range(conditions):
                prompt = sample["condition_prompts"][k]
                ids = enc.tokenizer_2(prompt, truncation=True, max_length=64, return_tensors="pt").input_ids
                assert tensors[f"condition_t5_{k}"].shape[0] == ids.shape[1]  # real length, no padding
                with torch.no_grad():
                    alone = enc.text_encoder_2(ids)[0][0]  # no padding at all
                torch.testing.assert_close(tensors[f"condition_t5_{k}"].float(), alone, atol=0.05, rtol=0.02)
                cond = reference_tensor(Image.open(io.BytesIO(sample["condition_images"][k])), 64)
                assert tuple(tensors[f"condition_latents_{k}"].shape) == tuple(encode_images(enc.vae, cond[None])[0][0].shape)


def _numpy_batch(table, rows):
    """Rows as Ray Data hands them to a worker (batch_format="numpy"): one object array per column."""
    out = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()[:rows]
        out[name] = np.empty(len(values), dtype=object)
        out[name][:] = values
    return out


def _fits(row) -> bool:
    """Every condition phrase has a token span (none beyond the prompt limit)."""
    tensors = load_tensors(row["tensors"])
    return "phrase_spans" not in tensors or bool((tensors["phrase_spans"][:, 1] > 0).all())


@pytest.mark.parametrize("dataset", ["single", "diptych_random"])
def test_training_reads_encoded_rows_like_it_encodes_images(encoded_shards, flux_path, dataset):
    """The pre-encoded micro-batch carries the same latents, condition states and phrase spans as
    encoding the images on the worker; the target prompt comes at its real length, masked."""
    out, _ = encoded_shards
    encoded = pq.read_table(out / "encoded" / dataset).sort_by("sample_id")
    assert all(_fits(row) for row in encoded.to_pylist())
    encoded = encoded.slice(0, 2)
    samples = pq.read_table(out / dataset).sort_by("sample_id")
    samples = samples.take([samples.column("sample_id").to_pylist().index(i) for i in encoded.column("sample_id").to_pylist()])
    sizes = dict(target_size=64, condition_size=64, max_prompt_tokens=160, max_condition_prompt_tokens=64,
                 device=torch.device("cpu"))  # fmt: skip
    got = encoded_batch(_numpy_batch(encoded, 2), **sizes)
    enc = FluxEncoders.from_pretrained(flux_path)
    want = encode_samples(samples_from_batch(_numpy_batch(samples, 2)), enc, **sizes)
    close = dict(atol=0.05, rtol=0.02)  # bf16 storage
    torch.testing.assert_close(got.target_latents, want.target_latents, **close)
    assert torch.equal(got.img_ids, want.img_ids)
    torch.testing.assert_close(got.pooled, want.pooled, **close)
    for k in range(len(want.conditions)):
        torch.testing.assert_close(got.conditions.image_latents[k], want.conditions.image_latents[k], **close)
        assert torch.equal(got.conditions.image_ids[k], want.conditions.image_ids[k])
        mask = want.conditions.prompt_mask[k]  # padding states differ (zeros here) and are never attended
        assert (got.conditions.prompt_mask[k] is None) == (mask is None)
        valid = torch.ones(want.conditions.prompt_embeds[k].shape[:2], dtype=torch.bool) if mask is None else mask
        if mask is not None:
            assert torch.equal(got.conditions.prompt_mask[k], mask)
        torch.testing.assert_close(got.conditions.prompt_embeds[k][valid], want.conditions.prompt_embeds[k][valid], **close)
    if dataset == "single":
        assert got.phrase_spans is None
    else:
        assert torch.equal(got.phrase_spans, want.phrase_spans)
    lengths = [len(enc.tokenizer_2(p, truncation=True, max_length=160).input_ids)
               for p in samples.column("target_prompt").to_pylist()[:2]]  # fmt: skip
    assert got.prompt_embeds.shape[1] == max(lengths)
    if len(set(lengths)) > 1:
        assert got.prompt_mask.sum(1).tolist() == lengths
    with pytest.raises(ValueError, match="data.target_size=32 needs"):
        encoded_batch(_numpy_batch(encoded, 2), **{**sizes, "target_size": 32})
    # The training config's RoPE scheme reaches the condition ids on both paths alike.
    left = {**sizes, "rope_scheme": "left_panels_v1"}
    got, want = encoded_batch(_numpy_batch(encoded, 2), **left), encode_samples(samples_from_batch(_numpy_batch(samples, 2)), enc, **left)
    for k in range(len(want.conditions)):
        assert torch.equal(got.conditions.image_ids[k], want.conditions.image_ids[k])
        assert (got.conditions.image_ids[k][:, 0] == 0).all() and got.conditions.image_ids[k][:, 2].max() < 0


def test_stage_trains_from_encoded_shards(encoded_shards, flux_path, tmp_path):
    out, _ = encoded_shards
    cfg = TrainConfig(stage=2, allow_missing_init=True, model=str(flux_path), steps=2, micro_batch_size=2,
                      grad_accum=1, num_workers=2, checkpoint_every=2, output_dir=str(tmp_path / "train"))  # fmt: skip
    cfg.data.shards, cfg.data.target_size, cfg.data.max_prompt_tokens, cfg.data.source = str(out), 64, 160, "encoded"
    cfg.musar = cfg.musar.replace(condition_size=64)
    cfg.tracking.tracking_uri, cfg.tracking.sample_grid = f"sqlite:///{tmp_path}/mlflow.db", False
    assert resolve_data_source(cfg, out, flux_path.resolve())[0] == "encoded"
    result = run_stage(cfg)
    assert result.metrics["step"] == 2 and (result.lora_dir / "subject" / "adapter_model.safetensors").is_file()
    # A config the tensors do not fit: clear refusal before any worker starts (auto falls back to images).
    cfg.musar = cfg.musar.replace(condition_size=128)
    with pytest.raises(ValueError, match="encoded at 64px but musar.condition_size / condition_compaction gives 128px"):
        resolve_data_source(cfg, out, flux_path.resolve())
    cfg.data.source = "auto"
    assert resolve_data_source(cfg, out, flux_path.resolve())[0] == "images"
