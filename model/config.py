"""The network's and the diffusion's configs: one dataclass per component.

Every field carries a one-line docstring (the string literal under it). The run configuration
that holds them with the data, parallel and training settings, and loads them from YAML, is
pretrain/config.py.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    num_layers: int = 2
    """Number of transformer blocks."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_heads: int = 4
    """Attention (query) heads (split over tensor-parallel ranks)."""
    num_kv_heads: int = 0
    """Key/value heads (grouped-query attention: each serves num_heads / num_kv_heads query heads); 0 = num_heads.
    Split over tensor-parallel ranks when divisible by their number, else replicated."""
    head_dim: int = 0
    """Width of each attention head; 0 = hidden_size / num_heads (Qwen3-0.6B: hidden 1024, 16 heads of 128)."""
    qk_norm: bool = False
    """RMSNorm over head_dim on every head's queries and keys before rotary (Qwen3): one weight for q, one for k."""
    tie_embeddings: bool = False
    """The output layer uses the (vocab-parallel) embedding weight instead of its own."""
    ffn_hidden_size: int = 0
    """SwiGLU inner width; 0 picks the Llama rule (8/3 * hidden, rounded up to 64)."""
    vocab_size: int = 0
    """Vocabulary rows the model predicts over; 0 takes the tokenizer's size. It may exceed the
    tokenizer's (a pretrained model's padded table, e.g. Qwen3's 151,936): ids the corpus never
    uses are just never targets."""
    mask_token: int = -1
    """The id of [MASK]: -1 adds a row of its own at id vocab_size; an id below vocab_size reuses
    that (rarely or never used) token, so the model keeps exactly its source's vocabulary."""
    make_vocab_size_divisible_by: int = 128
    """The embedding table is padded to a multiple of this times the tensor-parallel size."""
    seq_len: int = 128
    """Training sequence length L (the network sees 2L tokens in set mode)."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rope_scaling: str = ""
    """Rotary frequencies rescaled for a longer context: '' (none) or Llama 3.1's rule
    'llama3:FACTOR:LOW_FREQ_FACTOR:HIGH_FREQ_FACTOR:ORIGINAL_CONTEXT' (Llama 3.2 1B: 'llama3:32:1:4:8192')."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialization."""
    attention_backend: str = "auto"
    """'tiled' (exact, skips forbidden key ranges; CPU training), 'sdpa' (dense boolean mask), 'flex'
    (BlockMask; GPU), or 'auto' (flex on CUDA, else tiled)."""
    dropout: float = 0.0
    """Dropout on the attention-output and MLP-output residual branches in training, in [0, 1)."""

    def mask_id(self) -> int:
        """The id of [MASK]: model.mask_token, or the new row vocab_size."""
        return self.vocab_size if self.mask_token < 0 else self.mask_token

    def vocab_rows(self) -> int:
        """Rows of the vocabulary-sized weights that hold ids: vocab_size, plus [MASK]'s own row."""
        return self.vocab_size + (1 if self.mask_token < 0 else 0)

    def llama3_rope_scaling(self) -> tuple[float, float, float, float] | None:
        """(factor, low_freq_factor, high_freq_factor, original context) of rope_scaling, or None."""
        if not self.rope_scaling:
            return None
        kind, *values = self.rope_scaling.split(":")
        try:
            numbers = tuple(float(v) for v in values)
        except ValueError:
            numbers = ()
        if kind != "llama3" or len(numbers) != 4 or min(numbers) <= 0 or numbers[1] >= numbers[2]:
            raise ValueError(f"model.rope_scaling={self.rope_scaling!r}: expected 'llama3:FACTOR:LOW_FREQ_FACTOR:"
                             "HIGH_FREQ_FACTOR:ORIGINAL_CONTEXT' with positive numbers, LOW < HIGH (or '')")
        return numbers

    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def resolved_kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def resolved_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return 64 * -(-int(8 * self.hidden_size / 3) // 64)


@dataclass
class DiffusionConfig:
    mode: str = "set"
    """'set' (two-copy set diffusion) or 'ar_baseline' (one copy, plain causal LM)."""
    order: str = "staggered:8"
    """Order family: ar, mdlm, block:S, block_random:S, staggered:D, random; or a mixture 'staggered:8@0.9,mdlm@0.1'."""
    order_schedule: str = ""
    """An order curriculum 'STEP:ORDER;STEP:ORDER;...' (first STEP 0) used instead of ``order``:
    e.g. '0:ar;1000:staggered:2;3000:staggered:8'. A function of the step, so resume is exact."""
    objective: str = "ordered_ce"
    """'ordered_ce' (singleton-set families), 'set_nelbo' (any family), 'masked_ce' (the reference's MDLM/BD3-LM
    training loss: per sequence, mean cross-entropy over masked tokens), or 'auto' (each family its own)."""
    keep_clean_bos: bool = False
    """Position 0 of every sequence is a set of its own, first in the order, never masked, without loss."""
    schedule: str = "loglinear"
    """Noise schedule for set_nelbo: 'loglinear' or 'staggered:D' (SetDLM's per-position windows)."""
    t_min: float = 1e-3
    """Lower clip of sampled noise levels t (set_nelbo)."""
    t_max: float = 1.0
    """Upper clip of sampled noise levels t (set_nelbo)."""
    antithetic: bool = True
    """Stratify the noise levels of a micro-batch over [t_min, t_max] (set_nelbo)."""
