"""Serving without Ray: request parsing and limits, image checks, the config and the Serve config file."""

import base64
import io
import os
import struct
import zlib
from pathlib import Path

import pytest
import yaml
from PIL import Image

from serve.api import ApiError, decode_image, parse_body, validate
from serve.config import BatchingConfig, LimitsConfig, ModelDeploymentConfig, ServeAppConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = ServeAppConfig(limits=LimitsConfig(max_subjects=3, max_upload_bytes=64 * 1024, max_pixels=512 * 512))


def png_bytes(size=(40, 30), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def multipart(fields: dict, boundary: str = "b0undary") -> tuple[str, bytes]:
    out = b""
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if isinstance(value, bytes):
            out += f'{head}; filename="f.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode() + value + b"\r\n"
        else:
            out += f"{head}\r\n\r\n{value}\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", out + f"--{boundary}--\r\n".encode()


def refused(data: dict, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        validate(data, kwargs.pop("cfg", CFG), known_loras=kwargs.pop("known", {"alpha"}), **kwargs)
    return info.value


def test_json_request_with_defaults():
    req = validate({"prompt": "a dog and a cat", "subjects": [{"image": b64(png_bytes()), "phrase": "dog"},
                                                              {"image": "data:image/png;base64," + b64(png_bytes()),
                                                               "phrase": "cat", "span": [11, 14]}]},
                   CFG, known_loras=set())  # fmt: skip
    d = CFG.defaults
    assert (req.steps, req.width, req.height, req.guidance, req.seed) == (d.steps, d.width, d.height, d.guidance, d.seed)
    assert [s.image.size for s in req.subjects] == [(40, 30), (40, 30)] and req.subjects[1].span == (11, 14)
    assert req.response_format == "png"
    assert validate({"prompt": "x"}, CFG, known_loras=set(), accept="application/json").response_format == "json"


def test_multipart_keeps_binary_uploads_exactly():
    noise = os.urandom(20000) + b"\r\n--b0undar\r\n\r\n--\r\n"  # line breaks and near-boundaries inside
    ctype, body = multipart({"prompt": "a dog and a cat", "steps": "3", "seed": "7", "routing_map": "true",
                             "subjects[0].image": png_bytes(), "subjects[0].phrase": "dog",
                             "subjects[1].image": noise, "subjects[1].phrase": "cat", "subjects[1].occurrence": "0"})  # fmt: skip
    data = parse_body(ctype, body)
    assert data["steps"] == 3 and data["seed"] == 7 and data["routing_map"] is True
    assert data["subjects"][0]["image"] == png_bytes() and data["subjects"][1]["image"] == noise
    assert data["subjects"][1]["occurrence"] == 0
    err = refused(data)  # the second upload is not an image
    assert (err.status, err.field) == (422, "subjects[1].image")


@pytest.mark.parametrize(
    "data, status, field",
    [
        ({"prompt": 42}, 422, "prompt"),
        ({"prompt": "a dog", "steps": "four"}, 422, "steps"),
        ({"prompt": "a dog", "steps": 2.5}, 422, "steps"),
        ({"prompt": "a dog", "seed": True}, 422, "seed"),
        ({"prompt": "a dog", "seed": -1}, 422, "seed"),
        ({"prompt": "a dog", "subjects": "dog.png"}, 422, "subjects"),
        ({"prompt": "a dog", "subjects": [{"image": 5, "phrase": "dog"}]}, 422, "subjects[0].image"),
        ({"prompt": "a dog", "subjects": [{"image": "abc", "phrase": "dog", "path": "/etc/passwd"}]}, 422, "subjects[0].path"),
        ({"prompt": "a dog", "nsfw": False}, 422, "nsfw"),
        ({}, 422, "prompt"),
        ({"prompt": "   "}, 422, "prompt"),
        ({"prompt": "a dog", "steps": 0}, 422, "steps"),
        ({"prompt": "a dog", "steps": 10**12}, 422, "steps"),
        ({"prompt": "a dog", "width": 100}, 422, "width"),
        ({"prompt": "a dog", "height": 4096}, 422, "height"),
        ({"prompt": "a dog", "guidance": float("inf")}, 422, "guidance"),
        ({"prompt": "a dog", "lora": "beta"}, 404, "lora"),
        ({"prompt": "a dog", "lora": "../../etc"}, 404, "lora"),
        ({"prompt": "a dog", "routing_map": True}, 422, "routing_map"),
        ({"prompt": "a dog", "subjects": [{"image": "", "phrase": "cat"}]}, 422, "subjects[0].phrase"),
        ({"prompt": "a dog and a dog", "subjects": [{"image": "", "phrase": "dog"}]}, 422, "subjects[0].occurrence"),
        ({"prompt": "a dog", "subjects": [{"image": "", "phrase": "dog", "span": [3, 99]}]}, 422, "subjects[0].span"),
        ({"prompt": "a dog", "subjects": [{"image": "%%%", "phrase": "dog"}]}, 422, "subjects[0].image"),
        ({"prompt": "a dog", "subjects": [{"image": "", "phrase": "dog"}] * 4}, 422, "subjects"),
        ({"prompt": "x" * 1001}, 422, "prompt"),
    ],
)
def test_invalid_fields_are_named(data, status, field):
    err = refused(data)
    assert (err.status, err.field) == (status, field), err.message
    assert err.body()["error"]["field"] == field and err.message


@pytest.mark.parametrize(
    "ctype, body, status",
    [
        ("application/json", b"{not json", 400),
        ("application/json", b"[1, 2]", 400),
        ("text/plain", b"prompt=a dog", 415),
        (None, b"", 415),
        ("multipart/form-data", b"--x\r\n", 400),
        ("multipart/form-data; boundary=zz", b"garbage without parts", 400),
    ],
)
def test_malformed_bodies(ctype, body, status):
    with pytest.raises(ApiError) as info:
        parse_body(ctype, body)
    assert (info.value.status, info.value.field) == (status, "body")


def test_form_fields_are_typed_and_named():
    for fields, field in [({"steps": "many"}, "steps"), ({"subjects[0].span": "1-4"}, "subjects[0].span"),
                          ({"routing_map": "maybe"}, "routing_map"), ({"subjects[0].colour": "red"}, "subjects[0].colour")]:  # fmt: skip
        with pytest.raises(ApiError) as info:
            parse_body(*multipart({"prompt": "a dog", **fields}))
        assert (info.value.status, info.value.field) == (422, field)
    with pytest.raises(ApiError) as info:  # subjects 0 and 2 but no 1
        parse_body(*multipart({"prompt": "a dog", "subjects[0].phrase": "dog", "subjects[2].phrase": "dog"}))
    assert info.value.field == "subjects"


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is a few bytes (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_images_checked_before_decoding():
    lim = CFG.limits
    assert decode_image(png_bytes(), "img", lim).size == (40, 30)
    for data, status, words in [
        (png_with_declared_size(20000, 20000), 413, "pixels"),  # declared size alone refuses it
        (png_with_declared_size(100_000, 100_000), 413, "pixels"),  # beyond PIL's own bomb limit as well
        (png_bytes((600, 600)), 413, "pixels"),
        (os.urandom(70 * 1024), 413, "bytes"),
        (b"GIF89a" + os.urandom(100), 422, "not a PNG"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", 422, "not a PNG"),  # never handed to Ghostscript
        (png_bytes((64, 64))[:-40], 422, "truncated"),
        (b"", 422, "empty"),
    ]:
        with pytest.raises(ApiError) as info:
            decode_image(data, "img", lim)
        assert (info.value.status, info.value.field) == (status, "img") and words in info.value.message


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="a name, not a path"):
        ServeAppConfig(loras={"../x": "/tmp/x"})
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeAppConfig(batching=BatchingConfig(max_batch_size=8), model_deployment=ModelDeploymentConfig(max_ongoing_requests=4))
    with pytest.raises(ValueError, match="min_steps"):
        LimitsConfig(min_steps=5, max_steps=2)


def test_serve_config_file_is_valid_for_ray_serve():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, build_app, load_app_config

    raw = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app" and app.route_prefix == "/"
    assert {d.name for d in app.deployments} == {MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT}
    model = next(d for d in app.deployments if d.name == MODEL_DEPLOYMENT)
    assert model.autoscaling_config["max_replicas"] >= model.autoscaling_config["min_replicas"]
    assert model.max_queued_requests > 0
    cfg = load_app_config(app.args)  # the args are a valid ServeAppConfig
    assert cfg.model == "tiny" and cfg.batching.max_batch_size == 4
    assert model.max_ongoing_requests >= cfg.batching.max_batch_size
    built = build_app(app.args)  # builds without Ray
    assert built is not None


def test_app_args_from_serve_run_and_cli():
    from musar.cli import job_main
    from musar.config import ConfigError
    from musar.serving import run_serve
    from serve.app import load_app_config

    cfg = load_app_config({"model": "tiny", "limits.max_steps": "12", "loras.alpha": "/models/alpha"})
    assert cfg.limits.max_steps == 12 and cfg.loras == {"alpha": "/models/alpha"}
    with pytest.raises(ConfigError, match="limits.max_stepz"):
        load_app_config({"limits.max_stepz": "3"})
    with pytest.raises(ConfigError, match="port"):
        load_app_config({"port": "eighty"})
    assert job_main(ServeAppConfig, run_serve, ["--print-config", "--port", "9001", "loras.alpha=/m/a"]) == 0


def test_print_config_output(capsys):
    from musar.cli import job_main
    from musar.serving import run_serve

    job_main(ServeAppConfig, run_serve, ["--print-config", "--auth-token-env", "TOKEN", "limits.max_size=1024"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["auth_token_env"] == "TOKEN" and printed["limits"]["max_size"] == 1024


def test_auth_token_env_must_be_set(monkeypatch):
    from serve.app import build_app

    monkeypatch.delenv("MUSAR_TEST_UNSET_TOKEN", raising=False)
    with pytest.raises(ValueError, match="MUSAR_TEST_UNSET_TOKEN"):
        build_app(ServeAppConfig(auth_token_env="MUSAR_TEST_UNSET_TOKEN"))
