"""Tiny, random-init FLUX.1-style model folders for tests and demos.

``build_tiny_flux`` writes a complete diffusers folder (``model_index.json`` plus
``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``text_encoder_2``,
``tokenizer_2``, ``scheduler``) so that tests exercise exactly the loading code
path used for real FLUX.1-dev (``FluxPipeline.from_pretrained(dir)``,
``FluxTransformer2DModel.from_pretrained(dir, subfolder="transformer")``, ...).

Everything is built offline (no hub access) and deterministically from a seed:

* The architecture constants that code under test may rely on are the real ones:
  VAE downsampling factor 8 with 4 latent channels packed 2x2 (-> 16 transformer
  input channels), FLUX.1-dev's VAE ``shift_factor``/``scaling_factor`` and its
  flow-matching scheduler config, a CLIP tokenizer with the real 49408-token
  BPE vocabulary (so prompts tokenize as with the real model) and a *fast* T5
  tokenizer (offset mappings are needed to locate words in prompts).
* Everything else (widths, depths, T5 vocabulary) is as small as possible: a
  64x64 image generates in well under a second on CPU. The folder is ~11 MB,
  ~10 MB of it the real CLIP vocabulary (49408x32 fp32 token embedding and the
  BPE ``tokenizer.json``); the rest is < 1 MB.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import tempfile
import uuid
from pathlib import Path

__all__ = [
    "TINY_TRANSFORMER_CONFIG",
    "TINY_VAE_CONFIG",
    "TINY_SCHEDULER_CONFIG",
    "TINY_T5_MAX_LENGTH",
    "build_tiny_flux",
    "tiny_flux_dir",
]

#: Kwargs for ``diffusers.FluxTransformer2DModel``. ``in_channels`` is 16 because
#: FLUX packs 2x2 patches of the (here 4-channel) VAE latent into one token;
#: ``axes_dims_rope`` must sum to ``attention_head_dim`` (RoPE over id/h/w axes).
TINY_TRANSFORMER_CONFIG: dict = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

#: Kwargs for ``diffusers.AutoencoderKL``. Four blocks give FLUX's real spatial
#: factor 2**3 = 8 (the pipeline derives ``vae_scale_factor`` from
#: ``len(block_out_channels)``); shift/scale are FLUX.1-dev's; FLUX's VAE has no
#: quant convs.
TINY_VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

#: FLUX.1-dev's ``scheduler/scheduler_config.json`` (resolution-dependent shift).
TINY_SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

#: Default T5 ``model_max_length`` (FLUX.1-dev uses 512; tiny keeps sequences short).
TINY_T5_MAX_LENGTH = 64

_CLIP_MAX_LENGTH = 77  # FluxPipeline takes the CLIP length from the tokenizer.
_CACHE_NAME = "tiny-flux-v1"
# Seed offsets so each component's weights depend only on (seed, component),
# not on build order.
_SEED_OFFSETS = {"transformer": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}


# --------------------------------------------------------------------------- CLIP
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char table.

    Printable latin-1 bytes map to themselves; the remaining 68 bytes (controls,
    space, ...) map to consecutive code points from 256 upward. The dict's
    *order* matters, as it gives the first 256 token ids: printable bytes first,
    then the others (so ``a</w>`` is id 320, as in CLIP, not 256 + 97).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Real CLIP BPE vocabulary, derived from the merges file open_clip ships.

    CLIP uses the first 49152 - 256 - 2 merges of ``bpe_simple_vocab_16e6``
    (line 0 is a version header). Token ids are: 256 byte symbols, the same
    with ``</w>`` (end of word), one token per merge, then the two specials ->
    49408 ids, ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407.
    The file is located without importing open_clip (whose import is slow).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is required: it bundles the CLIP BPE merges file")
    bpe = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _clip_tokenizer():
    from transformers import CLIPTokenizer  # tokenizers-backed ("fast") in transformers 5

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_MAX_LENGTH)


# --------------------------------------------------------------------------- T5
_SUBJECTS = (
    "dog", "cat", "backpack", "teapot", "sneaker", "plushie", "bear plushie", "wolf plushie",
    "sloth plushie", "duck toy", "robot toy", "monster toy", "rc car", "candle", "clock", "vase",
    "berry bowl", "can", "boot", "sunglasses", "cartoon", "emoji", "puppy", "kitten", "bag",
    "handbag", "shoe", "mug", "cup", "bottle", "lamp", "chair", "sofa", "table", "watch", "phone",
    "camera", "guitar", "bicycle", "car", "truck", "hat", "jacket", "dress", "shirt", "toy",
    "figurine", "bowl", "plate", "kettle", "helmet", "umbrella", "book", "pillow", "basket",
    "glasses", "ring", "necklace", "perfume", "headphones", "speaker", "laptop", "keyboard",
    "teddy bear", "doll", "horse", "bird", "rabbit", "person", "man", "woman", "child", "girl", "boy",
)
_ADJECTIVES = (
    "red", "blue", "green", "yellow", "purple", "pink", "orange", "black", "white", "grey", "brown",
    "golden", "silver", "shiny", "wet", "fluffy", "cute", "small", "large", "old", "new", "wooden",
    "metal", "plastic", "leather", "colorful", "striped", "cube shaped", "vintage", "modern",
)
_SCENES = (
    "in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
    "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
    "with a blue house in the background", "on top of a purple rug in a forest",
    "with a wheat field in the background", "with a tree and autumn leaves in the background",
    "with the Eiffel Tower in the background", "floating on top of water", "floating in an ocean of milk",
    "on top of green grass with sunflowers around it", "on top of a mirror",
    "on top of the sidewalk in a crowded street", "on top of a dirt road", "on top of a white rug",
    "on a white background", "in a kitchen", "in a living room", "on a desk", "at night",
    "under the rain", "in the desert", "next to a river", "in a garden", "on a shelf",
)
_TEMPLATES = (
    "Two images concatenated side by side, the left part is {a} {adj} {s}, the right part is "
    "the same {s} {scene}.",
    "a photo of {a} {adj} {s} {scene}",
    "{A} {adj} {s} {scene}, and another {s2} next to it.",
    "This item is {a} {adj} {s}; this item appears {scene}.",
    "A close-up picture of the {s} {scene}, high quality, 4k, detailed. The {s} is {adj}.",
    "{A} {adj} {s} and the {s2} {scene}!",
)


def _t5_corpus() -> list[str]:
    """Deterministic English captions in the style of Subject200K/DreamBench
    prompts; index arithmetic makes every subject, adjective, scene and
    template occur many times."""
    out = []
    for i in range(len(_SUBJECTS) * len(_ADJECTIVES)):
        adj = _ADJECTIVES[i % len(_ADJECTIVES)]
        article = "an" if adj[0] in "aeiou" else "a"
        out.append(
            _TEMPLATES[(i // 7) % len(_TEMPLATES)].format(
                s=_SUBJECTS[i % len(_SUBJECTS)],
                s2=_SUBJECTS[(5 * i + 3) % len(_SUBJECTS)],
                adj=adj,
                scene=_SCENES[(i // 3) % len(_SCENES)],
                a=article,
                A=article.capitalize(),
            )
        )
    return out


_EXTRA_WORDS = (
    "the a an and or of in on at to with without from by for into onto over under near behind front "
    "is are was were be been being has have had it its this that these those same another other each "
    "one two three four left right top bottom middle part side image images photo picture scene view "
    "subject object item items background foreground style real realistic high quality detailed sharp "
    "lighting light dark bright soft studio outdoor indoor sunny cloudy sunset morning evening"
).split()


def _t5_pieces() -> list[tuple[str, float]]:
    """Unigram ``(piece, log-prob)`` list estimated by counting words in `_t5_corpus`.

    Why not run an EM trainer (sentencepiece / ``tokenizers.UnigramTrainer``)?
    Both seed candidate pieces from substrings repeated across *distinct*
    sentences/words; on a small templated corpus whole words are rarely seeds,
    so they keep only a few hundred pieces and split frequent words ("images" ->
    "i ma ge s"). Counting whole words gives T5-like pieces ("▁dog") instead.

    Pieces, like a sentencepiece model sorted by score: every corpus word as a
    word start (``▁dog``), capitalised (``▁Dog``) and as a continuation
    (``dog``); every printable ASCII character bare and word-initial, scored
    below any word so it is only a fallback (ASCII text never maps to <unk>).
    """
    import math
    import re
    import string
    from collections import Counter

    counts = Counter()
    for line in _t5_corpus():
        counts.update(re.findall(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]", line))
    counts.update(w for w in _EXTRA_WORDS if w not in counts)
    total = sum(counts.values())
    scores: dict[str, float] = {}

    def add(piece: str, count: float) -> None:
        scores[piece] = max(scores.get(piece, -math.inf), math.log(count / total))

    for w, n in counts.items():
        add("▁" + w, n)
        if w.isalpha():
            add("▁" + w.capitalize(), n / 10)
            add(w, n / 100)
    char_count = 1 / (10 * len(string.printable))
    for c in string.ascii_letters + string.digits + string.punctuation:
        add(c, char_count)
        add("▁" + c, char_count)
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", math.log(char_count / total))] + ranked


def _t5_tokenizer(max_length: int):
    """A ``T5TokenizerFast`` (tokenizers-backed Unigram) over `_t5_pieces`.

    Special ids follow T5: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ``▁`` 3.
    No sentinel (``<extra_id_*>``) tokens: only span-corruption pretraining
    uses them. Built from the ``(piece, score)`` list, because
    ``T5Tokenizer(vocab_file=...)`` (spiece.model) is ignored in transformers 5.
    """
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=_t5_pieces(), extra_ids=0, model_max_length=max_length)


# --------------------------------------------------------------------------- models
def _text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,  # = pooled_projection_dim: FLUX uses CLIP's pooled output
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=32,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,  # pooled token = first <|endoftext|>
        pad_token_id=49407,
    )
    return CLIPTextModel(cfg)


def _text_encoder_2(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=32,  # = joint_attention_dim
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


def _seeded(seed: int, make):
    """Run ``make()`` under a private RNG state so builds are reproducible and
    callers' global torch RNG is left untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _write_folder(out: Path, seed: int, t5_max_length: int) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer(t5_max_length)
    s = {k: seed * 16 + v for k, v in _SEED_OFFSETS.items()}
    pipe = FluxPipeline(
        transformer=_seeded(s["transformer"], lambda: FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)),
        vae=_seeded(s["vae"], lambda: AutoencoderKL(**TINY_VAE_CONFIG)),
        text_encoder=_seeded(s["text_encoder"], lambda: _text_encoder(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(s["text_encoder_2"], lambda: _text_encoder_2(len(tokenizer_2))),
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(out)


def _move_into_place(tmp: Path, path: Path, replace: bool) -> None:
    """Rename the finished ``tmp`` dir to ``path`` so readers never see a
    half-written folder. With ``replace`` an existing ``path`` is first renamed
    aside (and deleted); without it, an existing complete build at ``path``
    wins and ``tmp`` is dropped by the caller (concurrent cache builders)."""
    for _ in range(5):
        old = None
        if path.exists():
            if not replace and (path / "model_index.json").is_file():
                return
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, old)
            except FileNotFoundError:  # a concurrent builder moved it first
                old = None
        try:
            os.rename(tmp, path)
        except OSError:  # another builder's copy landed in between: retry
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise RuntimeError(f"could not move tiny FLUX build into place at {path}")


def _build(path, seed: int, t5_max_length: int, replace: bool) -> Path:
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final folder should not be
    try:
        _write_folder(tmp, seed=seed, t5_max_length=t5_max_length)
        _move_into_place(tmp, path, replace=replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_flux(path, seed: int = 0, t5_max_length: int = TINY_T5_MAX_LENGTH) -> Path:
    """Write a tiny random-init FLUX.1 diffusers folder to ``path`` and return it.

    Load it like the real model: ``FluxPipeline.from_pretrained(path)``.
    Weights are a pure function of ``seed``; the T5 tokenizer's
    ``model_max_length`` is ``t5_max_length`` (pass the same value as
    ``max_sequence_length`` to the pipeline). An existing folder at ``path`` is
    replaced: the build goes to a temporary sibling that is then renamed.
    """
    return _build(path, seed=seed, t5_max_length=t5_max_length, replace=True)


def tiny_flux_dir(cache_root=None) -> Path:
    """Cached default build (seed 0): ``<cache_root>/tiny-flux-v1``.

    ``cache_root`` defaults to ``$MUSAR_CACHE`` or ``~/.cache/musar``. The folder
    is built once; since builds are renamed into place only when complete, the
    presence of ``model_index.json`` means the folder is usable. Bump the
    ``-v1`` suffix whenever the tiny architecture changes.
    """
    root = Path(cache_root or os.environ.get("MUSAR_CACHE") or Path.home() / ".cache" / "musar")
    path = root.expanduser() / _CACHE_NAME
    if not (path / "model_index.json").is_file():
        _build(path, seed=0, t5_max_length=TINY_T5_MAX_LENGTH, replace=False)
    return path
