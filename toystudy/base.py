"""The toy base model: a small FLUX-architecture text-to-image model pre-trained on the world.

It stands in for FLUX.1-dev's pretraining, so that MUSAR has a base that already grounds words in
image regions, as real base models do. Built once, in three steps, and saved as a diffusers
``FluxPipeline`` folder that MUSAR's jobs and ``MUSARPipeline`` load exactly like FLUX.1-dev:

1. tokenizers and text encoders: CLIP's real BPE tokenizer with a tiny CLIP text model (its pooled
   vector only modulates; trained jointly, or frozen at random init with ``train_clip=false``), and a
   word-level T5 tokenizer over the world's vocabulary (:data:`toystudy.world.VOCABULARY`, each word
   one piece, capitalised too) with a tiny T5 encoder that is trained jointly with the transformer;
2. an ``AutoencoderKL`` (4x downsampling, 4 latent channels: 8 px per packed token, so a 64 px panel
   is 8x8 tokens) fitted on rendered scenes, its shift and scale then set from the latents' statistics
   as FLUX's are;
3. a ``FluxTransformer2DModel`` pre-trained with rectified flow (timesteps logit-normal, shifted toward
   high noise by ``timestep_shift``) on scenes of 1-3 objects described by their prompts (each object
   fully or by its shape with some of its attributes, :func:`partial_prompt`), square and 2:1 (the
   diptych's shape), prompts encoded as FluxPipeline encodes them (padded, unmasked), no conditions,
   no guidance embedding; a share of prompts (``prompt_dropout``) is replaced by the empty prompt, so
   the base can be sampled with true classifier-free guidance (``MUSARPipeline(..., true_cfg_scale=...)``);
   and (``pair_fraction``, a quarter by default) *pair scenes*: one subject shown twice side by side,
   described in Subject200K's diptych words (:func:`pair_scene`), the in-context copy prior a real base
   gets from the web's many diptychs and that MUSAR's reference conditions build on.

Pretraining stops at ``steps`` or at ``time_budget_min``, whichever comes first; ``toy_base.json``
beside the model records what was done, the loss curve and the time each step took.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .world import VOCABULARY, sample_scene, with_article

T5_MAX_LENGTH = 96  # diptych prompts of the toy data run to ~70 words


@dataclass
class ToyBaseConfig:
    output: str = "outputs/toy/base"
    seed: int = 0
    image_size: int = 64  # square scenes; wide scenes are 2x as wide (the diptych's shape)
    wide_fraction: float = 0.25
    scenes: int = 6000  # pre-rendered pool of scenes (objects 1-3, equally often)
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_channels: tuple[int, int, int] = (16, 32, 32)  # no mid-block attention: 0.18 s/step at batch 16 on CPU
    steps: int = 20000
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 200
    layers: int = 2  # double-stream blocks
    single_layers: int = 4
    heads: int = 4
    head_dim: int = 32
    text_dim: int = 64  # T5 d_model = the transformer's joint_attention_dim
    time_budget_min: float | None = 56.0  # the whole build (render, VAE, pretraining): under an hour
    threads: int | None = None  # torch threads (None: torch's default)
    log_every: int = 200
    # Share of pretraining prompts replaced by the empty prompt, so the base also learns the
    # unconditional velocity that true classifier-free guidance (``true_cfg_scale``) needs.
    prompt_dropout: float = 0.1
    # Train the tiny CLIP jointly too, so its pooled vector (FLUX's AdaLN path, like DiT's class
    # embedding) carries the prompt's meaning; frozen, it is a random hash of the prompt. Binds
    # colour and pattern to words (README, toy study).
    train_clip: bool = True
    # SD3's timestep shift applied to the logit-normal draw, t -> s t / (1 + (s - 1) t): s > 1 trains
    # more at high noise, where this base decides a silhouette (benchmarks/toy_base_attributes.py);
    # 1.0 is the plain logit-normal of earlier builds. 3 took shape from noise from 0.18 to 0.66.
    timestep_shift: float = 3.0
    overwrite: bool = False
    # Continue pretraining an earlier build (its VAE, text encoders and transformer; no VAE fit).
    resume_from: str | None = None
    # Share of scenes (and of pretraining steps) that are pair scenes (:func:`pair_scene`): one subject
    # twice, in two panels of a 2:1 frame, the right panel's colour and pattern never named. Without
    # them no routed model customised at toy scale (README); 0 (w5's recipe) renders none and draws no
    # extra random numbers, so earlier builds are reproduced exactly.
    pair_fraction: float = 0.25
    # Share of pretraining (of the steps planned, re-estimated under a time budget) done before the
    # first pair scene; until then their share goes to square scenes. w8 (0.6) draws one described
    # subject right 0.54 of the time (w7, 0: 0.31), but copies a pair's left panel less (0.09 vs 0.19)
    # and customises less (README); 0 is w7's recipe.
    pair_start: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {self.image_size}")
        if self.head_dim % 8:
            raise ValueError(f"head_dim must be a multiple of 8 (three even RoPE axes), got {self.head_dim}")
        for name in ("scenes", "vae_steps", "vae_batch", "steps", "batch", "layers", "single_layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.wide_fraction <= 1:
            raise ValueError(f"wide_fraction must lie in [0, 1], got {self.wide_fraction}")
        if not 0 <= self.pair_fraction < 1 or self.wide_fraction + self.pair_fraction > 1:
            raise ValueError(f"pair_fraction must lie in [0, 1) with wide_fraction + pair_fraction <= 1, got "
                             f"pair_fraction={self.pair_fraction}, wide_fraction={self.wide_fraction}")  # fmt: skip
        if not 0 <= self.pair_start < 1:
            raise ValueError(f"pair_start must lie in [0, 1), got {self.pair_start}")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        if not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"prompt_dropout must lie in [0, 1), got {self.prompt_dropout}")


# ------------------------------------------------------------------------------------ tokenizers
def word_t5_tokenizer(max_length: int = T5_MAX_LENGTH):
    """A T5TokenizerFast whose pieces are the world's words: every word (and its capitalised form) is
    one token, so a subject phrase maps to exactly its words and offsets are exact."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -20.0)]
    for word in VOCABULARY:
        pieces.append(("▁" + word, -1.0))
        pieces.append((word, -2.0))  # punctuation glued to a word ("triangle." -> "▁triangle", ".")
        if word.isalpha():
            pieces.append(("▁" + word.capitalize(), -1.0))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip(hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    from musar_core.tiny import _clip_tokenizer

    tokenizer = _clip_tokenizer()
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         projection_dim=hidden, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407)  # fmt: skip
    return tokenizer, CLIPTextModel(cfg)


