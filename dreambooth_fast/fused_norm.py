"""`--fused-norm`: diffusers' ResnetBlock2D with its two norm -> activation chains (norm1 -> act, and norm2 ->
scale-shift -> act with time_embedding_norm="scale_shift", as in IF's UNets) run by one fused op each,
`ops.group_norm_act`, instead of GroupNorm, the scale-shift expression and the activation one after another.

`fuse_resnet_norms(unet)` changes the class of each ResnetBlock2D in place to FusedNormResnetBlock2D, whose forward
is diffusers' with those chains fused: the parameters, their names and state_dict stay as they were, so
checkpoints and the written model are unchanged. Blocks whose nonlinearity is neither GELU (erf form) nor SiLU are
left as they are.
"""

from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D

from . import ops


def fused_activation(module: torch.nn.Module) -> str | None:
    """The group_norm_act name of a nonlinearity module ("gelu", "silu"), None if the op has no such activation."""
    if type(module) is torch.nn.GELU and module.approximate == "none":
        return "gelu"
    if type(module) is torch.nn.SiLU:
        return "silu"
    return None


class FusedNormResnetBlock2D(ResnetBlock2D):
    """ResnetBlock2D whose norm1 -> act and norm2 -> (scale-shift) -> act run as ops.group_norm_act."""

    def _norm_act(self, norm: torch.nn.GroupNorm, hidden: torch.Tensor, scale=None, shift=None) -> torch.Tensor:
        return ops.group_norm_act(hidden, norm.num_groups, norm.weight, norm.bias, norm.eps, scale=scale,
                                  shift=shift, act=fused_activation(self.nonlinearity))

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # diffusers' ResnetBlock2D.forward (0.3x), with the two chains fused; the deprecated `scale` is ignored
        # there too.
        hidden_states = self._norm_act(self.norm1, input_tensor)

        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)

        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]

        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(
                    f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}"
                )
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self._norm_act(self.norm2, hidden_states, time_scale, time_shift)
        else:
            if self.time_embedding_norm == "default" and temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self._norm_act(self.norm2, hidden_states)

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)

        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)

        return (input_tensor + hidden_states) / self.output_scale_factor


def fuse_resnet_norms(unet: torch.nn.Module) -> int:
    """Make every ResnetBlock2D of `unet` with a GELU or SiLU nonlinearity a FusedNormResnetBlock2D, in place;
    returns how many blocks were changed."""
    fused = 0
    for module in unet.modules():
        if type(module) is ResnetBlock2D and fused_activation(module.nonlinearity) is not None:
            module.__class__ = FusedNormResnetBlock2D
            fused += 1
    return fused
