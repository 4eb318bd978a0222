"""The optional encode stage with the tiny FLUX model: tensor shards training can read instead of images."""

import io

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from musar_core.encoding import FluxEncoders, encode_images, reference_tensor
from pipelines.build import DataBuildConfig, build_shards
from pipelines.encode import EncoderConfig, load_tensors
from pipelines.panels import PanelGeometry
from pipelines.schema import DATASETS
from pipelines.synthetic import SynthConfig, write_synthetic


def test_encode_stage_with_tiny_model(tmp_path, tiny_flux_path, ray_local):
    geometry = PanelGeometry(scale=0.125)
    write_synthetic(SynthConfig(output=str(tmp_path / "in"), rows=16, geometry=geometry, collection_2_fraction=1.0,
                                low_quality_fraction=0.0, rare_categories=0))  # fmt: skip
    out = tmp_path / "out"
    manifest = build_shards(DataBuildConfig(
        input=str(tmp_path / "in"), output=str(out), geometry=geometry, diptych_size=(128, 64), quiet=True,
        encode=True, encode_model=str(tiny_flux_path), encoder=EncoderConfig(batch_size=5, condition_size=64),
    ))  # fmt: skip
    enc = FluxEncoders.from_pretrained(tiny_flux_path)
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
