"""The Gopher configuration for transformers (loaded with trust_remote_code=True).

Written by gopher_jax's `export hf` beside the weights; it imports transformers only."""

from __future__ import annotations

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig


class GopherConfig(PreTrainedConfig):
    """A Gopher decoder (Rae et al. 2021): pre-RMSNorm blocks, Transformer-XL relative
    attention with per-layer u/v biases over sinusoids of wavelengths up to
    `rel_pos_max_wavelength`, a 4x GELU MLP, and tied input/output embeddings by default.
    `max_position_embeddings` is the training context; positions are relative, so longer
    inputs run too."""

    model_type = "gopher"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 512,
                 num_hidden_layers: int = 8, num_attention_heads: int = 16, head_dim: int = 32,
                 intermediate_size: int = 2048, rms_norm_eps: float = 1e-6,
                 rel_pos_max_wavelength: float = 10000.0, max_position_embeddings: int = 2048,
                 tie_word_embeddings: bool = True, pad_token_id: int = 0,
                 eos_token_id: int = 1, bos_token_id: int = 1, use_cache: bool = True,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rel_pos_max_wavelength = rel_pos_max_wavelength
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         bos_token_id=bos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)
