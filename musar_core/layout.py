"""Token layout: which token of a MUSAR forward belongs to which group, and where it sits.

Groups (DESIGN.md section 1): ``prompt`` (T, the target prompt's T5 tokens), ``target`` (X, the
noisy image tokens) and, for each condition k, ``cond[k]`` = its condition-prompt tokens CT^k plus
its VAE image tokens CI^k. FLUX processes text-like tokens (T, CT^k) with the context weights and
image-like tokens (X, CI^k) with the image weights, so two *streams* exist next to the *joint*
sequence that attention and the single-stream blocks see:

    text stream  = [T, CT^0, ..., CT^{c-1}]
    image stream = [X, CI^0, ..., CI^{c-1}]
    joint        = [T, X, CT^0, CI^0, ..., CT^{c-1}, CI^{c-1}]

The joint order keeps every group contiguous, so routed attention works on plain slices. With no
conditions the joint order is FLUX's own ``[T; X]``. Everything that needs to know "which rows are
whose" asks this object; nothing else hard-codes offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

PROMPT = 0
TARGET = 1


def cond_group(k: int) -> int:
    """Group id of condition k."""
    return 2 + k


def group_name(group: int) -> str:
    return {PROMPT: "prompt", TARGET: "target"}.get(group, f"cond[{group - 2}]")


class Segment(NamedTuple):
    """A contiguous run of rows [start, end) of one group inside one sequence."""

    group: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class TokenLayout:
    """Sizes of every group for one forward pass, shared by every sample of the batch.

    ``phrase_spans`` is a (batch, c, 2) long tensor of (p_k, l_k): condition k's phrase occupies
    prompt tokens ``p_k : p_k + l_k`` (paper eq. 3). It may differ per sample; dynamic routing needs it.
    """

    prompt_len: int
    target_len: int
    cond_text_lens: tuple[int, ...] = ()
    cond_image_lens: tuple[int, ...] = ()
    phrase_spans: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cond_text_lens", tuple(int(x) for x in self.cond_text_lens))
        object.__setattr__(self, "cond_image_lens", tuple(int(x) for x in self.cond_image_lens))
        if self.prompt_len < 0 or self.target_len < 0:
            raise ValueError(f"negative token counts: prompt_len={self.prompt_len}, target_len={self.target_len}")
        # prompt_len = target_len = 0 is the condition-only pass that fills a condition cache.
        if len(self.cond_text_lens) != len(self.cond_image_lens):
            raise ValueError(
                f"every condition needs a prompt and an image: got {len(self.cond_text_lens)} condition prompts "
                f"and {len(self.cond_image_lens)} condition images"
            )
        for k, (mt, ni) in enumerate(zip(self.cond_text_lens, self.cond_image_lens)):
            if mt < 0 or ni < 1:
                raise ValueError(f"condition {k} has {mt} prompt tokens and {ni} image tokens; needs >= 0 and >= 1")
        if self.phrase_spans is not None:
            self._check_spans(self.phrase_spans)

    def _check_spans(self, spans: torch.Tensor) -> None:
        c = self.num_conditions
        if spans.ndim != 3 or spans.shape[1] != c or spans.shape[2] != 2:
            raise ValueError(f"phrase_spans must have shape (batch, {c}, 2) for {c} conditions, got {tuple(spans.shape)}")
        if spans.is_meta:
            return
        starts, lengths = spans[..., 0], spans[..., 1]
        if bool((lengths < 1).any()):
            raise ValueError(f"phrase_spans: every phrase needs at least one token, got lengths {lengths.tolist()}")
        if bool((starts < 0).any()) or bool((starts + lengths > self.prompt_len).any()):
            raise ValueError(
                f"phrase_spans lie outside the {self.prompt_len} prompt tokens: (start, length) = {spans.tolist()}"
            )

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_conditions(self) -> int:
        return len(self.cond_image_lens)

    @property
    def num_groups(self) -> int:
        return 2 + self.num_conditions

    @property
    def text_len(self) -> int:
        return self.prompt_len + sum(self.cond_text_lens)

    @property
    def image_len(self) -> int:
        return self.target_len + sum(self.cond_image_lens)

    @property
    def joint_len(self) -> int:
        return self.text_len + self.image_len

    # ---- segments ----------------------------------------------------------------------------
    def text_segments(self) -> list[Segment]:
        segs, pos = [Segment(PROMPT, 0, self.prompt_len)], self.prompt_len
        for k, mt in enumerate(self.cond_text_lens):
            segs.append(Segment(cond_group(k), pos, pos + mt))
            pos += mt
        return segs

    def image_segments(self) -> list[Segment]:
        segs, pos = [Segment(TARGET, 0, self.target_len)], self.target_len
        for k, ni in enumerate(self.cond_image_lens):
            segs.append(Segment(cond_group(k), pos, pos + ni))
            pos += ni
        return segs

    def joint_segments(self) -> list[Segment]:
        """Joint rows in order; a condition contributes two segments (its CT then its CI)."""
        segs = [Segment(PROMPT, 0, self.prompt_len), Segment(TARGET, self.prompt_len, self.prompt_len + self.target_len)]
        pos = segs[-1].end
        for k, (mt, ni) in enumerate(zip(self.cond_text_lens, self.cond_image_lens)):
            segs.append(Segment(cond_group(k), pos, pos + mt))
            segs.append(Segment(cond_group(k), pos + mt, pos + mt + ni))
            pos += mt + ni
        return segs

    def group_ranges(self) -> list[tuple[int, int]]:
        """Joint [start, end) of every group, indexed by group id (each group is contiguous in joint order)."""
        ranges = [(0, self.prompt_len), (self.prompt_len, self.prompt_len + self.target_len)]
        pos = ranges[-1][1]
        for mt, ni in zip(self.cond_text_lens, self.cond_image_lens):
            ranges.append((pos, pos + mt + ni))
            pos += mt + ni
        return ranges

    def cond_text_range(self, k: int) -> tuple[int, int]:
        """Joint rows of CT^k (the first part of cond[k]'s range)."""
        start = self.group_ranges()[cond_group(k)][0]
        return start, start + self.cond_text_lens[k]

    def group_labels(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(joint_len,) long tensor: the group id of every joint row."""
        sizes = torch.tensor([e - s for s, e in self.group_ranges()], device=device)
        return torch.repeat_interleave(torch.arange(self.num_groups, device=device), sizes, output_size=self.joint_len)

    # ---- moving between streams and joint order ----------------------------------------------
    def to_joint(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Interleave the two streams (sequence dim 1) into joint order."""
        if self.num_conditions == 0:
            return torch.cat([text, image], dim=1)
        m, n = self.prompt_len, self.target_len
        text_parts = text[:, m:].split(self.cond_text_lens, dim=1)
        image_parts = image[:, n:].split(self.cond_image_lens, dim=1)
        pieces = [text[:, :m], image[:, :n]]
        for ct, ci in zip(text_parts, image_parts):
            pieces += [ct, ci]
        return torch.cat(pieces, dim=1)

    def from_joint(self, joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`to_joint`: (text stream, image stream)."""
        m, n = self.prompt_len, self.target_len
        if self.num_conditions == 0:
            return joint[:, :m], joint[:, m:]
        sizes = [m, n]
        for mt, ni in zip(self.cond_text_lens, self.cond_image_lens):
            sizes += [mt, ni]
        parts = joint.split(sizes, dim=1)
        text = torch.cat([parts[0], *parts[2::2]], dim=1)
        image = torch.cat([parts[1], *parts[3::2]], dim=1)
        return text, image

    def target_rows(self, joint: torch.Tensor) -> torch.Tensor:
        start, end = self.group_ranges()[TARGET]
        return joint[:, start:end]

    def span_weights(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """(batch, prompt_len, c) matrix W with W[b, p_k:p_k+l_k, k] = 1/l_k, so S* = S @ W (eq. 3)."""
        if self.phrase_spans is None:
            raise ValueError("dynamic routing needs phrase_spans: the (start, length) of each condition's phrase")
        return span_weights(self.phrase_spans, self.prompt_len, dtype, device)


def span_weights(spans: torch.Tensor, prompt_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(batch, prompt_len, c) from (batch, c, 2) spans: W[b, p_k:p_k+l_k, k] = 1/l_k, so S* = S @ W (eq. 3)."""
    spans = spans.to(device)
    pos = torch.arange(prompt_len, device=device)[None, :, None]
    start, length = spans[..., 0][:, None, :], spans[..., 1][:, None, :]
    inside = (pos >= start) & (pos < start + length)
    return inside.to(dtype) / length.to(dtype)
