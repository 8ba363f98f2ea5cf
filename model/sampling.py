"""Batch decoding of set diffusion models with a KV cache (SET_DIFFUSION.md §4).

Every row is a *canvas*: given tokens (clean context) and [MASK] positions to decode.
Generation is a canvas of prompt + max_new_tokens masks; infilling is a canvas with masked
spans between given text. Each step:

1. the active window of a row = its still-masked positions whose order key is below the
   smallest still-masked key + w (key = position for left-to-right windows, the rank in a
   sampled staggered order for any-order decoding, the block index for block decoding);
2. one forward over [tokens decoded last step (clean) ; active masked tokens] (the first
   step's clean tokens are the given ones, which is the prefill);
3. every active token whose top probability >= tau is unmasked, and at least the most
   confident one; tokens are argmax (temperature 0) or sampled with temperature and top-p.

``use_cache=False`` recomputes each step from scratch as a two-copy set-order sequence
(model/sampling_reference.py): it gives the same logits, and is the reference for tests
and the slow side of ``setdiff-bench decode``.

AR-baseline models (one-copy causal, logits at j predict j + 1) decode with
``generate_ar``, the standard KV-cached loop with the same batching and stops.

The bookkeeping (canvases, windows, token choice) runs on the CPU; the cache and the
forwards run on the model's device, and only each step's active logits come back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from model.kv_cache import KVCache, cached_forward
from model.orders import parse_order, staggered_hitting_times
from model.sampling_reference import ar_recompute_logits, pack_positions, recompute_logits
from model.transformer import SetDiffusionTransformer

DECODE_ORDERS = "ar, block:S, mdlm or staggered:D"


@dataclass
class DecodeConfig:
    order: str = "staggered:4"
    """ar (w = 1), block:S (the k-th masked position of a row is in block k // S; one block a
    window, its tokens one set), mdlm (all masked positions one window and one set) or
    staggered:D (a sliding window of w singleton sets)."""
    window: int | None = None
    """Width w of a staggered window; None takes D. ar, block and mdlm fix their own window."""
    any_order: bool = False
    """staggered:D only: the window follows a staggered order over each row's masked positions,
    drawn from the generator passed in (SET_DIFFUSION.md §1), instead of positions."""
    tau: float = 1.0
    """Unmask every active token whose top probability is >= tau (and always the most confident)."""
    temperature: float = 0.0
    """0: greedy argmax; > 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sample only inside the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = 32
    """Masked positions appended to each prompt (generation only)."""
    eos_id: int | None = None
    """A row stops once every position up to its first decoded EOS is decoded; None: no EOS stop."""
    use_cache: bool = True
    """False: recompute every step from scratch (the reference)."""
    record_logits: bool = False
    """Keep each step's active positions and logits in DecodeResult.trace (for tests)."""

    def validate(self) -> None:
        family = parse_order(self.order)  # raises on an unknown family
        if family.name not in ("ar", "block", "mdlm", "staggered"):
            raise ValueError(f"order {self.order!r} cannot decode: use {DECODE_ORDERS}")
        if self.window is not None and (family.name != "staggered" or self.window < 1):
            raise ValueError(f"window={self.window} needs order staggered:D and a value >= 1 "
                             f"(order {self.order!r} fixes its own window)")
        if self.any_order and family.name != "staggered":
            raise ValueError(f"any_order needs order staggered:D, got {self.order!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau={self.tau} must be in (0, 1]")
        if self.temperature < 0.0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


@dataclass
class DecodeStats:
    forwards: int = 0
    """Batched model forwards (the prefill included: it is the first step's forward)."""
    row_forwards: list[int] = field(default_factory=list)
    """Forwards in which each row still had tokens to decode."""
    row_tokens: list[int] = field(default_factory=list)
    """Tokens each row decoded (up to and including its first EOS)."""
    seconds: float = 0.0

    @property
    def tokens_decoded(self) -> int:
        return sum(self.row_tokens)

    @property
    def tokens_per_forward(self) -> float:
        """The parallelism factor: decoded tokens per forward a row took part in."""
        return self.tokens_decoded / max(1, sum(self.row_forwards))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_decoded / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "tokens_decoded": self.tokens_decoded,
                "tokens_per_forward": self.tokens_per_forward, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s, "row_forwards": list(self.row_forwards),
                "row_tokens": list(self.row_tokens)}


