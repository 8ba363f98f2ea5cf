"""Llama-style set-causal transformer built from megatron-core's tensor-parallel layers.

Pre-norm RMSNorm, SwiGLU, rotary embeddings from per-token position ids, no biases, an
output layer of its own unless tied. Activations run sequence-first, [S, B, H], as in Megatron.

Options for starting from pretrained AR models (Llama 3, Qwen3): grouped-query attention
(``num_kv_heads``; query head i uses K/V head i // (num_heads / num_kv_heads)), a head width
other than hidden / heads (``head_dim``), QK-norm (RMSNorm over head_dim on each head's
queries and keys before rotary, one weight for q and one for k shared by all heads) and an
output layer tied to the embedding (``tie_embeddings``).

Tensor-parallel layout (TP-size invariant: the same seed gives the same global weights
for any TP size, because megatron initializes a CPU master weight and scatters it):
  qkv       (num_kv_heads = num_heads) column-parallel, global rows [Wq; Wk; Wv], stride 3
            -> each rank holds the q, k and v rows of its own heads
  q, kv     (grouped-query attention) q column-parallel; kv, global rows [Wk; Wv], column-
            parallel with stride 2 when the TP size divides num_kv_heads, else replicated on
            every rank, which projects the K/V head its query heads share (megatron-core
            keeps that weight split and all-gathers the projected heads instead)
  attn out  row-parallel
  gate_up   column-parallel, global rows [W_gate; W_up], stride 2
  down      row-parallel
  embedding / output  vocab-parallel; logits stay split over tensor ranks and the loss
            is megatron's vocab-parallel cross-entropy; a tied output multiplies by the
            embedding's own shard
A weight every tensor rank holds whole but applies to its own heads only (the replicated kv,
the QK-norm weights) gets the sum of the ranks' gradients (summed_over_tensor_ranks), so its
copies stay equal.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from model.attention import AttentionBackend, make_backend
from model.config import ModelConfig
from model.dropout import ATTENTION, MLP, BranchDropout
from model.masks import AttentionMeta


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int, mask_row: bool = True) -> int:
    """Real vocabulary (+ [MASK]'s own row), padded so every tensor rank holds an equal slice."""
    multiple = divisible_by * tensor_parallel
    return multiple * math.ceil((vocab_size + mask_row) / multiple)


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


def summed_over_tensor_ranks(tensor: torch.Tensor, tp_group) -> torch.Tensor:
    """``tensor`` unchanged; in the backward pass its gradient is summed over the tensor-parallel
    ranks (megatron's copy-to-region). For a weight every rank holds whole but applies to its own
    heads only: each rank's gradient is then the full one, as in one process."""
    if tp_group is None or tp_group.size() == 1:
        return tensor
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(tensor, group=tp_group)


class RMSNorm(nn.Module):
    """``tp_group``: given for a norm applied to each rank's own heads (QK-norm), whose gradient
    is summed over the tensor ranks."""

    def __init__(self, hidden: int, eps: float, tp_group=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.element_size() < 4 else x  # half precisions normalize in fp32
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * summed_over_tensor_ranks(self.weight, self.tp_group).to(xf.dtype)).to(x.dtype)


def rotary_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """[head_dim / 2] rotary frequencies theta^(-2i/d); with rope_scaling, Llama 3.1's rule:
    wavelengths longer than original / low_freq_factor slow down by the factor, shorter than
    original / high_freq_factor stay, and those between interpolate smoothly."""
    head_dim = cfg.resolved_head_dim()
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    scaling = cfg.llama3_rope_scaling()
    if scaling is None:
        return inv_freq
    factor, low, high, original = scaling
    wavelength = 2 * math.pi / inv_freq
    smooth = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelength < original / high, inv_freq,
                       torch.where(wavelength > original / low, inv_freq / factor, scaled))


