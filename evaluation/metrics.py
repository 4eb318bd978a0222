"""DINO, CLIP-I and CLIP-T as the paper's Table 1 reports them.

- DINO: DINO v1 ViT-S/16 (``ViTModel`` without pooling layer), the CLS token of the last hidden
  state; preprocessing as DINO's own evaluation: resize the shorter side to 256 (bicubic), centre
  crop 224, ImageNet mean/std.
- CLIP-I: CLIP ViT-B/32 image embeddings (open_clip ``encode_image``); CLIP-T: image embedding vs
  the prompt's text embedding (``encode_text``), cosine x 100. CLIP images go through open_clip's
  own eval transform for the model (resize shorter side to 224 bicubic, centre crop, OpenAI
  mean/std), prompts through its tokenizer (77 tokens, truncated).
- A generated image is compared with every real image of each of its subjects: per subject the
  mean cosine over that subject's images; DINO and CLIP-I of the image are the mean over its
  subjects (one subject for single-subject cases). CLIP-T is not clipped at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_T_SCALE = 100.0


def dino_transform():
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, d) x (m, d) -> (n, m) cosine similarities, in float32."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def mean_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(n,) mean cosine of each generated embedding with all reference embeddings of one subject."""
    return cosine_matrix(generated, references).mean(dim=1)


def clip_t(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(n,) CLIP-T: 100 x cosine of each image with its own prompt (row i with row i)."""
    return CLIP_T_SCALE * (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)


def image_scores(dino: torch.Tensor, clip_image: torch.Tensor, clip_text: torch.Tensor,
                 subject_refs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:  # fmt: skip
    """Scores of one generated image from its embeddings (1-D) and each subject's (dino, clip) reference embeddings."""
    per_subject = [{"dino": float(mean_similarity(dino[None], d_ref)[0]),
                    "clip_i": float(mean_similarity(clip_image[None], c_ref)[0])} for d_ref, c_ref in subject_refs]  # fmt: skip
    return {
        "dino": sum(s["dino"] for s in per_subject) / len(per_subject),
        "clip_i": sum(s["clip_i"] for s in per_subject) / len(per_subject),
        "clip_t": float(clip_t(clip_image[None], clip_text[None])[0]),
        "per_subject": per_subject,
    }


class DinoEmbedder:
    def __init__(self, model, device: str | torch.device = "cpu"):
        self.model, self.device, self.transform = model.to(device).eval(), torch.device(device), dino_transform()

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.transform(im.convert("RGB")) for im in images]).to(self.device)
        return self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu()


class ClipEmbedder:
    def __init__(self, parts, device: str | torch.device = "cpu"):
        self.model = parts.model.to(device).eval()
        self.preprocess, self.tokenizer, self.device = parts.preprocess, parts.tokenizer, torch.device(device)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return self.model.encode_image(pixels).float().cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()


@dataclass
class MetricModels:
    dino: DinoEmbedder
    clip: ClipEmbedder

    @classmethod
    def load(cls, dino_path: str, clip_path: str, device: str | torch.device = "cpu") -> MetricModels:
        from .metric_models import load_clip, load_dino

        return cls(DinoEmbedder(load_dino(dino_path), device), ClipEmbedder(load_clip(clip_path), device))

    def references(self, images: list[Image.Image], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(DINO, CLIP) embeddings of one subject's real images."""
        chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        return torch.cat([self.dino(c) for c in chunks]), torch.cat([self.clip.images(c) for c in chunks])
