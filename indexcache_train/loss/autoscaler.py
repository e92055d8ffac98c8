"""Attach an auxiliary loss to an activation so its gradient flows when the activation's does.

The multi-layer distillation term of a served layer is added "when that layer runs" by attaching
it to the layer's attention output. Megatron's pipeline schedules call the config hook
``experimental_attention_variant_loss_scale_func`` with ``loss_scale * cp_size / num_microbatches``
every micro-batch; the factory points that hook at :meth:`IndexCacheLossAutoScaler.set_loss_scale`,
so our loss is scaled exactly like the LM loss (one scaling path, not a second one).
"""

from __future__ import annotations

import torch


class IndexCacheLossAutoScaler(torch.autograd.Function):
    """Identity on ``output``; in backward, feeds ``scale`` as the gradient of ``loss``."""

    main_loss_backward_scale: torch.Tensor | None = None

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (loss,) = ctx.saved_tensors
        scale = IndexCacheLossAutoScaler.main_loss_backward_scale
        scale_t = torch.ones((), device=loss.device) if scale is None else scale.to(loss.device)
        return grad_output, torch.ones_like(loss) * scale_t.reshape(()).to(loss.dtype)

    @staticmethod
    def set_loss_scale(scale: torch.Tensor) -> None:
        """Called by Megatron's schedules (via the config hook) once per micro-batch."""
        if not isinstance(scale, torch.Tensor):
            raise TypeError("IndexCacheLossAutoScaler.set_loss_scale requires a torch.Tensor")
        IndexCacheLossAutoScaler.main_loss_backward_scale = scale.detach().reshape(())

    @staticmethod
    def reset() -> None:
        IndexCacheLossAutoScaler.main_loss_backward_scale = None


def attach_loss(output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``output`` unchanged; backprop through it also backprops ``loss`` (scaled)."""
    if not loss.requires_grad:
        return output
    return IndexCacheLossAutoScaler.apply(output, loss)
