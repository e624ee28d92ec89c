"""``nn.MultiheadAttention`` with feedback: its projections send the error through B, not W.

Attention has four weight matrices: the in-projections of queries, keys and values (packed in
``in_proj_weight`` ``(3E, E)``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when
``kdim``/``vdim`` differ from ``embed_dim``) and ``out_proj``. ``asymprop.convert`` runs each
through a feedback layer (a :class:`~asymprop.layers.LinearSite` reading the Parameter from the
module, and a ``FeedbackLinear`` for ``out_proj``), so every rule applies unchanged. The products
of activations, ``Q K^T`` and ``softmax(.) V``, carry no weight: no weight is transported
through them, and they keep autograd's exact backward pass.

Importing this module registers the converter (``asymprop.register_layer``); afterwards
``nn.TransformerEncoder``, ``nn.TransformerDecoder`` and ``nn.Transformer`` convert completely
(``asymprop.audit(model) == {}``).

Paper: feedback alignment, Lillicrap et al. 2016; DFA-trained transformers, Launay et al. 2020
("Direct feedback alignment scales to modern deep learning tasks and architectures").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .layers import (
    FeedbackContainer,
    FeedbackLayer,
    FeedbackLinear,
    LinearSite,
    plain_copy,
    register_layer,
    take_over,
)

__all__ = ["FeedbackMultiheadAttention", "convert_attention"]

#: Site name -> (weight name, rows of ``in_proj_bias`` as multiples of E), separate weights.
_SEPARATE = {
    "q_proj": ("q_proj_weight", (0, 1)),
    "k_proj": ("k_proj_weight", (1, 2)),
    "v_proj": ("v_proj_weight", (2, 3)),
}


def _stay_off_fused_kernels(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook that does nothing: its presence is the point.

    ``nn.TransformerEncoderLayer`` (eval mode, no grad) hands the raw weights of its attention and
    feed-forward layers to ``torch._transformer_encoder_layer_fwd`` unless a forward hook is
    attached to one of its submodules. That fused kernel would bypass every feedback layer: the
    no-grad passes of the rules (node perturbation's noisy pass, weight mirrors' shape recording)
    would see none of them. A module-level function, so converted models still pickle.
    """


