"""CFG sampling of (kindified) diffusers DiTs with any number of classes: KindDiTPipeline.
Tiny random components (transformer, DDIMScheduler, AutoencoderKL); nothing is downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import kind_fast as kf  # noqa: E402
from kind_fast.integrations.diffusers import KindDiTPipeline, null_class_id, sample_dit  # noqa: E402


def transformer(classes, in_channels=4, seed=0):
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
                                        out_channels=2 * in_channels, num_layers=2, sample_size=8, patch_size=2,
                                        num_embeds_ada_norm=classes).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def vae():
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                   norm_num_groups=8, sample_size=16).eval()


def gen():
    return torch.Generator().manual_seed(0)


def test_agrees_with_dit_pipeline_on_1000_classes():
    """DiTPipeline is right for ImageNet's 1000 classes: there the two must agree."""
    tr, ae = transformer(1000), vae()
    kw = dict(class_labels=[1, 7], guidance_scale=3.0, num_inference_steps=4, output_type="np")
    ref = diffusers.DiTPipeline(transformer=tr, vae=ae, scheduler=diffusers.DDIMScheduler())(
        generator=gen(), **kw).images
    out = KindDiTPipeline(transformer=tr, vae=ae, scheduler=diffusers.DDIMScheduler())(generator=gen(), **kw).images
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_kindified_three_classes():
    tr, ae = transformer(3), vae()
    kf.kindify(tr, gate=kf.ClassGate.block(3, 8, 4), split_qkv=False)
    assert null_class_id(tr) == 3
    with pytest.raises(IndexError):  # DiTPipeline's hard-coded null class 1000
        diffusers.DiTPipeline(transformer=tr, vae=ae, scheduler=diffusers.DDIMScheduler())(
            class_labels=[0], num_inference_steps=1, output_type="np")
    pipe = KindDiTPipeline(transformer=tr, vae=ae, scheduler=diffusers.DDIMScheduler())
    seen = []  # the labels the KIND layers see during each forward (the gate clears them after it)
    layer = next(m for m in tr.modules() if isinstance(m, kf.FastKindLinear))
    layer.register_forward_pre_hook(lambda mod, args: seen.append(tr.kind_gate.labels.tolist()))
    images = pipe(class_labels=[0, 2], guidance_scale=4.0, generator=gen(), num_inference_steps=3).images
    assert len(images) == 2 and images[0].size == (16, 16)  # PIL
    # the labels reached the KIND gate: conditional half, then the model's null class
    assert seen[-1] == [0, 2, 3, 3]
    assert tr.kind_gate.labels is None, "no labels left on the gate after a forward"
    a = pipe(class_labels=[0, 2], guidance_scale=4.0, generator=gen(), num_inference_steps=3, output_type="pt")
    b = pipe(class_labels=[0, 2], guidance_scale=4.0, generator=gen(), num_inference_steps=3, output_type="pt")
    c = pipe(class_labels=[0, 2], guidance_scale=1.0, generator=gen(), num_inference_steps=3, output_type="pt")
    assert torch.equal(a.images, b.images) and not torch.allclose(a.images, c.images)
    assert a.images.shape == (2, 3, 16, 16) and 0 <= a.images.min() and a.images.max() <= 1
    assert seen[-1] == [0, 2], "no guidance: no null half"
    with pytest.raises(ValueError, match=r"in \[0, 2\]"):
        pipe(class_labels=[3], num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[0], num_inference_steps=1, output_type="jpeg")


def test_pixel_space_and_learned_variance():
    tr = transformer(5, in_channels=3)
    x = sample_dit(tr, diffusers.DDPMScheduler(variance_type="learned_range"), [4, 0], guidance_scale=2.0,
                   num_inference_steps=3, generator=gen())
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    pipe = KindDiTPipeline(transformer=tr, vae=None, scheduler=diffusers.DDIMScheduler())
    out = pipe(class_labels=[1], num_inference_steps=2, generator=gen(), output_type="np").images
    assert out.shape == (1, 8, 8, 3) and out.min() >= 0 and out.max() <= 1


def test_training_mode_models_sample_in_eval_and_keep_their_mode():
    """A DiTTransformer2DModel built directly is in training mode, where diffusers drops labels
    at random (class dropout). Sampling must not: it runs eval and hands the modes back."""
    tr, ae = transformer(3), vae()
    kf.kindify(tr, gate=kf.ClassGate.block(3, 8, 4), split_qkv=False)
    kw = dict(class_labels=[0, 1, 2, 0, 1, 2], guidance_scale=3.0, num_inference_steps=3, output_type="pt")
    pipe = KindDiTPipeline(transformer=tr, vae=ae, scheduler=diffusers.DDIMScheduler())
    ref = pipe(generator=gen(), **kw).images
    tr.train(), ae.train()
    for seed in range(3):  # the label dropout draws from the global RNG
        torch.manual_seed(seed)
        torch.testing.assert_close(pipe(generator=gen(), **kw).images, ref, rtol=0, atol=0)
    assert tr.training and ae.training
    tr.eval()
    sample_dit(tr, diffusers.DDIMScheduler(), [0], num_inference_steps=1)
    assert not tr.training
