"""``MUSARPipeline``: multi-subject generation in diffusers' conventions.

Assembled from a FLUX.1 diffusers folder (VAE, CLIP and T5 encoders and tokenizers, transformer,
FlowMatchEulerDiscreteScheduler) plus a MUSAR LoRA. With zero subjects and no LoRA it is FLUX
text-to-image and reproduces ``FluxPipeline`` for the same seed and settings.

    pipe = MUSARPipeline.from_pretrained("/models/FLUX.1-dev", lora="runs/stage3/lora")
    out = pipe("a dog and a cat on the beach", subjects=[Subject("dog.jpg", "dog"), Subject("cat.jpg", "cat")],
               seed=0, return_routing=True)
    out.images[0].save("out.png"); render_routing_map(out.images[0], out.routing).save("maps.png")
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .conditions import image_ids, pack_latents, text_ids
from .config import MusarConfig
from .encoding import FluxEncoders, encode_conditions, encode_target_prompt, load_image, phrase_token_span
from .sampling import denoise
from .subjects import Subject, phrase_char_span
from .transformer import MusarTransformer


@dataclass
class RoutingTrace:
    """Dynamic routing of one generation: per denoising step, per block, routes and S*.

    ``routes[s][layer]`` is (batch, n) and ``affinity[s][layer]`` is (batch, n, c), on the CPU;
    ``grid`` = (rows, cols) of target tokens; ``subjects`` names each condition.
    """

    subjects: list[str]
    grid: tuple[int, int]
    timesteps: list[float] = field(default_factory=list)
    routes: list[dict[int, torch.Tensor]] = field(default_factory=list)
    affinity: list[dict[int, torch.Tensor]] = field(default_factory=list)

    def mean_affinity(self, step: int) -> torch.Tensor:
        """S* averaged over the blocks that routed at ``step``: (batch, n, c)."""
        maps = list(self.affinity[step].values())
        if not maps:
            raise ValueError(f"no routing was recorded at step {step} (fewer than two subjects?)")
        return torch.stack(maps).mean(0)


@dataclass
class MUSARPipelineOutput:
    images: list[Image.Image]
    routing: RoutingTrace | None = None


class MUSARPipeline:
    def __init__(
        self,
        transformer: MusarTransformer,
        encoders: FluxEncoders,
        scheduler,
        *,
        max_subjects: int = 5,
        max_sequence_length: int = 512,
    ) -> None:
        from diffusers.image_processor import VaeImageProcessor

        self.transformer, self.encoders, self.scheduler = transformer, encoders, scheduler
        self.max_subjects = max_subjects
        self.max_sequence_length = max_sequence_length
        self.image_processor = VaeImageProcessor(vae_scale_factor=encoders.vae_scale_factor * 2)
        self._offload_device: torch.device | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        lora: str | Path | None = None,
        config: MusarConfig | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "MUSARPipeline":
        """Load a local FLUX.1 diffusers folder unchanged, plus an optional MUSAR LoRA folder."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers FLUX folder (no model_index.json)")
        encoders = FluxEncoders.from_pretrained(path, torch_dtype=torch_dtype)
        transformer = MusarTransformer.from_pretrained(path, config=config, lora=lora, torch_dtype=torch_dtype).eval()
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
        return cls(transformer, encoders, scheduler, **kwargs)

    # ---- devices and memory --------------------------------------------------------------------
    def _modules(self):
        e = self.encoders
        return [self.transformer, e.vae, e.text_encoder, e.text_encoder_2]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "MUSARPipeline":
        for module in self._modules():
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self._offload_device or next(self.transformer.parameters()).device

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> None:
        """Keep every model on the CPU and move each to ``device`` only while it runs."""
        self._offload_device = torch.device(device)
        self.to("cpu")

    def enable_vae_slicing(self) -> None:
        self.encoders.vae.enable_slicing()

    def enable_vae_tiling(self) -> None:
        self.encoders.vae.enable_tiling()

    @contextlib.contextmanager
    def _on_device(self, *modules):
        if self._offload_device is not None:
            for m in modules:
                m.to(self._offload_device)
        try:
            yield
        finally:
            if self._offload_device is not None:
                for m in modules:
                    m.to("cpu")

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        subjects: list[Subject] | list[list[Subject]] | None = None,
        *,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        return_routing: bool = False,
        max_sequence_length: int | None = None,
        progress: bool = True,
        condition_cache: bool | None = None,
        true_cfg_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
    ) -> MUSARPipelineOutput:
        """Generate; ``condition_cache`` (default: on when the model isolates conditions) computes the
        conditions' K/V once per call instead of at every step.

        ``true_cfg_scale`` > 1 turns on true classifier-free guidance against ``negative_prompt``
        (default: the empty prompt; diffusers' FluxPipeline instead skips guidance without one), whose
        pass sees no subjects; it doubles the transformer's work.
        FLUX.1-dev is guidance-distilled (``guidance_scale``) and needs none; the toy base, trained with
        prompt dropout, does."""
        from diffusers.utils.torch_utils import randn_tensor

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = self._subjects_per_prompt(prompts, subjects)
        self._check_size(height, width)
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        # An explicit max_sequence_length is taken as given; the default is capped by the tokenizer's maximum.
        max_len = max_sequence_length or min(self.max_sequence_length, self.encoders.tokenizer_2.model_max_length)
        repeat = num_images_per_prompt
        batch = len(prompts) * repeat
        if true_cfg_scale < 1:
            raise ValueError(f"true_cfg_scale must be >= 1 (1 turns it off), got {true_cfg_scale}")
        negatives = None
        if true_cfg_scale > 1:
            many = isinstance(negative_prompt, (list, tuple))
            negatives = list(negative_prompt) if many else [negative_prompt or ""] * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        elif negative_prompt is not None:
            raise ValueError("negative_prompt is only used with true_cfg_scale > 1")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None:  # one generator per image: image i is reproducible on its own
            generator = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]

        enc, device = self.encoders, self.device
        c = len(per_prompt[0])
        spans = [[phrase_token_span(enc.tokenizer_2, p, *phrase_char_span(p, s), max_len) for s in subs]
                 for p, subs in zip(prompts, per_prompt)]  # fmt: skip
        with self._on_device(enc.text_encoder, enc.text_encoder_2, enc.vae):
            prompt_embeds, pooled = encode_target_prompt(enc, prompts, max_len)
            negative = encode_target_prompt(enc, negatives, max_len) if negatives else None
            conditions = None
            if c:
                images = [[load_image(subs[k].image) for subs in per_prompt for _ in range(repeat)] for k in range(c)]
                texts = [[subs[k].prompt for subs in per_prompt for _ in range(repeat)] for k in range(c)]
                cfg = self.transformer.config
                conditions = encode_conditions(enc, images, texts, condition_size=cfg.condition_size,
                                               max_prompt_tokens=cfg.condition_prompt_max_tokens,
                                               compaction=cfg.condition_compaction, rope_scheme=cfg.rope_scheme)  # fmt: skip
        prompt_embeds = prompt_embeds.repeat_interleave(repeat, 0).to(device)
        pooled = pooled.repeat_interleave(repeat, 0).to(device)
        phrase_spans = torch.tensor([s for s in spans for _ in range(repeat)], device=device) if c else None
        if negative is not None:
            negative = tuple(x.repeat_interleave(repeat, 0).to(device) for x in negative)

        scale = enc.vae_scale_factor
        lat_h, lat_w = height // scale, width // scale
        dtype = prompt_embeds.dtype
        noise = randn_tensor((batch, enc.vae.config.latent_channels, lat_h, lat_w), generator=generator,
                             device=device, dtype=dtype)  # fmt: skip
        with self._on_device(self.transformer):
            result = denoise(
                self.transformer, self.scheduler, pack_latents(noise), image_ids(lat_h // 2, lat_w // 2, device=device),
                prompt_embeds, pooled, text_ids(prompt_embeds.shape[1], device=device),
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, conditions=conditions,
                phrase_spans=phrase_spans, return_routing=return_routing and c >= 2, progress=progress,
                use_condition_cache=self.transformer.config.isolate_conditions if condition_cache is None else condition_cache,
                true_cfg_scale=true_cfg_scale, negative=negative,
            )  # fmt: skip
        with self._on_device(enc.vae):
            images = self._decode(result.latents, height, width)

        trace = None
        if return_routing:
            trace = RoutingTrace(subjects=[s.phrase for s in per_prompt[0]], grid=(lat_h // 2, lat_w // 2),
                                 timesteps=[float(t) for t in self.scheduler.timesteps])  # fmt: skip
            for record in result.routing:
                trace.routes.append({k: v.cpu() for k, v in record.routes.items()})
                trace.affinity.append({k: v.cpu() for k, v in record.affinity.items()})
        return MUSARPipelineOutput(images=images, routing=trace)

    def _decode(self, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        from .conditions import unpack_latents

        vae = self.encoders.vae
        scale = self.encoders.vae_scale_factor
        lat = unpack_latents(latents, height // scale, width // scale)
        lat = lat / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        param = next(vae.parameters())
        pixels = vae.decode(lat.to(param.device, param.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(pixels, output_type="pil")

    def _check_size(self, height: int, width: int) -> None:
        step = self.encoders.pixels_per_token
        if height <= 0 or width <= 0 or height % step or width % step:
            raise ValueError(f"height and width must be positive multiples of {step}, got {height}x{width}; "
                             f"try {max(step, round(height / step) * step)}x{max(step, round(width / step) * step)}")  # fmt: skip

    def _subjects_per_prompt(self, prompts: list[str], subjects) -> list[list[Subject]]:
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError("prompt must be a non-empty string or a list of them")
        if not subjects:
            return [[] for _ in prompts]
        nested = isinstance(subjects[0], (list, tuple))
        per_prompt = [list(s) for s in subjects] if nested else [list(subjects) for _ in prompts]
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} subject lists")
        counts = {len(s) for s in per_prompt}
        if len(counts) > 1:
            raise ValueError(f"every prompt of one call needs the same number of subjects, got {sorted(counts)}")
        if len(per_prompt[0]) > self.max_subjects:
            raise ValueError(f"{len(per_prompt[0])} subjects given; this pipeline allows at most {self.max_subjects} "
                             "(raise max_subjects if your memory allows)")  # fmt: skip
        for subs in per_prompt:
            for s in subs:
                if not isinstance(s, Subject):
                    raise ValueError(f"subjects must be musar_core.Subject objects, got {type(s).__name__}")
        return per_prompt