@dataclass
class StepTrace:
    positions: torch.Tensor
    """[B, A] active positions of the step (padded)."""
    valid: torch.Tensor
    """[B, A] which of them are real."""
    logits: torch.Tensor
    """[B, A, V_padded] logits of the active tokens."""


@dataclass
class DecodeResult:
    sequences: list[list[int]]
    """Each row's canvas after decoding (given + decoded tokens), cut after its first EOS."""
    generated: list[list[int]]
    """Each row's decoded tokens in position order, cut after its first EOS."""
    stats: DecodeStats
    trace: list[StepTrace] = field(default_factory=list)


@dataclass
class _Window:
    key_BL: torch.Tensor
    """Order key of each position (inf for given ones); the window is keyed on it."""
    width: float
    share_set: bool
    """True when the active tokens form one set and attend each other (block, mdlm)."""


def choose_tokens(logits_BAV: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, A], confidence [B, A]); confidence is the top probability of
    softmax(logits), whatever the temperature, so tau means the same for greedy and sampling."""
    probs = torch.softmax(logits_BAV.float(), dim=-1)
    confidence, greedy = probs.max(dim=-1)
    if temperature == 0.0:
        return greedy, confidence
    return sample_top_p(logits_BAV, temperature, top_p, generator), confidence


def sample_top_p(logits_BAV: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Sample from softmax(logits / temperature) restricted to the top-p nucleus."""
    probs = torch.softmax(logits_BAV.float() / temperature, dim=-1)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    # keep a token while the mass before it is below top_p: the top token always stays
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    flat = sorted_probs.reshape(-1, sorted_probs.shape[-1])
    picks = torch.multinomial(flat, 1, generator=generator).view(sorted_probs.shape[:-1])
    return sorted_ids.gather(-1, picks[..., None])[..., 0]


def prompt_canvases(prompts: Sequence[Sequence[int]], max_new_tokens: int, mask_id: int) -> list[list[int]]:
    return [list(p) + [mask_id] * max_new_tokens for p in prompts]


