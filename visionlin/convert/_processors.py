"""Attention processors the converter installs (plain objects: the trained state lives on ``attn.visionlin_core``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._methods import CORE_ATTR

__all__ = [
    "CogVideoXJointAttnProcessor",
    "FluxJointAttnProcessor",
    "HunyuanVideoJointAttnProcessor",
    "JointAttnProcessor",
    "SelfAttnProcessor",
    "WanSelfAttnProcessor",
]


def _with_qk_delta(core, attn, x: torch.Tensor, query: torch.Tensor, key: torch.Tensor, start: int = 0):
    """Add the core's change to the stock q / k projections (LinFusion's input MLPs) for the image tokens ``x``,
    which sit at ``start : start + len(x)`` of the projected sequence (``[B, S, C]``, before norms and RoPE)."""
    delta = core.qk_delta(attn, x)
    if delta is None:
        return query, key
    pad = (0, 0, start, query.shape[1] - start - x.shape[1])
    return query + F.pad(delta[0], pad), key + F.pad(delta[1], pad)


def _project_heads_last(core, attn, x: torch.Tensor, image: torch.Tensor | None = None, start: int = 0):
    """The stock ``to_q`` / ``to_k`` / ``to_v`` of ``x``, the core's q / k change for the image tokens ``image`` (``x``
    itself by default) at ``start``, split into heads-last ``[B, S, H, D]`` and through the optional q / k norms (they
    act on the head dim, so heads-last gives the stock values)."""
    query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    query, key = _with_qk_delta(core, attn, x if image is None else image, query, key, start)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


class SelfAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for the legacy ``Attention`` class (DiT, PixArt, UNet ``attn1``) with the
    core attention call replaced by the module's ``visionlin_core`` (heads-last ``[B, N, H, D]``).

    Everything around the core (spatial / group norm, projections, q/k norms, output projection, residual, rescale)
    is the stock processor's code, so the ``dense`` core reproduces stock outputs.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError(
                f"{self.name}: the converted self-attention got "
                f"{'encoder_hidden_states' if encoder_hidden_states is not None else 'an attention_mask'}; only "
                "unmasked self-attention over image tokens is converted (revert the conversion to use it)"
            )
        core = getattr(attn, CORE_ATTR)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = _project_heads_last(core, attn, hidden_states)
        head_dim = query.shape[-1]
        core.check_tokens(query.shape[1], self.name)
        # The stock processor calls SDPA without ``scale`` (it ignores ``attn.scale``): D ** -0.5.
        hidden_states = core(query, key, value, head_dim**-0.5)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class JointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3 / SD3.5) with the core call replaced.

    The joint sequence is ``[image, text]``. Image queries go through the module's ``visionlin_core`` over the image
    keys, with the text keys attended densely and merged exactly into its softmax part (the ops'
    ``additional_keys``); text queries attend densely to every key (the text is short). Without
    ``encoder_hidden_states`` (SD3.5's image-only ``attn2``) it is plain image self-attention.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        if attention_mask is not None:
            raise NotImplementedError(f"{self.name}: an attention_mask is not supported by the converted attention")
        from ..kernels import softmax_attention

        core = getattr(attn, CORE_ATTR)
        batch_size = hidden_states.shape[0]
        query, key, value = _project_heads_last(core, attn, hidden_states)
        head_dim = query.shape[-1]
        core.check_tokens(query.shape[1], self.name)
        scale = head_dim**-0.5
        if encoder_hidden_states is None:
            hidden_states = core(query, key, value, scale)
        else:
            ctx_q = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            ctx_k = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            ctx_v = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            img = core(query, key, value, scale, ctx_k, ctx_v)
            txt = softmax_attention(ctx_q, torch.cat([key, ctx_k], 1), torch.cat([value, ctx_v], 1), scale=scale)
            hidden_states = torch.cat([img, txt.to(img.dtype)], dim=1)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            n_img = query.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxJointAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` (Flux, double and single blocks) with the core call replaced.

    The joint sequence is ``[text, image]``. Single blocks receive it already concatenated (no
    ``encoder_hidden_states``), so the text length comes from the model's pre-forward hook (``core.text_len``). Image
    queries go through the core over the image keys with the text keys dense (exact log-sum-exp merge); text queries
    attend densely to everything. Projections (fused or not), q / k norms and RoPE are the stock code's.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        from ..kernels import softmax_attention

        if attention_mask is not None:
            raise NotImplementedError(f"{self.name}: an attention_mask is not supported by the converted attention")
        core = getattr(attn, CORE_ATTR)
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        # Single blocks get [text, image] already joined: the image tokens start after the text.
        t_in = 0 if encoder_hidden_states is not None else core.text_len
        query, key = _with_qk_delta(core, attn, hidden_states[:, t_in:], query, key, t_in)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        t = core.text_len
        core.check_tokens(query.shape[1] - t, self.name)
        scale = attn.head_dim**-0.5
        img = core(query[:, t:], key[:, t:], value[:, t:], scale, key[:, :t], value[:, :t]) if t else None
        if img is None:
            img = core(query, key, value, scale)
            hidden_states = img
        else:
            txt = softmax_attention(query[:, :t], key, value, scale=scale)
            hidden_states = torch.cat([txt.to(img.dtype), img], dim=1)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def _wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved channel pairs (as ``WanAttnProcessor`` applies it)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


class WanSelfAttnProcessor:
    """diffusers' ``WanAttnProcessor`` for the self-attention ``attn1`` (video tokens ``(F, H, W)`` row-major) with
    the core call replaced; projections (fused or not), q / k norms and RoPE are the stock code's."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError(
                f"{self.name}: only unmasked self-attention over video tokens is converted (got "
                f"{'encoder_hidden_states' if encoder_hidden_states is not None else 'an attention_mask'})"
            )
        core = getattr(attn, CORE_ATTR)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = _with_qk_delta(core, attn, hidden_states, query, key)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _wan_rope(query, *rotary_emb), _wan_rope(key, *rotary_emb)
        core.check_tokens(query.shape[1], self.name)
        hidden_states = core(query, key, value, query.shape[-1] ** -0.5)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class CogVideoXJointAttnProcessor:
    """diffusers' ``CogVideoXAttnProcessor2_0`` with the core call replaced.

    The joint sequence is ``[text, video]``; RoPE acts on the video part only (the stock code). Video queries go
    through the core over the video keys with the text keys dense (exact log-sum-exp merge); text queries attend
    densely to everything.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        from ..kernels import softmax_attention

        if attention_mask is not None:
            raise NotImplementedError(f"{self.name}: an attention_mask is not supported by the converted attention")
        core = getattr(attn, CORE_ATTR)
        t = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = _with_qk_delta(core, attn, hidden_states[:, t:], query, key, t)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, t:] = apply_rotary_emb(query[:, :, t:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, t:] = apply_rotary_emb(key[:, :, t:], image_rotary_emb)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # heads-last
        core.check_tokens(query.shape[1] - t, self.name)
        scale = head_dim**-0.5
        video = core(query[:, t:], key[:, t:], value[:, t:], scale, key[:, :t], value[:, :t])
        text = softmax_attention(query[:, :t], key, value, scale=scale)
        hidden_states = torch.cat([text.to(video.dtype), video], dim=1).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states.to(query.dtype))
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split([t, hidden_states.size(1) - t], dim=1)
        return hidden_states, encoder_hidden_states


class HunyuanVideoJointAttnProcessor:
    """diffusers' ``HunyuanVideoAttnProcessor2_0`` (double blocks: separate text projections; single blocks: one
    projection of the joined sequence) with the core call replaced.

    The joint sequence is ``[video, text]`` with a text-padding mask (``[B, 1, 1, S]`` bool, the valid text a
    prefix of the text part). RoPE acts on the video part (the stock code). Video queries go through the core over
    the video keys with each sample's valid text keys dense (exact log-sum-exp merge); text queries attend densely to
    the video and valid text keys. Samples with different text lengths are computed one by one.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def _text_lengths(self, mask: torch.Tensor | None, b: int, n: int, t: int) -> list[int]:
        if mask is None:
            return [t] * b
        if mask.dtype != torch.bool or mask.numel() != b * (n + t):
            raise NotImplementedError(
                f"{self.name}: expected HunyuanVideo's boolean key mask [B, 1, 1, {n + t}], got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        m = mask.reshape(b, n + t)
        lengths = m[:, n:].sum(dim=1)
        prefix = torch.arange(t, device=m.device)[None] < lengths[:, None]
        if not bool(m[:, :n].all()) or not torch.equal(m[:, n:], prefix):
            raise NotImplementedError(
                f"{self.name}: the attention mask must keep every video token and a prefix of the text tokens "
                "(HunyuanVideo's text-padding mask)"
            )
        return [int(x) for x in lengths.tolist()]

    def _attend(self, core, query, key, value, n: int, text_len: int, scale: float) -> torch.Tensor:
        from ..kernels import softmax_attention

        kt, vt = key[:, n : n + text_len], value[:, n : n + text_len]
        if text_len:
            video = core(query[:, :n], key[:, :n], value[:, :n], scale, kt, vt)
        else:
            video = core(query[:, :n], key[:, :n], value[:, :n], scale)
        text = softmax_attention(query[:, n:], key[:, : n + text_len], value[:, : n + text_len], scale=scale)
        return torch.cat([video, text.to(video.dtype)], dim=1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            raise NotImplementedError(f"{self.name}: the converted HunyuanVideo attention needs the text tokens")
        core = getattr(attn, CORE_ATTR)
        n, t = hidden_states.shape[1], encoder_hidden_states.shape[1]
        joined = attn.add_q_proj is None  # single blocks project [video, text] together
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if joined else hidden_states
        query, key, value = _project_heads_last(core, attn, x, hidden_states)
        if image_rotary_emb is not None:
            query = torch.cat([apply_rotary_emb(query[:, :n], image_rotary_emb, sequence_dim=1), query[:, n:]], 1)
            key = torch.cat([apply_rotary_emb(key[:, :n], image_rotary_emb, sequence_dim=1), key[:, n:]], 1)
        if not joined:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)
        core.check_tokens(n, self.name)
        scale = query.shape[-1] ** -0.5
        lengths = self._text_lengths(attention_mask, query.shape[0], n, t)
        if len(set(lengths)) <= 1:
            out = self._attend(core, query, key, value, n, lengths[0] if lengths else t, scale)
        else:
            out = torch.cat(
                [
                    self._attend(core, query[i : i + 1], key[i : i + 1], value[i : i + 1], n, length, scale)
                    for i, length in enumerate(lengths)
                ]
            )
        out = out.flatten(2, 3).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :n], out[:, n:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
