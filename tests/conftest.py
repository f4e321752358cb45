"""Shared fixtures: hand-built models with known answers, the builtin model, the real-data set."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models import Preprocess, wrap_module

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-val-300"


class RegionGate(nn.Module):
    """Zeroes every feature outside a fixed rectangle: nothing outside it can reach the logits."""

    def __init__(self, size: int, region: tuple[int, int, int, int]):
        super().__init__()
        y0, x0, y1, x1 = region
        mask = torch.zeros(1, 1, size, size)
        mask[..., y0:y1, x0:x1] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask


class RegionModel(nn.Module):
    """conv3x3 -> ReLU -> gate(region) -> GAP -> FC. Weights are set by formula, not trained, so
    each class score depends only on the pixels in (or within 1 px of) `region` (y0, x0, y1, x1).
    """

    def __init__(self, size: int = 32, region=(8, 8, 16, 16), classes: int = 4, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.gate = RegionGate(size, region)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, classes)
        with torch.no_grad():
            k = torch.arange(channels, dtype=torch.float32)[:, None, None, None]
            c = torch.arange(3, dtype=torch.float32)[None, :, None, None]
            yy, xx = torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij")
            self.conv.weight.copy_(torch.cos(k + 2 * c + yy + 0.5 * xx) / 3)
            self.conv.bias.fill_(0.1)
            cls = torch.arange(classes, dtype=torch.float32)[:, None]
            self.fc.weight.copy_(1.0 + 0.5 * torch.sin(cls + torch.arange(channels)[None]))
            self.fc.bias.copy_(0.1 * cls[:, 0])

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.gate(self.relu(self.conv(x))))))


def region_model(size: int = 32, region=(8, 8, 16, 16), classes: int = 4):
    module = RegionModel(size, region, classes)
    pre = Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), policy="squash")
    return wrap_module(module, pre, id="test:region", device="cpu", cam_layer="gate")


class TinyNet(nn.Module):
    """A small ReLU CNN (seeded init) with a GAP->FC head; conv features at 1/4 resolution."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny_model(size: int = 32, classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    pre = Preprocess(size=size, policy="squash")
    return wrap_module(TinyNet(classes), pre, id="test:tiny", device="cpu")


@pytest.fixture
def region():
    return region_model()


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def builtin():
    from pipeline.models import load_model

    return load_model("builtin:efficientnet-lite0", device="cpu")


@pytest.fixture(scope="session")
def demo_images():
    from skimage import data

    return [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.fixture(scope="session")
def imagenet300():
    """(list of annotation dicts with absolute paths) — skipped when ../shared/data is absent."""
    ann = SHARED_DATA / "annotations.json"
    if not ann.exists():
        pytest.skip(f"real-data test: {SHARED_DATA} is absent (only present beside the project)")
    items = json.loads(ann.read_text())
    for it in items:
        it["path"] = str(SHARED_DATA / it["file"])
    return items


def imagenet_batch(items: list[dict], preprocess) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
    """Real images as the model sees them, their official boxes moved into model space, and
    their labels: (x [B,3,H,W], annotations, targets)."""
    from PIL import Image

    from pipeline.sources.annotations import read_imagenet, to_model_space

    src = read_imagenet(items)
    images = [Image.open(it["path"]) for it in items]
    anns = [
        to_model_space(src[it["file"]], preprocess.geometry(*im.size))
        for it, im in zip(items, images, strict=True)
    ]
    return preprocess(images), anns, torch.tensor([it["label_index"] for it in items])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt(float((a * a).sum() * (b * b).sum()) + 1e-30))


# -- real services: a local S3 endpoint over HTTP, local Ray ---------------------------------
class S3Server:
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint; boto3/s3fs talk to it as to AWS).
    `stop()`/`start()` take the endpoint away and bring it back on the same port; moto keeps the
    buckets in memory across that, like a real store that was briefly unreachable."""

    def __init__(self):
        self.port = 0
        self.server = None
        self.start()

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]

    def stop(self):
        self.server.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def s3_server():
    """Set in the environment before Ray starts so that Ray's workers inherit it."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = S3Server()
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-value-0123",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": server.endpoint,
        }
    )
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    return s3_server.endpoint


_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture(scope="session")
def s3(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One small local Ray for the session (after the S3 env is set, so workers inherit it)."""
    import ray
    from ray.data import DataContext

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    DataContext.get_current().execution_options.verbose_progress = False
    DataContext.get_current().execution_no_progress_timeout_s = 300  # hang -> fail, not 30 min
    yield ray
    ray.shutdown()


def image_bytes(array, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    import io

    from PIL import Image

    im = Image.fromarray(array)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()
