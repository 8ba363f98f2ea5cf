"""Llama-style set-causal transformer built from megatron-core's tensor-parallel layers.

Pre-norm RMSNorm, SwiGLU, rotary embeddings from per-token position ids, no biases, an
untied output layer. Activations run sequence-first, [S, B, H], as in Megatron.

Tensor-parallel layout (TP-size invariant: the same seed gives the same global weights
for any TP size, because megatron initializes a CPU master weight and scatters it):
  qkv       column-parallel, global rows [Wq; Wk; Wv], stride 3 -> each rank holds
            the q, k and v rows of its own heads
  attn out  row-parallel
  gate_up   column-parallel, global rows [W_gate; W_up], stride 2
  down      row-parallel
  embedding / output  vocab-parallel; logits stay split over tensor ranks and the loss
            is megatron's vocab-parallel cross-entropy
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_compat
from model.attention import AttentionBackend, make_backend
from model.config import ModelConfig
from model.masks import AttentionMeta


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Real vocabulary + [MASK], padded so every tensor rank holds an equal slice."""
    multiple = divisible_by * tensor_parallel
    return multiple * math.ceil((vocab_size + 1) / multiple)


@dataclass
class ParallelContext:
    """Process groups the model needs, passed explicitly (no global get_args())."""

    tp_group: object
    """Tensor-parallel process group."""

    @property
    def tp_size(self) -> int:
        return self.tp_group.size()

    @property
    def tp_rank(self) -> int:
        return self.tp_group.rank()


def _megatron_config(tp_size: int, params_dtype: torch.dtype):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,  # TP-invariant init, and the only init that runs on CPU
        perform_initialization=True,
        params_dtype=params_dtype,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def vocab_rows_init(real_rows: int, std: float):
    """Normal init of the first ``real_rows`` rows, zeros for the padding rows.

    The padding depends on the tensor-parallel size; drawing only the real rows keeps the
    random stream, and so every weight, identical for every TP size.
    """

    def init(weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight.zero_()
            weight[:real_rows].normal_(0.0, std)
        return weight

    return init


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.element_size() < 4 else x  # half precisions normalize in fp32
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos, sin [B, 1, T, head_dim] for arbitrary per-token positions (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mp_config, tp_group, output_init):
        super().__init__()
        from megatron.core import tensor_parallel as tp

        tp_size = tp_group.size()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.local_heads = cfg.num_heads // tp_size
        init = nn.init.normal_
        self.qkv = tp.ColumnParallelLinear(
            cfg.hidden_size, 3 * cfg.hidden_size, config=mp_config,
            init_method=lambda w: init(w, 0.0, cfg.init_std), bias=False, gather_output=False,
            stride=3, tp_group=tp_group)
        self.out = tp.RowParallelLinear(
            cfg.hidden_size, cfg.hidden_size, config=mp_config, init_method=output_init,
            bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x_SBH, cos, sin, backend: AttentionBackend, mask):
        S, B, _ = x_SBH.shape
        qkv, _ = self.qkv(x_SBH)  # [S, B, 3 * local_heads * hd]: [q_local; k_local; v_local]
        qkv = qkv.view(S, B, 3, self.local_heads, self.head_dim).permute(2, 1, 3, 0, 4)
        q_BHSD, k_BHSD, v_BHSD = qkv[0], qkv[1], qkv[2]
        q_BHSD = apply_rotary(q_BHSD, cos, sin)
        k_BHSD = apply_rotary(k_BHSD, cos, sin)
        o_BHSD = backend.attend(q_BHSD, k_BHSD, v_BHSD, mask)
        o_SBH = o_BHSD.permute(2, 0, 1, 3).reshape(S, B, self.local_heads * self.head_dim)
        out, _ = self.out(o_SBH)
        return out


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, mp_config, tp_group, output_init):
        super().__init__()
        from megatron.core import tensor_parallel as tp

        ffn = cfg.resolved_ffn_hidden_size()
        if ffn % tp_group.size():
            raise ValueError(f"model.ffn_hidden_size={ffn} is not divisible by the tensor-parallel "
                             f"size {tp_group.size()}")
        self.gate_up = tp.ColumnParallelLinear(
            cfg.hidden_size, 2 * ffn, config=mp_config,
            init_method=lambda w: nn.init.normal_(w, 0.0, cfg.init_std), bias=False,
            gather_output=False, stride=2, tp_group=tp_group)
        self.down = tp.RowParallelLinear(
            ffn, cfg.hidden_size, config=mp_config, init_method=output_init, bias=False,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x_SBH):
        gate_up, _ = self.gate_up(x_SBH)
        gate, up = gate_up.chunk(2, dim=-1)
        out, _ = self.down(F.silu(gate) * up)
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mp_config, tp_group):
        super().__init__()
        # residual-branch outputs scaled by 1/sqrt(2 * layers), as in GPT-2 / Megatron
        std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
        output_init = lambda w: nn.init.normal_(w, 0.0, std)  # noqa: E731
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, mp_config, tp_group, output_init)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, mp_config, tp_group, output_init)

    def forward(self, x_SBH, cos, sin, backend, mask):
        x_SBH = x_SBH + self.attn(self.attn_norm(x_SBH), cos, sin, backend, mask)
        return x_SBH + self.mlp(self.mlp_norm(x_SBH))


