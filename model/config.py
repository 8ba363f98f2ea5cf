"""The network's and the diffusion's configs: one dataclass per component.

Every field carries a one-line docstring (the string literal under it). The run configuration
that holds them with the data, parallel and training settings, and loads them from YAML, is
pretrain/config.py.

``DiffusionConfig`` is the one description of the diffusion setup: it checks itself
(``validate``), the collator takes it as it is, ``setdiff-convert`` stores it whole in
config.json (``setdiff.diffusion``), and every tool that scores a converted model rebuilds the
training collator from that (``from_dict``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from model.noise import parse_schedule
from model.orders import parse_order_mixture, parse_order_schedule, schedule_families, schedule_orders


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

    def validate(self) -> "DiffusionConfig":
        """Raise ValueError naming the field (diffusion.NAME) for anything that cannot train; returns self."""
        if self.mode not in MODES:
            raise ValueError(f"diffusion.mode must be 'set' or 'ar_baseline', got {self.mode!r}")
        try:
            parse_order_mixture(self.order)
        except ValueError as err:
            raise ValueError(f"diffusion.order={self.order!r}: {err}") from None
        if self.order_schedule:
            try:
                self.phases()
            except ValueError as err:
                raise ValueError(f"diffusion.order_schedule={self.order_schedule!r}: {err}") from None
        if self.objective not in OBJECTIVES:
            raise ValueError(f"diffusion.objective must be 'ordered_ce', 'set_nelbo', 'masked_ce' or 'auto', "
                             f"got {self.objective!r}")
        if self.mode == "set" and self.objective == "ordered_ce" and not all(f.singleton for f in self.families()):
            which = (f"diffusion.order_schedule={self.order_schedule!r}" if self.order_schedule
                     else f"diffusion.order={self.order!r}")
            raise ValueError(f"diffusion.objective='ordered_ce' needs singleton sets, but {which} has larger sets; "
                             "use objective='set_nelbo' or 'auto'")
        try:
            parse_schedule(self.schedule)
        except ValueError:
            raise ValueError(f"diffusion.schedule must be 'loglinear' or 'staggered:D', "
                             f"got {self.schedule!r}") from None
        if not 0.0 < self.t_min <= self.t_max <= 1.0:
            raise ValueError(f"need 0 < diffusion.t_min <= diffusion.t_max <= 1, got t_min={self.t_min}, "
                             f"t_max={self.t_max}")
        return self

    def phases(self) -> list:
        """[(first step, [(OrderFamily, probability)])]: the order curriculum, or ``order`` from step 0."""
        if self.order_schedule:
            return parse_order_schedule(self.order_schedule)
        return [(0, parse_order_mixture(self.order))]

    def families(self) -> list:
        """Every OrderFamily the collator draws, once, in order of first appearance (batches' family ids)."""
        return schedule_families(self.phases())

    def final_order(self) -> str:
        """The order the model ends training with: ``order``, or the last phase of the curriculum."""
        return schedule_orders(self.order_schedule)[-1][1] if self.order_schedule else self.order

    def for_evaluation(self) -> "DiffusionConfig":
        """The setup validation and setdiff-eval score with: a likelihood bound whatever the training
        loss. masked_ce is a surrogate (no NELBO weights), so its models are scored on the NELBO
        ('auto': ordered_ce, exact, for singleton families and set_nelbo for the others)."""
        return dataclasses.replace(self, objective="auto" if self.objective == "masked_ce" else self.objective)

    def with_order(self, order: str) -> "DiffusionConfig":
        """The same setup under another order family (or mixture), curriculum dropped."""
        return dataclasses.replace(self, order=order, order_schedule="").validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict, where: str = "diffusion") -> "DiffusionConfig":
        """A DiffusionConfig from a dict of its fields (setdiff.diffusion of a converted config.json);
        an unknown key or a field of the wrong type is an error naming ``where``."""
        if not isinstance(fields, dict):
            raise ValueError(f"{where} must be a mapping of the diffusion fields, got {type(fields).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(known)})")
        defaults = cls()
        for name, value in fields.items():
            default = getattr(defaults, name)
            ok = (isinstance(value, bool) if isinstance(default, bool)
                  else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
                  else isinstance(value, type(default)))
            if not ok:
                raise ValueError(f"{where}.{name}={value!r} is not a {type(default).__name__}")
        try:
            return cls(**{k: float(v) if isinstance(getattr(defaults, k), float) else v
                          for k, v in fields.items()}).validate()
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


MODES = ("set", "ar_baseline")
OBJECTIVES = ("ordered_ce", "set_nelbo", "masked_ce", "auto")