def _t5(dim: int, vocab: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab, d_model=dim, d_kv=dim // 4, d_ff=2 * dim, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=16, relative_attention_max_distance=64,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)  # fmt: skip
    return T5EncoderModel(cfg)


# ---------------------------------------------------------------------------------------- scenes
DETAIL_LEVELS = ((("colour", "pattern"), 0.5), ((), 0.25), (("colour",), 0.125), (("pattern",), 0.125))


def partial_prompt(scene, rng: np.random.Generator) -> str:
    """The scene's prompt with each object described fully or in part ('a triangle', 'a red triangle').

    Customisation prompts name a subject by its shape and leave colour and pattern to the reference
    image, so the base must know that an unnamed attribute may take any value.
    """
    from .world import objects_prompt

    parts = []
    for subject, placement in zip(scene.subjects, scene.placements):
        level = DETAIL_LEVELS[int(rng.choice(len(DETAIL_LEVELS), p=[w for _, w in DETAIL_LEVELS]))][0]
        parts.append(f"{with_article(_words(subject, level))} {placement.location}")
    return objects_prompt(parts, scene.background)


def _words(subject, level: tuple[str, ...]) -> str:
    """The subject's shape with the attributes ``level`` names: 'red triangle', 'triangle'."""
    return " ".join([getattr(subject, a) for a in ("colour", "pattern") if a in level] + [subject.shape])


def pair_scene(subject, size: int, rng: np.random.Generator, left_words: tuple[str, ...] | None = None):
    """(image (size x 2 size), prompt): ``subject`` in two panels (own placement and background each).

    The prompt is MUSAR's diptych sentence (``pipelines.samples.diptych_prompt``), each panel named as
    Subject200K's ``item`` is: the left fully or in part (:data:`DETAIL_LEVELS`), the right by its shape alone, so
    the right panel's colour and pattern can only come from the left panel's pixels. A base that
    learns this has an image-to-image copy prior that does not depend on where the object sits, which
    is what a reference condition asks of it (README, toy study). ``left_words`` fixes which of the
    left panel's attributes are named (``("colour", "pattern")``: all) instead of drawing them; the
    panels' draws stay the same.
    """
    from PIL import Image

    from pipelines.samples import diptych_prompt

    from .world import BACKGROUNDS, describe_panel, render_scene, sample_placements

    names = list(BACKGROUNDS)
    backgrounds = [names[int(k)] for k in rng.choice(len(names), size=2, replace=False)]
    canvas = Image.new("RGB", (2 * size, size))
    descriptions = []
    for panel, background in enumerate(backgrounds):
        placement = sample_placements([subject], rng)[0]
        canvas.paste(render_scene([subject], [placement], background, size, rng), (panel * size, 0))
        descriptions.append(describe_panel(placement, background, rng))
    level = left_words
    if level is not None and not set(level) <= {"colour", "pattern"}:
        raise ValueError(f"left_words names attributes among 'colour' and 'pattern', got {left_words!r}")
    if level is None:
        level = DETAIL_LEVELS[int(rng.choice(len(DETAIL_LEVELS), p=[w for _, w in DETAIL_LEVELS]))][0]
    left, right = _words(subject, level).capitalize(), _words(subject, ()).capitalize()
    prompt, _ = diptych_prompt(left, descriptions[0], right, descriptions[1])
    return canvas, prompt


def render_pairs(cfg: ToyBaseConfig, count: int, rng: np.random.Generator):
    """(uint8 images (N, 3, H, 2H), prompts) of pair scenes (:func:`pair_scene`)."""
    from .world import ALL_SUBJECTS

    h = cfg.image_size
    images = np.empty((count, 3, h, 2 * h), np.uint8)
    prompts = []
    for i in range(count):
        image, prompt = pair_scene(ALL_SUBJECTS[int(rng.integers(len(ALL_SUBJECTS)))], h, rng)
        images[i] = np.asarray(image).transpose(2, 0, 1)
        prompts.append(prompt)
    return images, prompts


def render_pool(cfg: ToyBaseConfig, count: int, wide: bool, rng: np.random.Generator):
    """(uint8 images (N, 3, H, W), prompts) of scenes with 1-3 objects, equally often."""
    h = cfg.image_size
    w = 2 * h if wide else h
    images = np.empty((count, 3, h, w), np.uint8)
    prompts = []
    for i in range(count):
        scene = sample_scene(rng, 1 + i % 3)
        if wide:  # the same scene spread over a 2:1 frame
            from .world import Scene, sample_placements

            scene = Scene(scene.subjects, sample_placements(scene.subjects, rng, aspect=2.0), scene.background)
        images[i] = np.asarray(scene.render((w, h), rng)).transpose(2, 0, 1)
        prompts.append(partial_prompt(scene, rng))
    return images, prompts


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------- VAE
def fit_vae(cfg: ToyBaseConfig, images: np.ndarray, log) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    blocks = len(cfg.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=tuple(cfg.vae_channels),
                        layers_per_block=1, norm_num_groups=min(32, cfg.vae_channels[0]), latent_channels=4,
                        sample_size=cfg.image_size, use_quant_conv=False, use_post_quant_conv=False,
                        mid_block_add_attention=False)  # fmt: skip
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    vae.train()
    for step in range(1, cfg.vae_steps + 1):
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
        x = _pixels(images[idx.numpy()])
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # cosine decay: sharper reconstructions at the end
            group["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps:
            log(f"vae step {step}/{cfg.vae_steps}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(_pixels(images[i : i + 64])).latent_dist.mode() for i in range(0, min(512, len(images)), 64)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return vae


# ----------------------------------------------------------------------------------- pretraining
@dataclass
class _Pool:
    latents: torch.Tensor  # (N, tokens, C) packed, shifted and scaled
    ids: torch.Tensor  # (N, T5 length) token ids
    pooled: torch.Tensor  # (N, Dp) frozen CLIP pooled vectors
    grid: tuple[int, int]
    null_ids: torch.Tensor  # (1, T5 length): the empty prompt, for prompt dropout
    null_pooled: torch.Tensor  # (1, Dp)
    clip_ids: torch.Tensor  # (N, 77) CLIP token ids, for a CLIP trained jointly (``train_clip``)
    null_clip_ids: torch.Tensor  # (1, 77)
    kind: str = "square"  # one of POOL_KINDS: which share of the scenes it is drawn with


def _encode_pool(images, prompts, vae, tokenizer, clip_tokenizer, clip, kind: str = "square") -> _Pool:
    from musar_core.encoding import encode_images

    with torch.no_grad():
        chunks, grid = [], None
        for i in range(0, len(images), 64):
            packed, grid = encode_images(vae, _pixels(images[i : i + 64]))
            chunks.append(packed)
        texts = [*prompts, ""]  # the empty prompt last
        clip_ids = clip_tokenizer(texts, padding="max_length", max_length=clip_tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
        pooled = torch.cat([clip(clip_ids[i : i + 256]).pooler_output for i in range(0, len(texts), 256)])
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    return _Pool(torch.cat(chunks), ids[:-1], pooled[:-1], grid, ids[-1:], pooled[-1:], clip_ids[:-1], clip_ids[-1:], kind)


POOL_KINDS = ("square", "wide", "pair")


def pool_weights(cfg: ToyBaseConfig, pairs: bool = True, kinds: tuple[str, ...] | None = None) -> torch.Tensor:
    """Draw weights of the pools ``kinds`` (by default those :func:`build_toy_base` makes, in its
    order: square, wide if any, pairs if any), each its share of the scenes; without pairs exactly the
    weights of earlier builds. ``pairs=False`` (before ``pair_start``) gives the pairs' share to the
    square scenes."""
    if kinds is None:
        kinds = tuple(k for k, share in zip(POOL_KINDS, (1.0, cfg.wide_fraction, cfg.pair_fraction)) if share > 0)
    pair = cfg.pair_fraction if pairs else 0.0
    shares = {"square": 1 - cfg.wide_fraction - pair, "wide": cfg.wide_fraction, "pair": pair}
    return torch.tensor([shares[k] for k in kinds])


def pretrain(
    cfg: ToyBaseConfig, pools: list[_Pool], t5, log, started: float, transformer=None, clip=None
) -> tuple[torch.nn.Module, dict]:
    """Rectified flow on the scene pools. The cosine schedule spans the steps that fit the time budget
    (re-estimated as steps are timed), so a budget-bound run still ends at a low learning rate.
    With ``train_clip`` the pooled vectors come from ``clip`` at every step, and it trains too."""
    if cfg.train_clip and clip is None:
        raise ValueError("train_clip needs the CLIP text model")
    from diffusers import FluxTransformer2DModel

    from musar_core.conditions import image_ids, text_ids
    from musar_core.objective import sample_timesteps

    rope = cfg.head_dim // 4  # FLUX: 16 of 128 for the id axis, 56 + 56 for rows and columns
    transformer = transformer or FluxTransformer2DModel(
        patch_size=1, in_channels=pools[0].latents.shape[2], num_layers=cfg.layers, num_single_layers=cfg.single_layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=cfg.text_dim,
        pooled_projection_dim=pools[0].pooled.shape[1], guidance_embeds=False,
        axes_dims_rope=(rope, (cfg.head_dim - rope) // 2, (cfg.head_dim - rope) // 2),  # (id, row, col) as FLUX
    )  # fmt: skip
    trained = [transformer, t5, *([clip] if cfg.train_clip else [])]
    params = [p for module in trained for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    kinds = tuple(pool.kind for pool in pools)  # their draw weights follow the pools actually rendered
    weights, early = pool_weights(cfg, kinds=kinds), pool_weights(cfg, pairs=False, kinds=kinds)
    pairs_on = cfg.pair_start == 0  # latched: a re-estimated plan never turns pair scenes off again
    budget = None if cfg.time_budget_min is None else cfg.time_budget_min * 60
    history, step_times = [], []
    for module in trained:
        module.train().requires_grad_(True)
    step, planned = 0, cfg.steps
    pool_steps, first_pair = dict.fromkeys(kinds, 0), None
    for step in range(1, cfg.steps + 1):
        tick = time.perf_counter()
        pairs_on = pairs_on or step > cfg.pair_start * planned
        share = weights if pairs_on else early
        which = int(torch.multinomial(share, 1, generator=g)) if len(pools) > 1 else 0
        pool, pool_steps[kinds[which]] = pools[which], pool_steps[kinds[which]] + 1
        if kinds[which] == "pair" and first_pair is None:
            first_pair = step
        idx = torch.randint(len(pool.latents), (cfg.batch,), generator=g)
        x0 = pool.latents[idx]
        t = sample_timesteps(cfg.batch, g, shift=cfg.timestep_shift)
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        ids, pooled, clip_ids = pool.ids[idx], pool.pooled[idx], pool.clip_ids[idx]
        if cfg.prompt_dropout > 0:  # no extra draw without dropout: earlier builds stay reproducible
            dropped = (torch.rand(cfg.batch, generator=g) < cfg.prompt_dropout)[:, None]
            ids, pooled = torch.where(dropped, pool.null_ids, ids), torch.where(dropped, pool.null_pooled, pooled)
            clip_ids = torch.where(dropped, pool.null_clip_ids, clip_ids)
        if cfg.train_clip:
            pooled = clip(clip_ids).pooler_output
        prompt = t5(ids)[0]
        pred = transformer(hidden_states=xt, encoder_hidden_states=prompt, pooled_projections=pooled,
                           timestep=t, img_ids=image_ids(*pool.grid), txt_ids=text_ids(prompt.shape[1]),
                           return_dict=False)[0]  # fmt: skip
        loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if budget is not None and step % 50 == 0:
            left = budget - (time.perf_counter() - started)
            planned = min(cfg.steps, step + max(1, int(left / float(np.mean(step_times[-50:])))))
        warm = min(1.0, step / cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / planned))))
        opt.step()
        step_times.append(time.perf_counter() - tick)
        history.append(loss.item())
        if step % cfg.log_every == 0:
            log(f"pretrain step {step}/{cfg.steps}: loss {np.mean(history[-cfg.log_every:]):.4f} "
                f"({np.mean(step_times[-cfg.log_every:]):.3f} s/step)")  # fmt: skip
        if budget is not None and (time.perf_counter() - started > budget or step >= planned):
            log(f"time budget of {cfg.time_budget_min} min reached at step {step}")
            break
    for module in trained:
        module.eval().requires_grad_(False)
    curve = [float(np.mean(history[i : i + cfg.log_every])) for i in range(0, len(history), cfg.log_every)]
    return transformer, {"steps_done": step, "loss_curve": curve, "s_per_step": float(np.mean(step_times)),
                         "pool_steps": pool_steps, "first_pair_step": first_pair}


# ------------------------------------------------------------------------------------------ build
def build_toy_base(cfg: ToyBaseConfig) -> Path:
    """Render, fit the VAE, pre-train, save; returns the diffusers folder (``cfg.output``)."""
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from musar_core.tiny import TINY_SCHEDULER_CONFIG

    out = Path(cfg.output).expanduser().absolute()
    if (out / "model_index.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds a model: pass overwrite=true to rebuild it")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    timing = {}

    def log(message: str) -> None:
        print(f"[toy base {time.perf_counter() - started:7.1f}s] {message}", flush=True)

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    wide_count = int(round(cfg.scenes * cfg.wide_fraction))
    pair_count = int(round(cfg.scenes * cfg.pair_fraction))
    square = render_pool(cfg, cfg.scenes - wide_count - pair_count, False, rng)
    wide = render_pool(cfg, wide_count, True, rng) if wide_count else None
    pairs = render_pairs(cfg, pair_count, rng) if pair_count else None
    timing["render_s"] = round(time.perf_counter() - started, 1)
    log(f"rendered {cfg.scenes} scenes ({wide_count} wide, {pair_count} pairs)")

    transformer, previous = None, {}
    if cfg.resume_from:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        src = Path(cfg.resume_from).expanduser().absolute()
        vae = AutoencoderKL.from_pretrained(src / "vae").eval().requires_grad_(False)
        clip_tokenizer, clip = AutoTokenizer.from_pretrained(src / "tokenizer"), CLIPTextModel.from_pretrained(src / "text_encoder")
        tokenizer, t5 = AutoTokenizer.from_pretrained(src / "tokenizer_2"), T5EncoderModel.from_pretrained(src / "text_encoder_2")
        transformer = FluxTransformer2DModel.from_pretrained(src / "transformer")
        previous = json.loads((src / "toy_base.json").read_text()) if (src / "toy_base.json").is_file() else {}
        log(f"resuming {src} ({previous.get('total_steps', previous.get('steps_done', '?'))} steps so far)")
    else:
        vae = fit_vae(cfg, square[0], log)
        clip_tokenizer, clip = _clip(32)
        tokenizer = word_t5_tokenizer()
        t5 = _t5(cfg.text_dim, len(tokenizer))
    timing["vae_s"] = round(time.perf_counter() - started - timing["render_s"], 1)
    clip.eval().requires_grad_(False)
    pools = [_encode_pool(*square, vae, tokenizer, clip_tokenizer, clip)]
    for kind, extra in (("wide", wide), ("pair", pairs)):
        if extra is not None:
            pools.append(_encode_pool(*extra, vae, tokenizer, clip_tokenizer, clip, kind))
    transformer, stats = pretrain(cfg, pools, t5, log, started, transformer, clip)
    stats["total_steps"] = stats["steps_done"] + int(previous.get("total_steps", previous.get("steps_done", 0)))
    if previous:
        stats["resumed_from"] = {"path": cfg.resume_from, "steps": stats["total_steps"] - stats["steps_done"],
                                 "loss_curve": previous.get("loss_curve")}  # fmt: skip
    timing["total_s"] = round(time.perf_counter() - started, 1)

    pipe = FluxPipeline(transformer=transformer, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=tokenizer,
                        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER_CONFIG))  # fmt: skip
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    (tmp / "toy_base.json").write_text(json.dumps({"config": asdict(cfg), "timing_s": timing, **stats}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"saved {out} ({stats['steps_done']} pretraining steps, {timing['total_s']:.0f}s in all)")
    return out


__all__ = ["POOL_KINDS", "T5_MAX_LENGTH", "ToyBaseConfig", "build_toy_base", "pair_scene", "pool_weights", "render_pairs", "render_pool",
           "word_t5_tokenizer"]
