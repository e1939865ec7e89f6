"""Class-conditional CFG sampling of a diffusers ``DiTTransformer2DModel`` with any number of
classes, kindified or not (docs/design.md §3.5).

diffusers' ``DiTPipeline`` hard-codes the null (unconditional) class as 1000, ImageNet's; a DiT
with another class count fails there (an index error in the label table) or, with more than
1000 classes, silently guides towards class 1000. Here the null class is read from the model:
the label table's last row, id ``config.num_embeds_ada_norm``.

    from diffusers import AutoencoderKL, DDIMScheduler
    from kind_fast.integrations.diffusers import KindDiTPipeline

    pipe = KindDiTPipeline(transformer=kindified_dit, vae=AutoencoderKL.from_pretrained(...),
                           scheduler=DDIMScheduler())
    images = pipe(class_labels=[0, 1, 2], guidance_scale=4.0, num_inference_steps=50,
                  generator=torch.Generator().manual_seed(0)).images      # PIL images

``vae=None`` samples in pixel space (a DiT trained on images, not latents).

The loop: the latents are drawn once. Each step runs the conditional and the null half in one
batch, so a kindified model's hook routes both halves to their gate rows (the null row has
the learngenes only by default). Guidance acts on the ε channels. A learned variance is
passed to the scheduler when its ``variance_type`` is ``learned``/``learned_range``, else
dropped, as DiTPipeline does.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from diffusers import DiTPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

__all__ = ["KindDiTPipeline", "sample_dit", "null_class_id"]


def null_class_id(transformer: nn.Module) -> int:
    """The null (CFG) class id of a ``DiTTransformer2DModel``: its number of classes."""
    n = transformer.config.num_embeds_ada_norm
    table = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    if table.num_embeddings != n + 1:
        raise ValueError(f"the label table has {table.num_embeddings} rows for {n} classes: the model has no "
                         "null class (class_dropout_prob=0), so classifier-free guidance is impossible")
    return n


@torch.no_grad()
def sample_dit(
    transformer: nn.Module,
    scheduler,
    class_labels: Sequence[int] | Tensor,
    *,
    vae: nn.Module | None = None,
    guidance_scale: float = 4.0,
    num_inference_steps: int = 50,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    progress=None,
) -> Tensor:
    """Samples of ``class_labels``: (N, C, H, W) float in [0, 1] after ``vae`` decoding, or the
    final latents (N, C, h, w) when ``vae`` is None.

    ``guidance_scale > 1`` turns on classifier-free guidance with the model's own null class.
    ``progress``: optional wrapper of the timestep iterator (e.g. ``tqdm`` or a pipeline's
    ``progress_bar``).

    The transformer and the vae run in eval mode and get their own mode back afterwards: a
    ``DiTTransformer2DModel`` built directly (not by ``from_pretrained``) is in training mode,
    where diffusers' label embedder drops labels at random, so samples would silently lose
    their class.
    """
    modes = [(m, m.training) for m in (transformer, vae) if m is not None]
    try:
        for m, _ in modes:
            m.eval()
        return _sample(transformer, scheduler, class_labels, vae=vae, guidance_scale=guidance_scale,
                       num_inference_steps=num_inference_steps, generator=generator, device=device,
                       progress=progress)
    finally:
        for m, was_training in modes:
            m.train(was_training)


def _sample(transformer, scheduler, class_labels, *, vae, guidance_scale, num_inference_steps, generator,
            device, progress) -> Tensor:
    if device is None:
        device = next(transformer.parameters()).device
    device = torch.device(device)
    cfg = transformer.config
    channels, size = cfg.in_channels, cfg.sample_size
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"class_labels must be integers, got {labels.dtype}")
    null = null_class_id(transformer)
    if labels.numel() == 0:
        raise ValueError("class_labels is empty")
    if int(labels.min()) < 0 or int(labels.max()) >= null:
        raise ValueError(f"class_labels must be in [0, {null - 1}] (the model has {null} classes; {null} is "
                         f"the null class), got {labels.tolist()}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    labels = labels.to(device)
    guided = guidance_scale > 1
    y = torch.cat([labels, torch.full_like(labels, null)]) if guided else labels
    dtype = next(transformer.parameters()).dtype
    latents = randn_tensor((labels.numel(), channels, size, size), generator=generator, device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma
    learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    step_kw = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_timesteps(num_inference_steps, device=device)
    steps = scheduler.timesteps
    for t in progress(steps) if progress is not None else steps:
        x_in = torch.cat([latents, latents]) if guided else latents
        x_in = scheduler.scale_model_input(x_in, t)
        t_in = torch.as_tensor(t, device=device).reshape(-1).expand(x_in.shape[0])
        out = transformer(x_in, timestep=t_in, class_labels=y).sample
        eps, rest = out[:, :channels], out[:, channels:]
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
            rest = rest[: labels.numel()]
        model_output = torch.cat([eps, rest], dim=1) if learned and rest.shape[1] == channels else eps
        latents = scheduler.step(model_output, t, latents, **step_kw).prev_sample
    if vae is None:
        return latents
    images = vae.decode(latents / vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


class KindDiTPipeline(DiTPipeline):
    """``DiTPipeline`` for any number of classes (the null class comes from the transformer).

    Same components (``transformer``, ``vae`` or None, ``scheduler``, optional ``id2label``)
    and call as DiTPipeline; ``output_type`` is ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
    """

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int],
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        vae = None if output_type == "latent" else self.vae
        samples = sample_dit(self.transformer, self.scheduler, class_labels, vae=vae,
                             guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                             generator=generator, device=self._execution_device, progress=self.progress_bar)
        if output_type in ("pil", "np") and samples.shape[1] not in (1, 3):
            raise ValueError(f"{samples.shape[1]}-channel samples are not images (a latent model needs a vae)")
        if vae is None and output_type != "latent":  # pixel-space model: [-1, 1] -> [0, 1]
            samples = (samples / 2 + 0.5).clamp(0, 1)
        if output_type in ("pil", "np"):
            samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                samples = self.numpy_to_pil(samples)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (samples,)
        return ImagePipelineOutput(images=samples)

