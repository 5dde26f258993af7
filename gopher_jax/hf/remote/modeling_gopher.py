"""The Gopher decoder in PyTorch for transformers (loaded with trust_remote_code=True).

The same function as gopher_jax's model (gopher_jax/model/gopher.py, attention.py, layers.py):

    x = embed(ids)
    per layer:  x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x))
    logits = RMSNorm(x) @ embed.T          (or lm_head when the embeddings are untied)

Attention is Transformer-XL's relative attention (Dai et al. 2019, section 3.3) with per-layer
u and v biases: score(i, j) = ((q_i + u) . k_j + (q_i + v) . (W_r R_{i-j})) / sqrt(head_dim),
causal, softmax in float32. R_d is the sinusoid of distance d over hidden_size dimensions: sin
of d / wavelength**(2f/hidden_size) in the first half, cos in the second, for
f = 0 .. hidden_size/2 - 1. Positions are relative only: the same weights run at any length.

The key/value cache is transformers' Cache (generate() makes a DynamicCache): new queries at
positions P, ..., P+T-1 attend to the P cached keys and their own; the position term is the
query against the projected sinusoids of every distance 0, ..., P+T-1, gathered at i - j.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch name
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_gopher import GopherConfig


def sinusoids(distances: torch.Tensor, dim: int, max_wavelength: float) -> torch.Tensor:
    """[N] distances -> [N, dim] float32: sin in the first half, cos in the second."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=distances.device) / dim
    inv_freq = 1.0 / (max_wavelength ** exponent)
    angles = distances.to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class GopherRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(torch.float32)).to(x.dtype)


class GopherMLP(nn.Module):
    def __init__(self, config: GopherConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class GopherAttention(nn.Module):
    def __init__(self, config: GopherConfig, layer_idx: int):
        super().__init__()
        d, h, k = config.hidden_size, config.num_attention_heads, config.head_dim
        self.num_heads, self.head_dim, self.layer_idx = h, k, layer_idx
        self.hidden_size, self.max_wavelength = d, config.rel_pos_max_wavelength
        self.q_proj = nn.Linear(d, h * k, bias=False)
        self.k_proj = nn.Linear(d, h * k, bias=False)
        self.v_proj = nn.Linear(d, h * k, bias=False)
        self.r_proj = nn.Linear(d, h * k, bias=False)  # sinusoid -> per-head key
        self.o_proj = nn.Linear(h * k, d, bias=False)
        self.u_bias = nn.Parameter(torch.zeros(h, k))
        self.v_bias = nn.Parameter(torch.zeros(h, k))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None,
                cache: Cache | None) -> torch.Tensor:
        """x [B, T, D]; key_mask [B, S] bool (False: padding) over the cached and new keys,
        or None; the cache, updated with this layer's new keys and values."""
        b, t, _ = x.shape
        h, kd = self.num_heads, self.head_dim
        q = self.q_proj(x).view(b, t, h, kd)
        k = self.k_proj(x).view(b, t, h, kd).transpose(1, 2)  # [B, H, T, K]
        v = self.v_proj(x).view(b, t, h, kd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        s = k.shape[2]
        past = s - t
        distance = torch.arange(s, device=x.device)
        r = self.r_proj(sinusoids(distance, self.hidden_size, self.max_wavelength).to(x.dtype))
        r = r.view(s, h, kd)  # per-head keys of distances 0, ..., S-1
        content = torch.einsum("bthk,bhsk->bhts", (q + self.u_bias).float(), k.float())
        by_distance = torch.einsum("bthk,shk->bhts", (q + self.v_bias).float(), r.float())
        rel = (past + torch.arange(t, device=x.device))[:, None] - distance[None, :]  # [T, S]
        position = torch.gather(by_distance, -1,
                                rel.clamp(0, s - 1).expand(b, h, t, s))
        scores = (content + position) * kd**-0.5
        visible = (rel >= 0)[None, None]
        if key_mask is not None:
            visible = visible & key_mask[:, None, None, :]
        scores = scores.masked_fill(~visible, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.einsum("bhts,bhsk->bthk", probs, v).reshape(b, t, h * kd)
        return self.o_proj(out)


class GopherDecoderLayer(nn.Module):
    def __init__(self, config: GopherConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = GopherRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = GopherAttention(config, layer_idx)
        self.mlp_norm = GopherRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GopherMLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None,
                cache: Cache | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), key_mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class GopherPreTrainedModel(PreTrainedModel):
    config_class = GopherConfig
    base_model_prefix = "model"
    _no_split_modules = ["GopherDecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        # Random init for from_config(); trained weights come from the checkpoint.
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=1 / math.sqrt(module.weight.shape[-1]))
        elif isinstance(module, GopherRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, GopherAttention):
            nn.init.zeros_(module.u_bias)
            nn.init.zeros_(module.v_bias)


class GopherModel(GopherPreTrainedModel):
    def __init__(self, config: GopherConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GopherDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = GopherRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        use_cache = self.config.use_cache if use_cache is None else use_cache
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cache = past_key_values if use_cache else None
        key_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            key_mask = attention_mask.to(torch.bool)
        for layer in self.layers:
            x = layer(x, key_mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x),
                                       past_key_values=cache)


class GopherForCausalLM(GopherPreTrainedModel, GenerationMixin):
    def __init__(self, config: GopherConfig):
        super().__init__(config)
        self.model = GopherModel(config)
        # Tied: the logits reuse the input embedding (no second matrix).
        self.lm_head = (None if config.tie_word_embeddings else
                        nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm_head

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        table = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h.float(), table.float())
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=out.past_key_values)