def _pad_canvases(canvases: Sequence[Sequence[int]], mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not canvases:
        raise ValueError("nothing to decode: no rows given")
    lengths = torch.tensor([len(c) for c in canvases])
    canvas_BL = torch.zeros(len(canvases), int(lengths.max()), dtype=torch.long)
    for b, row in enumerate(canvases):
        if not any(t != mask_id for t in row):
            raise ValueError(f"row {b} has no given token: decoding needs at least one token of context")
        canvas_BL[b, :len(row)] = torch.tensor(list(row), dtype=torch.long)
    return canvas_BL, lengths


def _window(cfg: DecodeConfig, to_decode_BL: torch.Tensor, generator: torch.Generator | None) -> _Window:
    family = parse_order(cfg.order)
    B, L = to_decode_BL.shape
    pos_BL = torch.arange(L, dtype=torch.float64).expand(B, L)
    gen_index_BL = (to_decode_BL.cumsum(dim=1) - 1).double()  # k-th masked position of the row
    if family.name == "ar":
        key, width, share = pos_BL, 1.0, False
    elif family.name == "block":
        key, width, share = torch.div(gen_index_BL, family.size, rounding_mode="floor"), 1.0, True
    elif family.name == "mdlm":
        key, width, share = torch.zeros(B, L, dtype=torch.float64), 1.0, True
    elif cfg.any_order:
        key = torch.zeros(B, L, dtype=torch.float64)
        for b in range(B):
            count = int(to_decode_BL[b].sum())
            if count >= 2:  # later hitting time = earlier in the order (SET_DIFFUSION.md §1)
                times = staggered_hitting_times(count, family.size, generator)
                rank = torch.empty(count, dtype=torch.float64)
                rank[torch.sort(-times, stable=True).indices] = torch.arange(count, dtype=torch.float64)
                key[b, to_decode_BL[b]] = rank
        width, share = float(cfg.window or family.size), False
    else:
        key, width, share = pos_BL, float(cfg.window or family.size), False
    return _Window(key.masked_fill(~to_decode_BL, float("inf")), width, share)


@torch.no_grad()
def decode_canvases(model: SetDiffusionTransformer, canvases: Sequence[Sequence[int]], cfg: DecodeConfig,
                    generator: torch.Generator | None = None) -> DecodeResult:
    """Decode every [MASK] (model.mask_id) of each row; given tokens never change."""
    if not model.set_mode:
        raise ValueError("decode_canvases needs a set-mode model; AR-baseline models use generate_ar")
    cfg.validate()
    start = time.perf_counter()
    mask_id = model.mask_id
    canvas_BL, row_len_B = _pad_canvases(canvases, mask_id)
    B, L = canvas_BL.shape
    pos_L = torch.arange(L)
    inside_BL = pos_L[None, :] < row_len_B[:, None]
    to_decode_BL = (canvas_BL == mask_id) & inside_BL
    given_BL = inside_BL & ~to_decode_BL
    given_tokens = canvas_BL[given_BL].clone()
    window = _window(cfg, to_decode_BL, generator)
    decoded_BL = torch.zeros_like(to_decode_BL)
    last_pos_B = row_len_B - 1  # positions after a row's first EOS are never decoded
    # clean tokens not yet in the cache: the given ones first (the prefill), in position order
    pending_BL = given_BL.clone()
    entry_rank_BL = torch.full((B, L), L, dtype=torch.long)  # order in which tokens became clean
    entered_B = torch.zeros(B, dtype=torch.long)
    cache = KVCache.for_model(model, B, int(row_len_B.max())) if cfg.use_cache else None
    row_forwards_B = torch.zeros(B, dtype=torch.long)
    forwards, trace = 0, []
    while True:
        masked_BL = to_decode_BL & ~decoded_BL & (pos_L[None, :] <= last_pos_B[:, None])
        if not bool(masked_BL.any()):
            break
        first_key_B = window.key_BL.masked_fill(~masked_BL, float("inf")).min(dim=1).values
        active_BL = masked_BL & (window.key_BL < first_key_B[:, None] + window.width)
        live_B = active_BL.any(dim=1)
        pending_BL &= live_B[:, None]
        # the pending tokens become clean now, in position order
        order_BL = entered_B[:, None] + pending_BL.long().cumsum(dim=1) - 1
        entry_rank_BL = torch.where(pending_BL, order_BL, entry_rank_BL)
        entered_B += pending_BL.sum(dim=1)
        active_pos_BA, active_count_B = pack_positions(active_BL)
        if cache is not None:
            clean_pos_BN, clean_count_B = pack_positions(pending_BL)
            hidden_BSH = cached_forward(model, cache, canvas_BL.gather(1, clean_pos_BN), clean_pos_BN,
                                        clean_count_B, active_pos_BA, active_count_B, window.share_set)
            logits_BAV = model.head.logits(hidden_BSH[:, clean_pos_BN.shape[1]:]).float().cpu()
        else:
            logits_BAV = recompute_logits(model, canvas_BL, entry_rank_BL, active_pos_BA, active_count_B,
                                          window.share_set)
        pending_BL = torch.zeros_like(pending_BL)
        forwards += 1
        active_valid_BA = torch.arange(active_pos_BA.shape[1])[None, :] < active_count_B[:, None]
        if cfg.record_logits:
            trace.append(StepTrace(active_pos_BA.clone(), active_valid_BA, logits_BAV.clone()))

        tokens_BA, confidence_BA = choose_tokens(logits_BAV, cfg.temperature, cfg.top_p, generator)
        confidence_BA = confidence_BA.masked_fill(~active_valid_BA, -1.0)
        unmask_BA = active_valid_BA & (confidence_BA >= cfg.tau)
        most_confident_B = confidence_BA.argmax(dim=1)
        unmask_BA[torch.arange(B), most_confident_B] |= live_B
        rows, slots = unmask_BA.nonzero(as_tuple=True)
        cols = active_pos_BA[rows, slots]
        canvas_BL[rows, cols] = tokens_BA[rows, slots]
        decoded_BL[rows, cols] = True
        pending_BL[rows, cols] = True
        row_forwards_B += live_B
        if cfg.eos_id is not None:
            eos_BL = decoded_BL & (canvas_BL == cfg.eos_id)
            first_eos_B = torch.where(eos_BL, pos_L[None, :], L).min(dim=1).values
            last_pos_B = torch.minimum(last_pos_B, first_eos_B)

    assert torch.equal(canvas_BL[given_BL], given_tokens), "a given token changed during decoding"
    kept_BL = pos_L[None, :] <= last_pos_B[:, None]
    assert bool((decoded_BL | ~to_decode_BL | ~kept_BL).all()), "a position before the stop was left masked"
    sequences = [canvas_BL[b, kept_BL[b] & inside_BL[b]].tolist() for b in range(B)]
    generated = [canvas_BL[b, kept_BL[b] & to_decode_BL[b]].tolist() for b in range(B)]
    stats = DecodeStats(forwards, row_forwards_B.tolist(), [len(g) for g in generated],
                        time.perf_counter() - start)
    return DecodeResult(sequences, generated, stats, trace)


def generate(model: SetDiffusionTransformer, prompts: Sequence[Sequence[int]], cfg: DecodeConfig,
             generator: torch.Generator | None = None) -> DecodeResult:
    """Continue each prompt by up to cfg.max_new_tokens tokens (set-mode or AR-baseline model)."""
    if not model.set_mode:
        return generate_ar(model, prompts, cfg, generator)
    for b, prompt in enumerate(prompts):
        if model.mask_id in prompt:
            raise ValueError(f"prompt {b} holds the [MASK] id {model.mask_id}: use infill for masked spans")
    return decode_canvases(model, prompt_canvases(prompts, cfg.max_new_tokens, model.mask_id), cfg, generator)


@torch.no_grad()
def generate_ar(model: SetDiffusionTransformer, prompts: Sequence[Sequence[int]], cfg: DecodeConfig,
                generator: torch.Generator | None = None) -> DecodeResult:
    """AR-baseline model (one copy, logits at j predict j + 1): one token per row and step.
    Only temperature, top_p, max_new_tokens, eos_id, use_cache and record_logits apply."""
    if model.set_mode:
        raise ValueError("generate_ar needs an AR-baseline model (set_mode=False)")
    cfg.validate()
    start = time.perf_counter()
    canvas_BL, row_len_B = _pad_canvases(prompt_canvases(prompts, cfg.max_new_tokens, model.mask_id),
                                         model.mask_id)
    B, L = canvas_BL.shape
    known_B = row_len_B - cfg.max_new_tokens  # tokens of each row so far: the prompt
    pos_L = torch.arange(L)
    pending_BL = pos_L[None, :] < known_B[:, None]  # the prefill: the whole prompt
    done_B = torch.zeros(B, dtype=torch.bool)
    cache = KVCache.for_model(model, B, L) if cfg.use_cache else None
    row_forwards_B = torch.zeros(B, dtype=torch.long)
    forwards, trace = 0, []
    while not bool(done_B.all()):
        live_B = ~done_B
        if cache is not None:
            clean_pos_BN, clean_count_B = pack_positions(pending_BL & live_B[:, None])
            none_BA = torch.zeros(B, 0, dtype=torch.long)
            hidden_BSH = cached_forward(model, cache, canvas_BL.gather(1, clean_pos_BN), clean_pos_BN,
                                        clean_count_B, none_BA, torch.zeros(B, dtype=torch.long))
            last_B = (clean_count_B - 1).clamp(min=0).to(hidden_BSH.device)
            rows_B = torch.arange(B, device=hidden_BSH.device)
            logits_BAV = model.head.logits(hidden_BSH[rows_B, last_B][:, None]).float().cpu()
        else:
            logits_BAV = ar_recompute_logits(model, canvas_BL, known_B)
        forwards += 1
        row_forwards_B += live_B
        if cfg.record_logits:
            trace.append(StepTrace(known_B[:, None].clone(), live_B[:, None].clone(), logits_BAV.clone()))
        tokens_B = choose_tokens(logits_BAV, cfg.temperature, cfg.top_p, generator)[0][:, 0]
        rows = live_B.nonzero(as_tuple=True)[0]
        canvas_BL[rows, known_B[rows]] = tokens_B[rows]
        pending_BL = torch.zeros_like(pending_BL)
        pending_BL[rows, known_B[rows]] = True
        known_B = known_B + live_B
        stop_B = known_B >= row_len_B
        if cfg.eos_id is not None:
            stop_B |= tokens_B == cfg.eos_id
        done_B |= live_B & stop_B

    sequences = [canvas_BL[b, :int(known_B[b])].tolist() for b in range(B)]
    generated = [seq[len(p):] for seq, p in zip(sequences, prompts)]
    stats = DecodeStats(forwards, row_forwards_B.tolist(), [len(g) for g in generated],
                        time.perf_counter() - start)
    return DecodeResult(sequences, generated, stats, trace)
