"""Parameter and FLOP counting with forward hooks (Conv2d, Linear, BatchNorm2d).

How the official model zoo figures were made (tools/converter.py + damo/utils/model_utils.py):
the checkpoint's RepConvs are switched to deploy form, BatchNorms are *not* folded, thop counts
"ops" (conv: one per multiply-accumulate plus one per output element when the conv has a bias;
BatchNorm: two per element; activations, pooling, upsampling: none), and get_model_info prints
``2 * ops`` as "FLOPs (G)". So the table's GFLOPs is 2 x (thop MACs), not MACs: DAMO-YOLO-T's
9.0 G multiply-accumulates are its "18.1 G". Counting that way here matches every variant within
0.3 % (``python -m damoyolo.variants``). The same model gives the "Params (M)" column.

``deploy_macs`` counts what our fully fused export runs (RepConv and every BatchNorm folded).
Counting runs on the ``meta`` device (shapes only), so L at 640 takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_COUNTED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


@dataclass
class ModelCost:
    """Cost of one forward at batch 1 and ``size``, in the official table's convention plus ours."""

    variant: str
    size: tuple[int, int]
    params: int  # RepConv fused, BatchNorm kept: the official "Params"
    thop_ops: int  # thop-style ops of that model (see module docstring)
    deploy_params: int  # RepConv and BatchNorm folded: what our ONNX holds
    deploy_macs: int  # multiply-accumulates of that model

    @property
    def gflops(self) -> float:
        """The official "FLOPs (G)" figure: 2 x thop ops."""
        return 2 * self.thop_ops / 1e9

    @property
    def params_m(self) -> float:
        return self.params / 1e6


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_ops(module: nn.Module, output: torch.Tensor, *, with_bias: bool = True, with_bn: bool = True) -> int:
    """thop-style ops of one layer for one image, from its output shape."""
    per_image = output.numel() // output.shape[0]
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
        return per_image * (k + int(with_bias and module.bias is not None))
    if isinstance(module, nn.Linear):
        return per_image * (module.in_features + int(with_bias and module.bias is not None))
    if isinstance(module, nn.BatchNorm2d) and with_bn:
        return 2 * per_image
    return 0


def count_ops(model: nn.Module, size: tuple[int, int], in_channels: int, *, macs_only: bool = False) -> int:
    """Sum :func:`layer_ops` over one forward at batch 1; ``macs_only``: multiply-accumulates only."""
    total = 0

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += layer_ops(module, output, with_bias=not macs_only, with_bn=not macs_only)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COUNTED)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, *size, device=device))
    finally:
        for h in handles:
            h.remove()
    return total


def model_cost(variant: str, size: int | tuple[int, int] | None = None, num_classes: int = 80,
               in_channels: int = 3) -> ModelCost:
    """Build ``variant`` on the meta device and count it in both deploy forms (default size: official)."""
    from damoyolo.config import get_spec
    from damoyolo.model import build_model, fuse_repconv

    spec = get_spec(variant)
    size = spec.size if size is None else size
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    with torch.device("meta"):
        model = build_model(variant, num_classes=num_classes, in_channels=in_channels).eval()
        fuse_repconv(model, conv_bn=False)
        params, ops = count_params(model), count_ops(model, hw, in_channels)
        fuse_repconv(model)
        deploy_params, macs = count_params(model), count_ops(model, hw, in_channels, macs_only=True)
    return ModelCost(spec.name, hw, params, ops, deploy_params, macs)
