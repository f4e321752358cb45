"""Vision transformers: gradient, CAM (token -> grid) and black-box methods; timm weights."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from conftest import pearson, random_images
from torch import nn

from pipeline.explainers import EXPLAINERS, build_explainer
from pipeline.explainers.layers import grid_to_tokens, resolve_layer, tokens_to_grid
from pipeline.models import Preprocess, load_model, wrap_module

PRE = Preprocess(size=32, policy="squash")


def _timm_vit(arch="vit_tiny_patch16_224"):
    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, num_classes=5)
    return wrap_module(m, PRE, id=f"test:{arch}", device="cpu")


def _tv_vit():
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=5,
    )
    nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision zero-inits the head
    return wrap_module(m, PRE, id="test:tv-vit", device="cpu")


def _timm_swin():
    torch.manual_seed(0)
    m = timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
        window_size=4, num_classes=5,
    )  # fmt: skip
    return wrap_module(m, PRE, id="test:swin", device="cpu")


MODELS = {
    # hierarchical: stages give [B,H,W,C] feature maps (timm's output_fmt NHWC)
    "timm-swin": (_timm_swin, "norm"),
    "timm-vit": (_timm_vit, "blocks.11.norm1"),
    "timm-deit-distilled": (
        lambda: _timm_vit("deit_tiny_distilled_patch16_224"),
        "blocks.11.norm1",
    ),
    "torchvision-vit": (_tv_vit, "encoder.layers.encoder_layer_1.ln_1"),
}


# cheap settings; every other explainer runs with its defaults
CHEAP = {
    "integrated_gradients": {"steps": 4},
    "smoothgrad": {"n": 4},
    "scorecam": {"top_k": 4},
    "occlusion": {"window": 8, "stride": 8},
    "rise": {"n_masks": 16},
    "glas": {"k": 4},
    "rglas": {"k": 4, "max_iter": 2},
    "lime": {"n_samples": 16, "n_segments": 8},
    "attribution_visualization": {"steps": 2, "attr_steps": 2},
    "extremal_perturbation": {"iterations": 3},
}
RELU_ONLY = {"guided_backprop", "deconvnet", "guided_gradcam"}  # defined at ReLUs (GELU here)


@pytest.mark.parametrize("which", list(MODELS))
def test_every_method_runs_on_vits(which):
    build, layer = MODELS[which]
    model = build()
    assert resolve_layer(model)[0] == layer
    x = random_images(2, 32)
    t = torch.tensor([0, 3])
    for name in EXPLAINERS:
        explainer = build_explainer(name, model, **CHEAP.get(name, {}))
        if name in RELU_ONLY:  # a clear refusal that names what is missing, not a wrong map
            with pytest.raises(ValueError, match="ReLU"):
                explainer(x, t)
            continue
        maps = explainer(x, t)
        assert maps.shape == (2, 32, 32), name
        assert torch.isfinite(maps).all(), name
        assert maps.abs().sum() > 0, name


def test_token_grid_reshape_round_trip():
    b, c, side = 2, 3, 4
    grid = torch.arange(b * c * side * side, dtype=torch.float32).view(b, c, side, side)
    prefix = torch.full((b, 2, c), -1.0)
    tokens = grid_to_tokens(grid, prefix)
    assert tokens.shape == (b, 18, c)
    # token 2 + (row * side + col) holds patch (row, col): row-major after the prefix
    assert torch.equal(tokens[:, 2 + 1 * side + 3], grid[:, :, 1, 3])
    back, p = tokens_to_grid(tokens)
    assert p == 2 and torch.equal(back, grid)


class OnePatchViT(nn.Module):
    """Patch embedding, class + distillation tokens, one 'block' whose norm1 keeps only patch
    (1, 3) of a 4 x 4 grid: the class score depends on that patch alone."""

    def __init__(self, patch=(1, 3)):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.prefix = nn.Parameter(torch.randn(1, 2, 8))
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].norm1 = _KeepOnePatch(2 + patch[0] * 4 + patch[1])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix.expand(x.shape[0], -1, -1), t], 1)
        t = self.blocks[0].norm1(t)
        return self.head(torch.relu(t).sum(1))


class _KeepOnePatch(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.index = index

    def forward(self, t):
        keep = torch.zeros(1, t.shape[1], 1)
        keep[:, self.index] = 1.0
        return t * keep


def test_token_cam_peaks_in_the_patch_the_score_depends_on():
    torch.manual_seed(0)
    model = wrap_module(OnePatchViT(), PRE, id="test:one-patch", device="cpu")
    assert resolve_layer(model)[0] == "blocks.0.norm1"
    x = random_images(4, 32, seed=3)
    t = model.logits(x).argmax(1)
    for name in ("gradcam", "gradcam_pp"):
        maps = build_explainer(name, model)(x, t)
        for m in maps:
            if m.max() <= 0:
                continue
            y, xx = divmod(int(m.argmax()), 32)
            assert (y // 8, xx // 8) == (1, 3), (name, y, xx)


def test_timm_vit_weights_round_trip(tmp_path):
    torch.manual_seed(1)  # not the loader's seed-0 init: the file must really be loaded
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    path = tmp_path / "vit.pt"
    torch.save(src.state_dict(), path)
    model = load_model("timm:vit_tiny_patch16_224", weights=str(path), device="cpu")
    x = random_images(1, 224)
    with torch.inference_mode():
        want = src(x)
    assert torch.allclose(model.logits(x), want, rtol=1e-4, atol=1e-5)
    fresh = load_model("timm:vit_tiny_patch16_224", device="cpu", random_init=True)
    assert not torch.allclose(fresh.logits(x), want, atol=1e-3)


def test_gradcam_on_swin_agrees_with_pytorch_grad_cam():
    """[B,H,W,C] stage outputs: ours reads them as [B,C,H,W] by itself; pytorch-grad-cam needs
    a reshape_transform for the same (its Swin recipe). Same layer, same targets, same maps."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _timm_swin()
    x, t = random_images(2, 32, seed=3), torch.tensor([1, 4])
    ours = build_explainer("gradcam", model)(x, t)
    # the peer backpropagates from the loss, so it needs weights that require grad
    peer_net = copy.deepcopy(model.module).requires_grad_(True)
    with GradCAM(
        model=peer_net,
        target_layers=[peer_net.norm],
        reshape_transform=lambda a: a.permute(0, 3, 1, 2),
    ) as peer:
        theirs = peer(x, targets=[ClassifierOutputTarget(int(c)) for c in t])
    for a, b in zip(ours, theirs, strict=True):
        assert pearson(a, torch.from_numpy(b)) >= 0.99
