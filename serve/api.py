"""The HTTP API's requests: parsing, validation and limits, independent of Ray.

``POST /v1/generate`` takes either a JSON body (subject images base64-encoded, data URLs allowed)
or ``multipart/form-data`` with the same fields flattened (``prompt``, ``seed``, ``steps``,
``subjects[0].image`` as a file part, ``subjects[0].phrase``, ...). Both become one
:class:`GenerateRequest`; every problem is an :class:`ApiError` with an HTTP status and the name of
the field, raised before any image is decoded in full and before the model sees the request.

Images are opened with PIL restricted to PNG, JPEG and WebP. The header is read first and an image
whose declared size exceeds ``limits.max_pixels`` is refused without decoding its pixels
(decompression bombs); PIL's own ``MAX_IMAGE_PIXELS`` is set to the same limit by the ingress.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from musar_core.subjects import Subject, phrase_char_span

from .config import LimitsConfig, ServeAppConfig

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_SEED = 2**63 - 1
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_FORM_FIELD = re.compile(r"^subjects\[(\d{1,2})\]\.(image|phrase|occurrence|span|condition_prompt)$")


class ApiError(Exception):
    """A request the API refuses: HTTP ``status``, the offending ``field`` and a message for people."""

    def __init__(self, status: int, field: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message
        self.code = code or {400: "malformed_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
                             415: "unsupported_media_type", 422: "invalid_field"}.get(status, "error")  # fmt: skip

    def body(self) -> dict:
        return {"error": {"code": self.code, "field": self.field, "message": self.message}}


# ---- schema ------------------------------------------------------------------------------------
class SubjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str | bytes = Field(description="base64 (or a data URL) in JSON; the uploaded file in multipart")
    phrase: str = Field(max_length=200)
    occurrence: int | None = Field(default=None, ge=0)
    span: list[int] | None = Field(default=None, min_length=2, max_length=2)
    condition_prompt: str | None = Field(default=None, max_length=500)


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    subjects: list[SubjectIn] = Field(default_factory=list, max_length=64)
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    lora: str | None = None
    routing_map: bool = False
    format: Literal["png", "json"] | None = None


@dataclass
class GenerateRequest:
    """A request that passed every check: what the model deployment receives."""

    prompt: str
    subjects: list[Subject]
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    lora: str | None = None
    routing_map: bool = False
    response_format: str = "png"
    timings: dict = field(default_factory=dict)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        return (self.height, self.width, self.steps, self.guidance, len(self.subjects))


# ---- bodies ------------------------------------------------------------------------------------
def check_content_length(header: str | None, limits: LimitsConfig) -> None:
    if header is None:
        return
    try:
        length = int(header)
    except ValueError:
        raise ApiError(400, "body", f"Content-Length {header!r} is not a number") from None
    if length > limits.max_request_bytes():
        raise ApiError(413, "body", f"request body is {length} bytes; the limit is {limits.max_request_bytes()}")


def parse_body(content_type: str | None, body: bytes) -> dict:
    """JSON or multipart body -> a plain dict (form values converted to the schema's types)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json":
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApiError(400, "body", f"the body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "body", f"the body must be a JSON object, got {type(data).__name__}")
        return data
    if media == "multipart/form-data":
        return parse_multipart(content_type, body)
    raise ApiError(415, "body", f"Content-Type must be application/json or multipart/form-data, "
                                f"got {media or 'none'!r}")  # fmt: skip


def parse_multipart(content_type: str, body: bytes) -> dict:
    """``multipart/form-data`` -> dict, with the standard library's MIME parser (no extra dependency)."""
    if "boundary=" not in content_type:
        raise ApiError(400, "body", "multipart/form-data without a boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    try:
        message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    except Exception as err:  # the parser is lenient; anything it raises means the body is garbage
        raise ApiError(400, "body", f"malformed multipart body: {err}") from None
    if not message.is_multipart() or message.defects:
        raise ApiError(400, "body", "malformed multipart body (boundary not found or parts broken)")
    data: dict = {}
    subjects: dict[int, dict] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise ApiError(400, "body", "a multipart part has no name")
        payload = part.get_payload(decode=True) or b""
        match = _FORM_FIELD.match(name)
        if match:
            index, key = int(match.group(1)), match.group(2)
            if key == "image":
                subjects.setdefault(index, {})[key] = payload
            else:
                subjects.setdefault(index, {})[key] = _form_value(name, key, _text(name, payload))
        elif name.startswith("subjects"):
            raise ApiError(422, name, f"unknown form field {name!r}; use subjects[N].image, subjects[N].phrase, "
                                      "subjects[N].occurrence or subjects[N].span")  # fmt: skip
        else:
            if name in data:
                raise ApiError(422, name, f"form field {name!r} is given twice")
            data[name] = _form_value(name, name, _text(name, payload))
    if subjects:
        expected = list(range(len(subjects)))
        if sorted(subjects) != expected:
            raise ApiError(422, "subjects", f"subject indices must be 0..{len(subjects) - 1} without gaps, "
                                            f"got {sorted(subjects)}")  # fmt: skip
        data["subjects"] = [subjects[i] for i in expected]
    return data


def _text(name: str, payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, name, f"form field {name!r} is not UTF-8 text") from None


def _form_value(name: str, key: str, text: str):
    """Form fields are text: convert the typed ones, naming the field when that fails."""
    if text == "" and key not in ("prompt", "phrase", "condition_prompt"):
        return None
    if key in ("seed", "steps", "width", "height", "occurrence"):
        try:
            return int(text)
        except ValueError:
            raise ApiError(422, name, f"{name} must be an integer, got {text!r}") from None
    if key == "guidance":
        try:
            return float(text)
        except ValueError:
            raise ApiError(422, name, f"{name} must be a number, got {text!r}") from None
    if key == "routing_map":
        lowered = text.strip().lower()
        if lowered in ("true", "1", "on", "yes"):
            return True
        if lowered in ("false", "0", "off", "no"):
            return False
        raise ApiError(422, name, f"{name} must be true or false, got {text!r}")
    if key == "span":
        try:
            return [int(v) for v in text.split(",")]
        except ValueError:
            raise ApiError(422, name, f"{name} must be START,END character offsets, got {text!r}") from None
    return text


# ---- validation --------------------------------------------------------------------------------
def _field_name(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    # pydantic names the member of a union it tried ("image.str"): the field is what the client sent
    return re.sub(r"\.(str|bytes|int|float|list\[int\])$", "", out) or "body"


def _schema_error(err: ValidationError) -> ApiError:
    first = err.errors(include_url=False)[0]
    name = _field_name(tuple(first["loc"]))
    kind = first["type"]
    if kind == "extra_forbidden":
        message = f"unknown field {name!r}"
    elif name.endswith(".image") and kind in ("string_type", "bytes_type"):
        return ApiError(422, name, f"{name} must be a base64 string (or data URL) in JSON, or a file part in "
                                   f"multipart/form-data (got {_short(first.get('input'))})")  # fmt: skip
    elif kind == "missing":
        message = f"{name} is required"
    else:
        message = f"{name}: {first['msg']} (got {_short(first.get('input'))})"
    details = [f"{_field_name(tuple(e['loc']))}: {e['msg']}" for e in err.errors(include_url=False)]
    error = ApiError(422, name, message)
    error.message = message if len(details) == 1 else f"{message}; all problems: {'; '.join(details)}"
    return error


def _short(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate(data: dict, cfg: ServeAppConfig, *, known_loras: set[str], accept: str | None = None) -> GenerateRequest:
    """Schema, limits, phrases and images, cheapest first; returns the request the model runs."""
    try:
        req = GenerateIn.model_validate(data, strict=True)
    except ValidationError as err:
        raise _schema_error(err) from None
    lim, d = cfg.limits, cfg.defaults
    if not req.prompt.strip():
        raise ApiError(422, "prompt", "prompt must be a non-empty string")
    if len(req.prompt) > lim.max_prompt_chars:
        raise ApiError(422, "prompt", f"prompt has {len(req.prompt)} characters; the limit is {lim.max_prompt_chars}")
    if len(req.subjects) > lim.max_subjects:
        raise ApiError(422, "subjects", f"{len(req.subjects)} subjects given; the limit is {lim.max_subjects}")
    steps = d.steps if req.steps is None else req.steps
    if not lim.min_steps <= steps <= lim.max_steps:
        raise ApiError(422, "steps", f"steps must be between {lim.min_steps} and {lim.max_steps}, got {steps}")
    size = {}
    for name in ("width", "height"):
        value = getattr(d, name) if getattr(req, name) is None else getattr(req, name)
        if not lim.min_size <= value <= lim.max_size or value % 16:
            raise ApiError(422, name, f"{name} must be a multiple of 16 between {lim.min_size} and {lim.max_size}, "
                                      f"got {value}")  # fmt: skip
        size[name] = value
    guidance = d.guidance if req.guidance is None else float(req.guidance)
    if not math.isfinite(guidance) or not lim.min_guidance <= guidance <= lim.max_guidance:
        raise ApiError(422, "guidance", f"guidance must be between {lim.min_guidance} and {lim.max_guidance}, "
                                        f"got {guidance}")  # fmt: skip
    seed = d.seed if req.seed is None else req.seed
    if not 0 <= seed <= MAX_SEED:
        raise ApiError(422, "seed", f"seed must be between 0 and 2**63 - 1, got {seed}")
    if req.lora is not None and req.lora not in known_loras:
        listed = ", ".join(sorted(known_loras)) or "none registered"
        raise ApiError(404, "lora", f"unknown LoRA id {_short(req.lora)}; available: {listed} (GET /v1/models)")
    if req.routing_map and len(req.subjects) < 2:
        raise ApiError(422, "routing_map", "a routing map needs two or more subjects (routing is between subjects)")

    subjects = []
    for i, s in enumerate(req.subjects):
        subject = Subject(image=None, phrase=s.phrase, occurrence=s.occurrence,
                          span=tuple(s.span) if s.span is not None else None,
                          condition_prompt=s.condition_prompt)  # fmt: skip
        try:
            phrase_char_span(req.prompt, subject)
        except ValueError as err:
            where = "span" if s.span is not None else "occurrence" if "occurrence" in str(err) else "phrase"
            raise ApiError(422, f"subjects[{i}].{where}", str(err)) from None
        subjects.append(subject)
    for i, (s, subject) in enumerate(zip(req.subjects, subjects)):
        name = f"subjects[{i}].image"
        raw = s.image if isinstance(s.image, bytes) else decode_base64(s.image, name, lim)
        subject.image = decode_image(raw, name, lim)

    response_format = req.format
    if response_format is None:
        wants_json = req.routing_map or ("application/json" in (accept or "") and "image/png" not in (accept or ""))
        response_format = "json" if wants_json else "png"
    return GenerateRequest(prompt=req.prompt, subjects=subjects, seed=seed, steps=steps, guidance=guidance,
                           width=size["width"], height=size["height"], lora=req.lora, routing_map=req.routing_map,
                           response_format=response_format)  # fmt: skip


# ---- images ------------------------------------------------------------------------------------
def decode_base64(text: str, field: str, limits: LimitsConfig) -> bytes:
    text = _DATA_URL.sub("", text.strip(), count=1)
    if len(text) > (limits.max_upload_bytes + 2) // 3 * 4 + 4096:  # refused before decoding
        raise ApiError(413, field, f"image is over the upload limit of {limits.max_upload_bytes} bytes")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, field, "image is not valid base64 (nor a base64 data URL)") from None


def decode_image(data: bytes, field: str, limits: LimitsConfig) -> Image.Image:
    """Bytes -> RGB image; too large, not an image, or truncated are ApiErrors naming ``field``."""
    if not data:
        raise ApiError(422, field, "image is empty")
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, field, f"image is {len(data)} bytes; the limit is {limits.max_upload_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError:
        raise ApiError(413, field, f"image has more pixels than the limit of {limits.max_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ApiError(422, field, "not a PNG, JPEG or WebP image") from None
    with image:
        width, height = image.size
        if width < 1 or height < 1 or width * height > limits.max_pixels:
            raise ApiError(413, field, f"image is {width}x{height} = {width * height} pixels; the limit is "
                                       f"{limits.max_pixels} (checked before decoding)")  # fmt: skip
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
                return image.convert("RGB")
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ApiError(413, field, f"image has more pixels than the limit of {limits.max_pixels}") from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, MemoryError) as err:
            raise ApiError(422, field, f"image is truncated or corrupt ({err})") from None
