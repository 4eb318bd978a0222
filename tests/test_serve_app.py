"""The Ray Serve application on the session's local Ray with the tiny model, over HTTP on 127.0.0.1.

One application for the module (auth on, two registered LoRAs, small limits): a generation round trip,
batching (concurrent requests in one pipeline call, each image equal to its request run alone),
multiplexed LoRAs (each id its own weights, equal to a direct pipeline with that LoRA), the bad-input
battery (each refusal followed by a request that succeeds), health, models and metrics.
"""

import base64
import io
import os
import re
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from musar_core import MusarConfig, MUSARPipeline, MusarTransformer, Subject
from serve.config import (
    AutoscalingConfig,
    BatchingConfig,
    DefaultsConfig,
    IngressDeploymentConfig,
    LimitsConfig,
    ModelDeploymentConfig,
    ServeAppConfig,
)  # fmt: skip

CONFIG = MusarConfig(condition_size=32)
APP = "musar-test"
TOKEN_ENV, TOKEN = "MUSAR_TEST_SERVE_TOKEN", "s3cret-test-token"
PROMPT = "a dog and a cat on the beach"
LIMITS = LimitsConfig(max_subjects=3, max_upload_bytes=64 * 1024, max_pixels=512 * 512, max_steps=20, max_size=128)


def png(colour="red", size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def body(**overrides) -> dict:
    data = {"prompt": PROMPT, "subjects": [{"image": b64(png("red")), "phrase": "dog"},
                                           {"image": b64(png("blue")), "phrase": "cat"}], "seed": 0}  # fmt: skip
    data.update(overrides)
    return data


def pixels(image) -> np.ndarray:
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def close(a, b, tol=2) -> bool:
    """Equal up to the float rounding of different thread counts / batch shapes (as in test_pipeline)."""
    return np.abs(pixels(a) - pixels(b)).max() <= tol


@pytest.fixture(scope="module")
def lora_dirs(tiny_flux_path, tmp_path_factory):
    from helpers import randomize_lora

    root = tmp_path_factory.mktemp("serve-loras")
    out = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        model = MusarTransformer.from_pretrained(tiny_flux_path, config=CONFIG).add_lora()
        randomize_lora(model, seed=seed, scale=0.3)
        out[name] = model.save_lora(root / name)
    return out


@pytest.fixture(scope="module")
def app(ray_local, tiny_flux_path, lora_dirs):
    from ray import serve

    from serve.local import free_port, start_local

    os.environ[TOKEN_ENV] = TOKEN  # read by build_app on this driver
    cfg = ServeAppConfig(
        model=str(tiny_flux_path), musar=CONFIG, loras={k: str(v) for k, v in lora_dirs.items()},
        app_name=APP, auth_token_env=TOKEN_ENV, limits=LIMITS,
        defaults=DefaultsConfig(steps=2, height=64, width=64),
        batching=BatchingConfig(max_batch_size=4, batch_wait_timeout_s=0.25),
        model_deployment=ModelDeploymentConfig(autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1)),
        ingress=IngressDeploymentConfig(num_cpus=0),
    )  # fmt: skip
    url = start_local(cfg, port=free_port())
    assert url.startswith("http://127.0.0.1:")
    yield url, cfg
    serve.delete(APP)


@pytest.fixture(scope="module")
def http(app):
    session = requests.Session()
    session.trust_env = False  # no proxy: loopback only
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    url = app[0]

    def call(method, path, **kwargs):
        return session.request(method, url + path, timeout=60, **kwargs)

    return call


@pytest.fixture(scope="module")
def direct(tiny_flux_path):
    return MUSARPipeline.from_pretrained(tiny_flux_path, config=CONFIG)