class SetDiffusionTransformer(nn.Module):
    """forward(input_ids [B,T], position_ids [B,T], meta) -> vocab-parallel logits.

    In set mode (T = 2L) logits are read from the noisy half only: [B, L, V/tp].
    In the AR baseline (T = L) every position gives logits: [B, L, V/tp].
    """

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, *, set_mode: bool = True,
                 params_dtype: torch.dtype = torch.float32):
        super().__init__()
        cpu_compat.apply()
        from megatron.core import tensor_parallel as tp

        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.set_mode = set_mode
        self.tp_size = parallel.tp_size
        self.mask_id = cfg.vocab_size
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by,
                                              parallel.tp_size)
        mp_config = _megatron_config(parallel.tp_size, params_dtype)
        vocab_init = vocab_rows_init(cfg.vocab_size + 1, cfg.init_std)  # real ids and [MASK]
        self.embedding = tp.VocabParallelEmbedding(
            self.padded_vocab, cfg.hidden_size, config=mp_config, init_method=vocab_init,
            tp_group=parallel.tp_group)
        self.layers = nn.ModuleList(Block(cfg, mp_config, parallel.tp_group) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = tp.ColumnParallelLinear(
            cfg.hidden_size, self.padded_vocab, config=mp_config, init_method=vocab_init, bias=False,
            gather_output=False, tp_group=parallel.tp_group)
        self.backend = make_backend(cfg.attention_backend)
        # SUBS parameterization: [MASK] and the padded vocabulary rows never get probability.
        per_rank = self.padded_vocab // parallel.tp_size
        global_ids = torch.arange(per_rank) + parallel.tp_rank * per_rank
        self.register_buffer("invalid_logit", global_ids >= cfg.vocab_size, persistent=False)

    def vocab_parameter_rows(self) -> dict[str, int]:
        """Rows of the vocabulary-sized parameters that hold real ids and [MASK]."""
        return {"embedding.weight": self.cfg.vocab_size + 1, "output.weight": self.cfg.vocab_size + 1}

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: AttentionMeta):
        B, T = input_ids.shape
        x_SBH = self.embedding(input_ids).transpose(0, 1)
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        cos, sin = rotary_cos_sin(position_ids, head_dim, self.cfg.rope_theta, x_SBH.dtype)
        mask = self.backend.prepare(meta)  # built once per batch, shared by every layer
        for layer in self.layers:
            x_SBH = layer(x_SBH, cos, sin, self.backend, mask)
        if self.set_mode:
            x_SBH = x_SBH[T // 2:]  # logits from the noisy half only
        logits, _ = self.output(self.final_norm(x_SBH))
        logits = logits.masked_fill(self.invalid_logit, float("-inf"))
        return logits.transpose(0, 1).contiguous()  # [B, L, V/tp]


def vocab_parallel_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, L] from vocab-parallel logits [B, L, V/tp].

    Like megatron's kernel it works in place on fp32 logits to save memory: pass a clone
    if the logits are needed afterwards.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float().contiguous(), targets)