def rotary_cos_sin(position_ids: torch.Tensor, cfg: ModelConfig, dtype):
    """cos, sin [B, 1, T, head_dim] for arbitrary per-token positions (rotate-half layout)."""
    inv_freq = rotary_inv_freq(cfg, position_ids.device)
    angles = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class ReplicatedKV(nn.Module):
    """K/V projection when there are fewer K/V heads than tensor ranks: every rank holds the whole
    weight, global rows [Wk; Wv] (drawn like megatron's CPU master weight: the values of the
    column-parallel layer at TP 1), and projects the one head its query heads share. Its
    gradient, and the input's, are summed over the tensor ranks."""

    def __init__(self, hidden: int, kv_heads: int, head_dim: int, head: int, init_method, tp_group, params_dtype):
        super().__init__()
        master = torch.empty(2 * kv_heads * head_dim, hidden, dtype=torch.float)
        init_method(master)
        self.weight = nn.Parameter(master.to(params_dtype))
        self.kv_heads, self.head_dim, self.head, self.tp_group = kv_heads, head_dim, head, tp_group

    def forward(self, x_SBH):
        weight = summed_over_tensor_ranks(self.weight, self.tp_group)
        weight = weight.view(2, self.kv_heads, self.head_dim, -1)[:, self.head].reshape(2 * self.head_dim, -1)
        return F.linear(summed_over_tensor_ranks(x_SBH, self.tp_group), weight), None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mp_config, tp_group, output_init):
        super().__init__()
        from megatron.core import tensor_parallel as tp

        tp_size = tp_group.size()
        self.head_dim = cfg.resolved_head_dim()
        heads, kv_heads = cfg.num_heads, cfg.resolved_kv_heads()
        self.local_heads = heads // tp_size
        self.local_kv_heads = kv_heads // tp_size if kv_heads % tp_size == 0 else 1
        init = lambda w: nn.init.normal_(w, 0.0, cfg.init_std)  # noqa: E731
        column = lambda rows, stride: tp.ColumnParallelLinear(  # noqa: E731
            cfg.hidden_size, rows, config=mp_config, init_method=init, bias=False, gather_output=False,
            stride=stride, tp_group=tp_group)
        self.fused_qkv = kv_heads == heads
        if self.fused_qkv:  # one fused layer, as before grouped-query attention existed
            self.qkv = column(3 * heads * self.head_dim, 3)
        else:
            self.q = column(heads * self.head_dim, 1)
            if kv_heads % tp_size == 0:
                self.kv = column(2 * kv_heads * self.head_dim, 2)
            else:  # fewer K/V heads than ranks: the one this rank's query heads share
                self.kv = ReplicatedKV(cfg.hidden_size, kv_heads, self.head_dim, tp_group.rank() * kv_heads // tp_size,
                                       init, tp_group, mp_config.params_dtype)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, tp_group) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, tp_group) if cfg.qk_norm else None
        self.out = tp.RowParallelLinear(
            heads * self.head_dim, cfg.hidden_size, config=mp_config, init_method=output_init,
            bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def project(self, x_SBH, cos, sin):
        """q [B, heads, S, head_dim] of this rank's query heads, k and v [B, kv_heads, S, head_dim]
        of their K/V heads; QK-norm and rotary applied to q and k."""
        S, B, _ = x_SBH.shape
        if self.fused_qkv:
            qkv, _ = self.qkv(x_SBH)  # [S, B, 3 * local_heads * hd]: [q_local; k_local; v_local]
            qkv = qkv.view(S, B, 3, self.local_heads, self.head_dim).permute(2, 1, 3, 0, 4)
            q_BHSD, k_BHSD, v_BHSD = qkv[0], qkv[1], qkv[2]
        else:
            q, _ = self.q(x_SBH)
            q_BHSD = q.view(S, B, self.local_heads, self.head_dim).permute(1, 2, 0, 3)
            kv, _ = self.kv(x_SBH)  # [S, B, 2 * local_kv_heads * hd]: [k_local; v_local]
            kv = kv.view(S, B, 2, self.local_kv_heads, self.head_dim).permute(2, 1, 3, 0, 4)
            k_BHSD, v_BHSD = kv[0], kv[1]
        if self.q_norm is not None:
            q_BHSD, k_BHSD = self.q_norm(q_BHSD), self.k_norm(k_BHSD)
        return apply_rotary(q_BHSD, cos, sin), apply_rotary(k_BHSD, cos, sin), v_BHSD

    def output(self, o_BHSD):
        """Attention output [B, heads, S, head_dim] -> the residual branch [S, B, H]."""
        B, _, S, _ = o_BHSD.shape
        out, _ = self.out(o_BHSD.permute(2, 0, 1, 3).reshape(S, B, self.local_heads * self.head_dim))
        return out

    def forward(self, x_SBH, cos, sin, backend: AttentionBackend, mask):
        q_BHSD, k_BHSD, v_BHSD = self.project(x_SBH, cos, sin)
        return self.output(backend.attend(q_BHSD, k_BHSD, v_BHSD, mask))


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
    def __init__(self, parts: ModelParts, layer_index: int = 0):
        super().__init__()
        cfg, mp_config, tp_group = parts.cfg, parts.mp_config, parts.parallel.tp_group
        self.layer_index = layer_index  # keys this block's dropout masks
        # residual-branch outputs scaled by 1/sqrt(2 * layers), as in GPT-2 / Megatron
        std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
        output_init = lambda w: nn.init.normal_(w, 0.0, std)  # noqa: E731
        with parts.seeded(1 + layer_index):
            self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            self.attn = Attention(cfg, mp_config, tp_group, output_init)
            self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            self.mlp = SwiGLU(cfg, mp_config, tp_group, output_init)

    def forward(self, x_SBH, cos, sin, backend, mask, dropout: BranchDropout | None = None):
        """``dropout``: the micro-batch's keyed residual-branch dropout (training only), or None."""
        attn_SBH = self.attn(self.attn_norm(x_SBH), cos, sin, backend, mask)
        x_SBH = x_SBH + attn_SBH if dropout is None else dropout.add(x_SBH, attn_SBH, self.layer_index, ATTENTION)
        mlp_SBH = self.mlp(self.mlp_norm(x_SBH))
        return x_SBH + mlp_SBH if dropout is None else dropout.add(x_SBH, mlp_SBH, self.layer_index, MLP)


class Embedding(nn.Module):
    """Vocab-parallel token embedding; [B, T] ids -> [T, B, H]."""

    def __init__(self, parts: ModelParts):
        super().__init__()
        from megatron.core import tensor_parallel as tp

        cfg = parts.cfg
        with parts.seeded(0):
            self.word = tp.VocabParallelEmbedding(
                parts.padded_vocab, cfg.hidden_size, config=parts.mp_config,
                init_method=vocab_rows_init(cfg.vocab_rows(), cfg.init_std), tp_group=parts.parallel.tp_group)

    def forward(self, input_ids):
        return self.word(input_ids).transpose(0, 1).contiguous()


class Head(nn.Module):
    """Final norm and vocab-parallel output; [T, B, H] -> logits [B, L, V/tp].

    Reads the noisy half only in set mode. SUBS parameterization: [MASK] and the padded
    vocabulary rows get logit -inf, so they never receive probability. With tie_embeddings
    the output layer holds no weight: the caller passes the embedding's shard.
    """

    def __init__(self, parts: ModelParts):
        super().__init__()
        from megatron.core import tensor_parallel as tp

        cfg, tp_group = parts.cfg, parts.parallel.tp_group
        self.set_mode = parts.set_mode
        with parts.seeded(1 + cfg.num_layers):
            self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            self.output = tp.ColumnParallelLinear(
                cfg.hidden_size, parts.padded_vocab, config=parts.mp_config,
                init_method=vocab_rows_init(cfg.vocab_rows(), cfg.init_std), bias=False,
                gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings, tp_group=tp_group)
        per_rank = parts.padded_vocab // tp_group.size()
        global_ids = torch.arange(per_rank) + tp_group.rank() * per_rank
        invalid = global_ids >= cfg.vocab_size
        if self.set_mode:  # [MASK] is never a prediction, also when it reuses a token id
            invalid |= global_ids == cfg.mask_id()
        self.register_buffer("invalid_logit", invalid, persistent=False)

    def logits(self, x, weight: torch.Tensor | None = None):
        """Vocab-parallel logits of hidden states [..., H] (any leading shape); ``weight``: the tied
        embedding's shard, or None for the head's own output weight."""
        logits, _ = self.output(self.norm(x), weight=weight)
        return logits.masked_fill(self.invalid_logit, float("-inf"))

    def forward(self, x_SBH, weight: torch.Tensor | None = None):
        if self.set_mode:
            x_SBH = x_SBH[x_SBH.shape[0] // 2:]
        return self.logits(x_SBH, weight).transpose(0, 1).contiguous()


def component_seed(base_seed: int, index: int) -> int:
    """Seed of component ``index`` (0 embedding, 1..N blocks, N+1 head): weights are a pure
    function of (seed, index), the same whichever pipeline stage builds them."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int):
    """Build under ``seed`` without disturbing the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ModelParts:
    """What every layout needs to build the network's components identically: each component
    (Embedding, Block, Head, and their pipeline stages) is built from it under its own seed."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, *, set_mode: bool, init_seed: int,
                 params_dtype: torch.dtype = torch.float32):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model")
        self.cfg, self.parallel, self.set_mode, self.init_seed = cfg, parallel, set_mode, init_seed
        if not -1 <= cfg.mask_token < cfg.vocab_size:
            raise ValueError(f"model.mask_token={cfg.mask_token} is not a token id below model.vocab_size="
                             f"{cfg.vocab_size} (or -1: a [MASK] row of its own)")
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by,
                                              parallel.tp_size, mask_row=cfg.mask_token < 0)
        self.mp_config = _megatron_config(parallel.tp_size, params_dtype)

    def seeded(self, component: int):
        """Build component ``component`` (0 embedding, 1..N blocks, N+1 head) under its own seed,
        whichever layout or pipeline stage builds it (the components call this themselves)."""
        return seeded(component_seed(self.init_seed, component))

    def vocab_parameter_rows(self, embedding_name: str, head_name: str) -> dict[str, int]:
        rows = self.cfg.vocab_rows()  # real ids and [MASK]
        if self.cfg.tie_embeddings:
            return {f"{embedding_name}.word.weight": rows}
        return {f"{embedding_name}.word.weight": rows, f"{head_name}.output.weight": rows}


class SetDiffusionTransformer(nn.Module):
    """forward(input_ids [B,T], position_ids [B,T], meta) -> vocab-parallel logits.

    In set mode (T = 2L) logits are read from the noisy half only: [B, L, V/tp].
    In the AR baseline (T = L) every position gives logits: [B, L, V/tp].
    """

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, *, set_mode: bool = True,
                 init_seed: int = 0, params_dtype: torch.dtype = torch.float32,
                 activation_checkpointing: bool = False):
        super().__init__()
        parts = ModelParts(cfg, parallel, set_mode=set_mode, init_seed=init_seed, params_dtype=params_dtype)
        self.cfg = cfg
        self.set_mode = set_mode
        self.mask_id = cfg.mask_id()
        self.padded_vocab = parts.padded_vocab
        self.activation_checkpointing = activation_checkpointing
        self.embedding = Embedding(parts)
        self.layers = nn.ModuleList(Block(parts, layer_index=i) for i in range(cfg.num_layers))
        self.head = Head(parts)
        self.backend = make_backend(cfg.attention_backend)
        self._vocab_rows = parts.vocab_parameter_rows("embedding", "head")

    def vocab_parameter_rows(self) -> dict[str, int]:
        """Rows of the vocabulary-sized parameters that hold real ids and [MASK]."""
        return dict(self._vocab_rows)

    def output_weight(self) -> torch.Tensor | None:
        """The embedding's weight shard when the output layer is tied to it, else None."""
        return self.embedding.word.weight if self.cfg.tie_embeddings else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits of final hidden states [..., H] (the decoders' head)."""
        return self.head.logits(hidden, self.output_weight())

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: AttentionMeta,
                dropout_key: torch.Tensor | None = None):
        """``dropout_key`` [B]: the collator's per-sequence keys of the dropout masks; needed
        in training mode when model.dropout > 0 (eval mode never drops)."""
        x_SBH = self.embedding(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.cfg, x_SBH.dtype)
        mask = self.backend.prepare(meta)  # built once per batch, shared by every layer
        dropout = branch_dropout(self.cfg, self.training, dropout_key)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x_SBH = torch.utils.checkpoint.checkpoint(layer, x_SBH, cos, sin, self.backend, mask, dropout,
                                                          use_reentrant=False)
            else:
                x_SBH = layer(x_SBH, cos, sin, self.backend, mask, dropout)
        return self.head(x_SBH, self.output_weight())


def branch_dropout(cfg: ModelConfig, training: bool, dropout_key: torch.Tensor | None) -> BranchDropout | None:
    """The keyed residual-branch dropout of one forward, or None (eval mode, or dropout 0)."""
    if not training or cfg.dropout == 0.0:
        return None
    if dropout_key is None:
        raise ValueError(f"model.dropout={cfg.dropout} in training mode needs the batch's dropout_key "
                         "(the collator writes it): masks never come from the global RNG")
    return BranchDropout(cfg.dropout, dropout_key)


def vocab_parallel_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, L] from vocab-parallel logits [B, L, V/tp].

    Like megatron's kernel it works in place on fp32 logits to save memory: pass a clone
    if the logits are needed afterwards.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float().contiguous(), targets)