class FeedbackMultiheadAttention(FeedbackContainer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose in- and out-projections carry feedback weights.

    The forward value is torch's (every option: ``batch_first``, unbatched input, masks of both
    kinds, ``is_causal``, ``bias_k``/``bias_v``, ``add_zero_attn``, dropout, attention weights).
    Backward: the error reaching each projection's input travels through that projection's B::

        dL/dx_q = g_q @ B_q,  dL/dx_k = g_k @ B_k,  dL/dx_v = g_v @ B_v,  dL/da = g_out @ B_out

    (``g`` the gradient at the projection's output, ``a`` the heads' concatenated output), while
    ``Q K^T`` and ``softmax(.) V`` (products of activations, no weight) keep autograd's exact
    backward. With ``bp`` every gradient equals ``nn.MultiheadAttention``'s.

    Children: ``in_proj`` (packed weights) or ``q_proj``/``k_proj``/``v_proj`` (separate ones),
    absent where the user excluded them (that weight then runs exactly, named in
    ``excluded_sites``), and ``out_proj``. A packed layer runs ``in_proj`` once per forward pass
    (node perturbation and DFA need one call per layer): on ``query`` alone in self-attention,
    and in cross-attention on query, key (and value, unless ``key is value``) concatenated
    along the sequence, keeping the diagonal blocks: 2-3 times the in-projection's products.

    Built by ``asymprop.convert`` (never directly); ``to_plain()`` gives back the torch module.

    Example:
        >>> import asymprop, asymprop.attention
        >>> layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        >>> model = asymprop.convert(nn.TransformerEncoder(layer, 2), "fa", seed=0)
        >>> asymprop.audit(model)
        {}

    Paper: Lillicrap et al. 2016 (feedback alignment); Launay et al. 2020 (transformers
    trained with direct feedback alignment).
    """

    #: 3-D parameters through which no error travels: ``add_bias_kv``'s extra key and value are
    #: appended after the projections (for ``audit``; its reading of this is a pending change)
    no_transport: ClassVar[frozenset[str]] = frozenset({"bias_k", "bias_v"})

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        # Follows nn.MultiheadAttention.forward and F.multi_head_attention_forward step by step,
        # in the batch-first layout: the feedback layers always see (N, L, E), batch first, as
        # per-example rules (np, dfa, wm's positions) expect.
        if query.is_nested or key.is_nested or value.is_nested:
            return self._nested_forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
            )
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        is_batched = F._mha_shape_check(  # type: ignore[attr-defined]
            query, key, value, key_padding_mask, attn_mask, self.num_heads
        )
        self_attention = query is key and key is value
        shared_kv = key is value
        if not is_batched:  # one example: a batch of one (the same tensor stays the same)
            query, key, value = _same_map(lambda t: t.unsqueeze(0), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = _same_map(lambda t: t.transpose(0, 1), query, key, value)
        N, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim

        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        if self.embed_dim != E:
            raise AssertionError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {E}"
            )
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if not self._qkv_same_embed_dim and key.shape[:2] != value.shape[:2]:
            raise AssertionError(
                f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                f"{value.shape[:2]}"
            )

        q, k, v = self._in_projection(query, key, value, self_attention, shared_kv)  # (N, *, E)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (L, S):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                        f"{(L, S)}."
                    )
                attn_mask = attn_mask.unsqueeze(0)  # (1, L, S)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (N * H, L, S):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                        f"{(N * H, L, S)}."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            # one more key and value, learned: (1, 1, E) -> (N, 1, E)
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must both be set or both be None")

        # heads: (N, L, E) -> (N, H, L, D) -> (N*H, L, D), row n*H + h (torch's order)
        q = q.reshape(N, L, H, D).transpose(1, 2).reshape(N * H, L, D)
        k = k.reshape(N, -1, H, D).transpose(1, 2).reshape(N * H, -1, D)
        v = v.reshape(N, -1, H, D).transpose(1, 2).reshape(N * H, -1, D)
        if self.add_zero_attn:  # one more key and value, zero
            zeros = k.new_zeros((N * H, 1, D))
            k = torch.cat([k, zeros], dim=1)
            v = torch.cat([v, zeros], dim=1)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        S = k.shape[1]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                raise AssertionError(
                    f"Expected key_padding_mask of shape {(N, S)}, got "
                    f"{tuple(key_padding_mask.shape)}"
                )
            # (N, S) -> (N*H, 1, S), added to every query's scores
            padding = key_padding_mask.view(N, 1, 1, S).expand(-1, H, -1, -1).reshape(N * H, 1, S)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0

        weights: Tensor | None = None
        if need_weights:
            scores_q = q * math.sqrt(1.0 / float(D))
            if attn_mask is not None:  # (N*H, L, D) @ (N*H, D, S) -> (N*H, L, S)
                scores = torch.baddbmm(attn_mask, scores_q, k.transpose(-2, -1))
            else:
                scores = torch.bmm(scores_q, k.transpose(-2, -1))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            heads = torch.bmm(weights, v).view(N, H, L, D)  # (N*H, L, S) @ (N*H, S, D)
            weights = weights.view(N, H, L, S)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (N, L, S)
        else:
            if attn_mask is not None:  # (1, L, S) -> (1, 1, L, S); (N*H, *, S) -> (N, H, *, S)
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(N, H, -1, S)
            heads = F.scaled_dot_product_attention(
                q.view(N, H, L, D),
                k.view(N, H, S, D),
                v.view(N, H, S, D),
                attn_mask,
                dropout_p,
                is_causal,
            )
        # (N, H, L, D) -> (N, L, H*D): the heads side by side, then the out-projection
        output = self.out_proj(heads.transpose(1, 2).reshape(N, L, E))

        if not is_batched:
            return output.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            output = output.transpose(0, 1)  # (L, N, E)
        return output, weights

    def _in_projection(
        self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, shared_kv: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(q, k, v)``, each ``(N, *, E)``, through the feedback layers (one call each)."""
        E = self.embed_dim
        if not self._qkv_same_embed_dim:
            biases: tuple[Tensor | None, ...] = (None, None, None)
            if self.in_proj_bias is not None:
                biases = self.in_proj_bias.chunk(3)
            return (
                self._project("q_proj", query, self.q_proj_weight, biases[0]),
                self._project("k_proj", key, self.k_proj_weight, biases[1]),
                self._project("v_proj", value, self.v_proj_weight, biases[2]),
            )
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if self_attention:  # (N, L, E) -> (N, L, 3E) -> three (N, L, E)
            q, k, v = self._project("in_proj", query, weight, bias).chunk(3, dim=-1)
            return q, k, v
        site = self._modules.get("in_proj")
        if site is None:  # excluded: exact, torch's split of the packed weight (no wasted products)
            b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
            w_q, w_k, w_v = weight.chunk(3)
            return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        # One call of the feedback layer (np and dfa need one call per layer per pass): the
        # inputs side by side along the sequence, (N, L + S [+ S], E) -> (N, L + S [+ S], 3E),
        # and the diagonal blocks kept; the other blocks get no gradient, so W's gradient and the
        # error through B are those of three separate products.
        parts = [query, key] if shared_kv else [query, key, value]
        blocks = site(torch.cat(parts, dim=1)).split([p.shape[1] for p in parts], dim=1)
        q = blocks[0][..., :E]
        k = blocks[1][..., E : 2 * E]
        v = blocks[-1][..., 2 * E :]
        return q, k, v

    def _project(self, name: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        site = self._modules.get(name)
        if site is None:  # excluded by the user: exact backprop through W
            return F.linear(x, weight, bias)
        return site(x)  # type: ignore[no-any-return]

    def _nested_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Nested (ragged) self-attention, as ``nn.TransformerEncoder`` passes it to its layers
        in eval mode without grad when given a ``src_key_padding_mask``: pad, mask the padding,
        run the ordinary forward, and return a nested tensor of the same lengths."""
        if not (query is key and key is value and self.batch_first) or (
            key_padding_mask is not None or attn_mask is not None
        ):
            raise AssertionError(
                "FeedbackMultiheadAttention takes a NestedTensor only for batch-first "
                "self-attention without masks (nn.TransformerEncoder's inference path); pad the "
                "input and pass key_padding_mask instead"
            )
        lengths = [int(t.shape[0]) for t in query.unbind()]
        padded = query.to_padded_tensor(0.0)  # (N, L_max, E)
        positions = torch.arange(padded.shape[1], device=padded.device)
        padding = positions[None, :] >= torch.tensor(lengths, device=padded.device)[:, None]
        output, weights = self.forward(
            padded,
            padded,
            padded,
            key_padding_mask=padding,
            need_weights=need_weights,
            is_causal=is_causal,
        )
        rows = [row[:length] for row, length in zip(output, lengths, strict=True)]
        return torch.nested.as_nested_tensor(rows), weights

    def to_plain(self) -> nn.MultiheadAttention:
        """The ``nn.MultiheadAttention`` with the same Parameters (feedback state dropped)."""
        plain = take_over(self, nn.MultiheadAttention, drop=("excluded_sites",))
        modules = plain._modules
        for name in ("in_proj", *_SEPARATE):
            modules.pop(name, None)
        out_proj = modules["out_proj"]
        if isinstance(out_proj, FeedbackLayer):
            modules["out_proj"] = plain_copy(out_proj, NonDynamicallyQuantizableLinear)
        hooks = plain._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is _stay_off_fused_kernels]:
            del hooks[key]
        return plain


def _same_map(
    fn: Callable[[Tensor], Tensor], query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``fn`` applied to each of query, key, value, keeping which of them are the same tensor."""
    q = fn(query)
    k = q if key is query else fn(key)
    v = k if value is key else (q if value is query else fn(value))
    return q, k, v


def _pad_masks(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Both masks with one more key position (an added key/value is never masked)."""
    if attn_mask is not None:
        attn_mask = F.pad(attn_mask, (0, 1))
    if key_padding_mask is not None:
        key_padding_mask = F.pad(key_padding_mask, (0, 1))
    return attn_mask, key_padding_mask


def convert_attention(
    module: nn.Module, make_site: Callable[[str, FeedbackLayer], bool]
) -> nn.Module:
    """``asymprop.convert``'s converter for ``nn.MultiheadAttention`` (registered on import).

    The new module takes over ``module``'s state (the same Parameter objects, hooks and
    attributes, so ``state_dict`` keys of the weights are unchanged) and gets one feedback layer
    per weight matrix: ``in_proj`` (packed) or ``q_proj``/``k_proj``/``v_proj`` (separate
    weights, each with its rows of ``in_proj_bias``), and ``out_proj`` as a ``FeedbackLinear``.
    ``make_site`` attaches the rule, or returns False where the user excluded a weight (it then
    runs exactly and is named in ``excluded_sites``). Returns ``module`` itself if every weight
    was excluded.
    """
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"convert_attention expects nn.MultiheadAttention, got {type(module)}")
    new = take_over(module, FeedbackMultiheadAttention)
    new.excluded_sites = {}
    E = module.embed_dim
    if module._qkv_same_embed_dim:
        sites = {"in_proj": LinearSite(new, "in_proj_weight", "in_proj_bias")}
    else:
        sites = {
            name: LinearSite(new, weight, "in_proj_bias", (start * E, stop * E))
            for name, (weight, (start, stop)) in _SEPARATE.items()
        }
    converted = 0
    for name, site in sites.items():
        if make_site(name, site):
            new.add_module(name, site)
            converted += 1
        else:
            new.excluded_sites[site.weight_name] = site.__dict__["_asymprop_excluded"]

    out_proj = module.out_proj
    if type(out_proj) in (nn.Linear, NonDynamicallyQuantizableLinear):  # else left to audit
        layer = take_over(out_proj, FeedbackLinear)
        if make_site("out_proj", layer):
            new._modules["out_proj"] = layer
            converted += 1
        else:
            out_proj.__dict__["_asymprop_excluded"] = layer._asymprop_excluded  # audit reads it

    if not converted:  # left as it was; audit names the user's reason on it
        reasons = "; ".join(dict.fromkeys(new.excluded_sites.values()))
        module.__dict__["_asymprop_excluded"] = reasons
        return module
    new.register_forward_pre_hook(_stay_off_fused_kernels)
    return new


register_layer(nn.MultiheadAttention, convert_attention)