def plain_get(url):
    """A request without the token (and without proxies: loopback only)."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, timeout=30)


def model_stats():
    from ray import serve

    return serve.get_deployment_handle("MusarModel", APP).stats.remote().result()


def direct_image(pipe, seed, prompt=PROMPT, colours=("red", "blue"), phrases=("dog", "cat"), steps=2, size=64):
    subjects = [Subject(Image.open(io.BytesIO(png(c))), p) for c, p in zip(colours, phrases)]
    return pipe(prompt, subjects, height=size, width=size, num_inference_steps=steps, seed=seed, progress=False).images[0]


def concurrently(*calls):
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(i, fn):
        barrier.wait()
        results[i] = fn()

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_round_trip_png_and_json(http, direct):
    r = http("POST", "/v1/generate", json=body(seed=5))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "5"
    image = Image.open(io.BytesIO(r.content))
    assert image.size == (64, 64)
    assert close(image, direct_image(direct, 5))

    r = http("POST", "/v1/generate", json=body(seed=5, routing_map=True))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = r.json()
    assert out["seed"] == 5 and (out["width"], out["height"], out["steps"]) == (64, 64, 2)
    assert set(out["timings"]) >= {"total_s", "queue_s", "generate_s"} and out["timings"]["generate_s"] > 0
    assert close(base64.b64decode(out["image"]), image, tol=0)  # same request, same replica: same pixels
    routing = Image.open(io.BytesIO(base64.b64decode(out["routing_map"])))
    assert routing.width == 256 * 3 and routing.height > 256  # image + one heatmap per subject, per step

    multipart = {"prompt": (None, PROMPT), "seed": (None, "5"), "format": (None, "json"),
                 "subjects[0].image": ("dog.png", png("red"), "image/png"), "subjects[0].phrase": (None, "dog"),
                 "subjects[1].image": ("cat.png", png("blue"), "image/png"), "subjects[1].phrase": (None, "cat")}  # fmt: skip
    r = http("POST", "/v1/generate", files=multipart)
    assert r.status_code == 200, r.text
    assert close(base64.b64decode(r.json()["image"]), image, tol=0)


def test_concurrent_requests_share_one_pipeline_call(http, direct):
    before = model_stats()["pipeline_calls"]
    a, b = concurrently(lambda: http("POST", "/v1/generate", json=body(seed=11)),
                        lambda: http("POST", "/v1/generate", json=body(seed=12, prompt="a cat and a dog in the snow")))
    assert a.status_code == b.status_code == 200
    assert a.headers["x-batch-size"] == b.headers["x-batch-size"] == "2"
    assert a.headers["x-model-call"] == b.headers["x-model-call"]
    assert model_stats()["pipeline_calls"] == before + 1
    # Each image of the batch is its request run alone (own prompt, subjects and seed).
    assert close(a.content, direct_image(direct, 11))
    assert close(b.content, direct_image(direct, 12, prompt="a cat and a dog in the snow"))
    assert not close(a.content, b.content, tol=10)

    # Incompatible requests (different steps) arrive together but run as separate pipeline calls.
    c, d = concurrently(lambda: http("POST", "/v1/generate", json=body(seed=1, steps=2)),
                        lambda: http("POST", "/v1/generate", json=body(seed=1, steps=3)))
    assert c.status_code == d.status_code == 200
    assert c.headers["x-batch-size"] == d.headers["x-batch-size"] == "1"
    assert c.headers["x-model-call"] != d.headers["x-model-call"]
    assert close(d.content, direct_image(direct, 1, steps=3))


def test_multiplexed_loras_route_to_their_weights(http, direct, tiny_flux_path, lora_dirs):
    outs = {}
    for lora in ("alpha", "beta", None, "alpha"):
        r = http("POST", "/v1/generate", json=body(seed=3, **({"lora": lora} if lora else {})))
        assert r.status_code == 200, r.text
        outs.setdefault(lora, []).append(r.content)
    assert close(outs["alpha"][0], outs["alpha"][1], tol=0)  # back to alpha after beta and the base
    for x, y in (("alpha", "beta"), ("alpha", None), ("beta", None)):
        assert not close(outs[x][0], outs[y][0], tol=10), (x, y)
    assert close(outs[None][0], direct_image(direct, 3))
    for name, folder in lora_dirs.items():
        with_lora = MUSARPipeline.from_pretrained(tiny_flux_path, config=CONFIG, lora=folder)
        assert close(outs[name][0], direct_image(with_lora, 3)), name

    # Two LoRAs requested at once: Serve splits the batch by model id, each gets its own weights.
    a, b = concurrently(lambda: http("POST", "/v1/generate", json=body(seed=3, lora="alpha")),
                        lambda: http("POST", "/v1/generate", json=body(seed=3, lora="beta")))
    assert close(a.content, outs["alpha"][0]) and close(b.content, outs["beta"][0])


def test_models_health_and_page(http, app, lora_dirs):
    r = http("GET", "/v1/models")
    assert r.status_code == 200
    info = r.json()
    assert [m["id"] for m in info["models"]] == ["alpha", "beta"] and info["auth"] is True
    assert info["limits"]["max_subjects"] == 3
    assert str(lora_dirs["alpha"]) not in r.text  # ids, never server paths
    assert plain_get(app[0] + "/healthz").json()["status"] == "ok"  # no token needed
    assert plain_get(app[0] + "/v1/models").status_code == 401
    page = plain_get(app[0] + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and 'id="generate"' in page.text


def _noise_png(size) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


LONG_PROMPT = " ".join(["the"] * 80) + " dog and a cat"  # the phrase "dog" lies beyond the tiny T5's 64 tokens
BAD_REQUESTS = {
    "non-image bytes": (dict(files={"prompt": (None, "a dog"), "subjects[0].image": ("x.png", b"hello, world"),
                                    "subjects[0].phrase": (None, "dog")}), 422, "subjects[0].image"),  # fmt: skip
    "truncated image": (dict(json=body(subjects=[{"image": b64(png(size=(64, 64))[:-30]), "phrase": "dog"}])),
                        422, "subjects[0].image"),  # fmt: skip
    "oversized upload": (dict(json=body(subjects=[{"image": b64(_noise_png((160, 160))), "phrase": "dog"}])),
                         413, "subjects[0].image"),  # fmt: skip
    "too many pixels": (dict(json=body(subjects=[{"image": b64(png(size=(1024, 1024))), "phrase": "dog"}])),
                        413, "subjects[0].image"),  # fmt: skip
    "too many subjects": (dict(json=body(prompt="a dog", subjects=[{"image": b64(png()), "phrase": "dog"}] * 4)),
                          422, "subjects"),  # fmt: skip
    "phrase not in prompt": (dict(json=body(subjects=[{"image": b64(png()), "phrase": "dog"},
                                                      {"image": b64(png()), "phrase": "horse"}])),
                             422, "subjects[1].phrase"),  # fmt: skip
    "phrase beyond token limit": (dict(json=body(prompt=LONG_PROMPT)), 422, "subjects[0].phrase"),
    "negative steps": (dict(json=body(steps=-3)), 422, "steps"),
    "huge steps": (dict(json=body(steps=10**9)), 422, "steps"),
    "steps wrong type": (dict(json=body(steps="many")), 422, "steps"),
    "prompt wrong type": (dict(json=body(prompt=["a", "dog"])), 422, "prompt"),
    "subjects wrong type": (dict(json=body(subjects={"image": "x"})), 422, "subjects"),
    "size not multiple of 16": (dict(json=body(width=72)), 422, "width"),
    "size too large": (dict(json=body(height=4096)), 422, "height"),
    "unknown field": (dict(json=body(negative_prompt="blurry")), 422, "negative_prompt"),
    "unknown lora": (dict(json=body(lora="gamma")), 404, "lora"),
    "lora as a path": (dict(json=body(lora="/etc/passwd")), 404, "lora"),
    "malformed json": (dict(data=b'{"prompt": "a dog",', headers={"Content-Type": "application/json"}), 400, "body"),
    "wrong content type": (dict(data=b"prompt=a dog", headers={"Content-Type": "text/plain"}), 415, "body"),
    "body too large": (dict(data=b"x" * (LIMITS.max_request_bytes() + 1), headers={"Content-Type": "application/json"}),
                       413, "body"),  # fmt: skip
    "routing map with one subject": (dict(json=body(prompt="a dog", routing_map=True,
                                                    subjects=[{"image": b64(png()), "phrase": "dog"}])),
                                     422, "routing_map"),  # fmt: skip
    "missing auth": (dict(json=body(), headers={"Authorization": None}), 401, "authorization"),
    "wrong token": (dict(json=body(), headers={"Authorization": "Bearer nope"}), 401, "authorization"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_refused_and_the_next_request_succeeds(http, case):
    kwargs, status, field = BAD_REQUESTS[case]
    r = http("POST", "/v1/generate", **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error["field"] == field and error["message"], (case, error)
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    ok = http("POST", "/v1/generate", json=body(seed=1))
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


def test_replica_healthy_after_bad_input_and_metrics_exported(http, ray_local):
    import ray

    assert http("GET", "/healthz").json()["status"] == "ok"
    stats = model_stats()
    assert stats["queue_length"] == 0 and stats["pipeline_calls"] > 0
    # Request counts and latency histograms reach Ray's Prometheus endpoint on this node (loopback).
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = [r'ray_musar_http_requests_total\{[^}]*route="/v1/generate"[^}]*status="422"',
              r'ray_musar_http_request_seconds_bucket\{', r"ray_musar_model_queue_length\{",
              r"ray_musar_model_batch_size_bucket\{"]  # fmt: skip
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = plain_get(f"http://127.0.0.1:{port}/metrics").text
        if all(re.search(w, text) for w in wanted):
            break
        time.sleep(1)
    missing = [w for w in wanted if not re.search(w, text)]
    assert not missing, missing
