"""BatchNorm with statistics over all ranks, for CPU training under ``torch.distributed`` (gloo).

torch's ``nn.SyncBatchNorm`` runs only on GPUs; :func:`convert_sync_batchnorm` uses it for CUDA
modules and :class:`CPUSyncBatchNorm`, an equivalent autograd implementation, for CPU ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient is the all-reduced incoming gradient."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span all ranks, for CPU tensors (gloo).

    torch's ``nn.SyncBatchNorm`` runs only on GPUs (and DDP refuses it on CPU modules). Here
    the statistics are computed with two differentiable all-reduces (the sums, then the
    centred sums of squares), giving exactly the batch statistics of the concatenated batch;
    the running statistics are updated as BatchNorm does. Outside a process group, or in eval
    mode, it is plain BatchNorm. Same parameters, buffers and state-dict keys as BatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if self.training and group is not None and dist.get_world_size(group) > 1:
            return self._sync_forward(input, group)
        return super().forward(input)

    def _sync_forward(self, input: torch.Tensor, group) -> torch.Tensor:
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor(float(input.numel() // max(input.shape[1], 1)), dtype=input.dtype,
                             device=input.device)
        dist.all_reduce(count, group=group)
        mean = _all_reduce_sum(input.sum(dims), group) / count
        centred = input - mean.view(shape)
        var = _all_reduce_sum((centred * centred).sum(dims), group) / count
        output = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return output


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Make every ``BatchNorm*d`` of ``module`` use the statistics of all ranks, in place.

    CUDA modules get torch's ``nn.SyncBatchNorm``, CPU modules :class:`CPUSyncBatchNorm`. The
    new layers share the old ones' parameters and buffers, so optimisers built before the
    conversion keep working and state-dict keys do not change. Returns the converted module
    (a new object only when ``module`` itself is a BatchNorm layer).
    """
    first = next(module.parameters(), None)
    if first is not None and first.device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        converted = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats, process_group)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        return converted
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            module.add_module(name, new)
    return module
