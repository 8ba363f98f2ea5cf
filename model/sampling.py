"""Batch decoding of set diffusion models with a KV cache (SET_DIFFUSION.md §4).

Every row is a *canvas*: given tokens (clean context) and [MASK] positions to decode.
Generation is a canvas of prompt + max_new_tokens masks; infilling is a canvas with masked
spans between given text. Each step runs one forward over

    [ tokens that became clean since the last step ; the active noisy tokens ]

and unmasks every active token whose confidence >= tau, and at least the most confident.

Singleton-set families (staggered:D, ar, block_random:S): the active tokens are the
still-masked positions whose order key is below the smallest still-masked key + w (key =
position, the block for block_random, or the rank in a sampled staggered order for
any-order decoding); each is a set of its own, so a token joins the clean cache the step
after it is decoded. The given tokens are the first step's
clean tokens (the prefill), in position order.

Families with larger sets (block:S, mdlm) decode as they train: the canvas is partitioned
into blocks of S positions aligned at position 0 (mdlm: one set holding everything). The
active tokens are every position of the first block that still has a masked position,
given and already-decoded ones included (they stay in the noisy half with their ids, seen
by the rest of the set through noisy-noisy attention); the blocks before it are clean
context (block-causal among themselves). A block enters the cache in one piece, in the
forward after its last token is decoded: several forwards per block, one cache update.

Past the trained length (``model.cfg.seq_len``) the cache is cropped on the left so that
cache + the step's tokens fit in it, as the reference does; the step's new clean tokens
and the active ones then see only that window.

Confidence: greedy takes the argmax; sampling applies temperature, keeps the top-p
nucleus and renormalizes it, and draws from it. ``confidence="sampled"`` (the reference's
rule, the default) is the chosen token's probability under that renormalized distribution
(the top probability when greedy); ``"max"`` is the top probability of softmax(logits).

``use_cache=False`` recomputes each step from scratch (model/sampling_reference.py): it
gives the same logits, and is the slow side of ``setdiff-bench decode``.

AR-baseline models (one-copy causal, logits at j predict j + 1) decode in the same loop with
order ``ar``: each step's forward holds the new clean tokens only and the last one's logits
predict the active position (the standard KV-cached loop, with the same batching and stops).

The bookkeeping (canvases, windows, token choice) runs on the CPU; the cache and the
forwards run on the model's device, and only each step's active logits come back.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from model.kv_cache import KVCache, cached_forward
from model.orders import parse_order, sample_set_rank
from model.sampling_reference import ar_recompute_logits, pack_positions, recompute_logits
from model.transformer import SetDiffusionTransformer

DECODE_ORDERS = "ar, block:S, block_random:S, mdlm or staggered:D"


@dataclass
class DecodeConfig:
    order: str = "staggered:4"
    """ar (w = 1), block:S (blocks of S positions aligned at position 0, each one set, decoded
    left to right), block_random:S (the same blocks, each a window of singleton sets decoded in
    any order), mdlm (the whole canvas one set) or staggered:D (a sliding window of w singleton
    sets)."""
    window: int | None = None
    """Width w of a staggered window; None takes D. ar, block and mdlm fix their own window."""
    any_order: bool = False
    """staggered:D only: the window follows a staggered order over each row's masked positions,
    drawn from the generator passed in (SET_DIFFUSION.md §1), instead of positions."""
    tau: float = 1.0
    """Unmask every active token whose confidence is >= tau (and always the most confident)."""
    confidence: str = "sampled"
    """'sampled': the chosen token's probability under the temperature- and top-p-renormalized
    distribution (the reference's rule); 'max': the top probability of softmax(logits)."""
    temperature: float = 0.0
    """0: greedy argmax; > 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sample only inside the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = 1.0
    """> 1 penalizes every token already in the row (given or decoded), as transformers'
    RepetitionPenaltyLogitsProcessor: a logit l becomes l / p if l > 0, else l * p."""
    max_new_tokens: int = 32
    """Masked positions appended to each prompt (generation only)."""
    eos_id: int | None = None
    """A row stops once every position up to its first decoded EOS is decoded; None: no EOS stop."""
    use_cache: bool = True
    """False: recompute every step from scratch (the reference)."""
    record_logits: bool = False
    """Keep each step's canvas, active positions and logits in DecodeResult.trace (for tests)."""

    def validate(self) -> None:
        family = parse_order(self.order)  # raises on an unknown family
        if family.name not in ("ar", "block", "block_random", "mdlm", "staggered"):
            raise ValueError(f"order {self.order!r} cannot decode: use {DECODE_ORDERS}")
        if self.window is not None and (family.name != "staggered" or self.window < 1):
            raise ValueError(f"window={self.window} needs order staggered:D and a value >= 1 "
                             f"(order {self.order!r} fixes its own window)")
        if self.any_order and family.name != "staggered":
            raise ValueError(f"any_order needs order staggered:D, got {self.order!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau={self.tau} must be in (0, 1]")
        if self.confidence not in ("sampled", "max"):
            raise ValueError(f"confidence={self.confidence!r} must be 'sampled' or 'max'")
        if self.temperature < 0.0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
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
    canvas: torch.Tensor
    """[B, L] every row's canvas before the step ([MASK] where not decoded yet)."""
    entered: torch.Tensor
    """[B, L] the positions that joined the clean cache (or clean half) in this step."""
    positions: torch.Tensor
    """[B, A] active positions of the step (padded)."""
    valid: torch.Tensor
    """[B, A] which of them are still masked and may be decoded in this step."""
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
class _Family:
    """What the decoding family decides, and nothing else: which positions a step may commit
    (its active tokens) and which clean tokens enter the cache with it."""

    key_BL: torch.Tensor
    """Order key of each position (inf for given ones); the window is keyed on it."""
    width: float
    """Keys below the smallest still-masked key + width are active (singleton sets)."""
    block_BL: torch.Tensor | None = None
    """Set families (block, mdlm): the set each position belongs to; None for singleton sets."""

    @property
    def shares_sets(self) -> bool:
        return self.block_BL is not None

    def step(self, state: "_Canvas", masked_BL: torch.Tensor, live_B: torch.Tensor,
             pending_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(active positions, clean positions entering the cache) of the next forward."""
        first_key_B = self.key_BL.masked_fill(~masked_BL, float("inf")).min(dim=1).values
        if self.shares_sets:  # the first block with a masked position is one set, given tokens included
            active_BL = state.inside_BL & (self.key_BL == first_key_B[:, None]) & live_B[:, None]
            pending_BL = (state.inside_BL & (self.key_BL < first_key_B[:, None]) & live_B[:, None]
                          & (state.entry_rank_BL >= state.pos_L.numel()))
            return active_BL, pending_BL
        active_BL = masked_BL & (self.key_BL < first_key_B[:, None] + self.width)
        return active_BL, pending_BL & live_B[:, None]

    def decoded(self, pending_BL: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The clean positions pending after a step decoded (rows, cols): a decoded singleton set
        joins the cache in the next forward; a set joins once all of it is decoded (``step``)."""
        if self.shares_sets:
            return pending_BL
        pending_BL = torch.zeros_like(pending_BL)
        pending_BL[rows, cols] = True
        return pending_BL


def repetition_penalty(logits_BAV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on every active token of a row:
    a seen token's logit l becomes l / penalty if l > 0, else l * penalty."""
    if penalty == 1.0:
        return logits_BAV
    scaled = torch.where(logits_BAV > 0, logits_BAV / penalty, logits_BAV * penalty)
    return torch.where(seen_BV[:, None, :], scaled, logits_BAV)


def choose_tokens(logits_BAV: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None, confidence: str = "sampled"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, A], confidence [B, A]) under DecodeConfig's rules (module docstring)."""
    probs = torch.softmax(logits_BAV.float() / (temperature or 1.0), dim=-1)
    nucleus = nucleus_probs(probs, top_p)
    if temperature == 0.0:
        tokens = nucleus.argmax(dim=-1)
    else:
        flat = nucleus.reshape(-1, nucleus.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator).view(nucleus.shape[:-1])
    if confidence == "max":
        return tokens, torch.softmax(logits_BAV.float(), dim=-1).max(dim=-1).values
    return tokens, nucleus.gather(-1, tokens[..., None])[..., 0]


def nucleus_probs(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs restricted to the top-p nucleus (the most probable tokens whose mass first reaches
    top_p; the top token always stays) and renormalized."""
    if top_p >= 1.0:
        return probs
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    kept = torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs.masked_fill(outside, 0.0))
    return kept / kept.sum(dim=-1, keepdim=True)


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of a sample's token frequencies: the reference rejects samples < 4."""
    counts = Counter(tokens)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


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


def decoding_family(cfg: DecodeConfig, to_decode_BL: torch.Tensor, generator: torch.Generator | None) -> _Family:
    family = parse_order(cfg.order)
    B, L = to_decode_BL.shape
    pos_BL = torch.arange(L).expand(B, L)
    if family.name in ("block", "mdlm"):
        block_BL = pos_BL // family.size if family.name == "block" else torch.zeros(B, L, dtype=torch.long)
        return _Family(block_BL.double(), 1.0, block_BL)
    if family.name == "ar":
        key, width = pos_BL.double(), 1.0
    elif family.name == "block_random":  # one block a window; its tokens are singleton sets
        key, width = (pos_BL // family.size).double(), 1.0
    elif cfg.any_order:  # each row's masked positions in a staggered order of their own (model/orders.py)
        key = torch.zeros(B, L, dtype=torch.float64)
        for b in range(B):
            count = int(to_decode_BL[b].sum())
            if count >= 2:
                key[b, to_decode_BL[b]] = sample_set_rank(family, count, generator).double()
        width = float(cfg.window or family.size)
    else:
        key, width = pos_BL.double(), float(cfg.window or family.size)
    return _Family(key.masked_fill(~to_decode_BL, float("inf")), width)


class _Canvas:
    """The decoding state of a batch of rows: tokens, what is decoded, what is clean.

    Clean tokens are numbered in the order they became clean (entry rank); each carries its
    set index (its entry rank for singleton sets, its block for block/mdlm decoding) and the
    oldest entry rank it could see when computed (its window start; > 0 only once the cache
    was cropped to fit the trained length).
    """

    def __init__(self, canvases: Sequence[Sequence[int]], mask_id: int, max_len: int):
        self.tokens_BL, self.row_len_B = _pad_canvases(canvases, mask_id)
        B, L = self.tokens_BL.shape
        self.mask_id, self.max_len, self.pos_L = mask_id, max_len, torch.arange(L)
        self.inside_BL = self.pos_L[None, :] < self.row_len_B[:, None]
        self.to_decode_BL = (self.tokens_BL == mask_id) & self.inside_BL
        self.given_BL = self.inside_BL & ~self.to_decode_BL
        self.decoded_BL = torch.zeros_like(self.to_decode_BL)
        self.last_pos_B = self.row_len_B - 1  # positions after a row's first EOS are never decoded
        self.entry_rank_BL = torch.full((B, L), L, dtype=torch.long)
        self.clean_set_BL = torch.zeros(B, L, dtype=torch.long)
        self.window_start_BL = torch.zeros(B, L, dtype=torch.long)
        self.entered_B = torch.zeros(B, dtype=torch.long)
        self.window_start_B = torch.zeros(B, dtype=torch.long)

    def masked(self) -> torch.Tensor:
        return self.to_decode_BL & ~self.decoded_BL & (self.pos_L[None, :] <= self.last_pos_B[:, None])

    def enter(self, pending_BL: torch.Tensor, active_count_B: torch.Tensor, set_BL: torch.Tensor | None
              ) -> torch.Tensor:
        """Make the pending positions clean, in position order; returns how many of each row's
        oldest entries must leave the window (the cache) so the step fits in max_len."""
        count_B = pending_BL.sum(dim=1)
        need_B = self.entered_B - self.window_start_B + count_B + active_count_B
        drop_B = (need_B - self.max_len).clamp(min=0)
        too_long = (self.window_start_B + drop_B > self.entered_B).nonzero(as_tuple=True)[0]
        if too_long.numel():
            b = int(too_long[0])
            raise ValueError(f"row {b}: one decoding step needs {int(count_B[b])} new clean + "
                             f"{int(active_count_B[b])} active tokens, more than the model's seq_len "
                             f"{self.max_len}; shorten the prompt or the window")
        self.window_start_B += drop_B
        rank_BL = self.entered_B[:, None] + pending_BL.long().cumsum(dim=1) - 1
        self.entry_rank_BL = torch.where(pending_BL, rank_BL, self.entry_rank_BL)
        self.clean_set_BL = torch.where(pending_BL, rank_BL if set_BL is None else set_BL, self.clean_set_BL)
        self.window_start_BL = torch.where(pending_BL, self.window_start_B[:, None], self.window_start_BL)
        self.entered_B += count_B
        return drop_B

    def seen_tokens(self, vocab: int) -> torch.Tensor:
        """[B, vocab] which ids each row holds so far (given or decoded)."""
        known_BL = self.inside_BL & (self.tokens_BL != self.mask_id)
        seen_BV = torch.zeros(self.tokens_BL.shape[0], vocab, dtype=torch.bool)
        rows, cols = known_BL.nonzero(as_tuple=True)
        seen_BV[rows, self.tokens_BL[rows, cols]] = True
        return seen_BV


@torch.no_grad()
def decode_canvases(model: SetDiffusionTransformer, canvases: Sequence[Sequence[int]], cfg: DecodeConfig,
                    generator: torch.Generator | None = None) -> DecodeResult:
    """Decode every [MASK] (model.mask_id) of each row; given tokens never change. One loop for
    every family and both model kinds: the family (``decoding_family``) decides which positions a
    step may commit, the model kind how their logits are computed (``_step_logits``)."""
    cfg.validate()
    if not model.set_mode:  # an AR-baseline model decodes left to right, one token a step, whatever the order
        cfg = dataclasses.replace(cfg, order="ar", window=None, any_order=False)
    start = time.perf_counter()
    state = _Canvas(canvases, model.mask_id, model.cfg.seq_len)
    B, L = state.tokens_BL.shape
    _check_canvases(model, cfg, state)
    given_tokens = state.tokens_BL[state.given_BL].clone()
    family = decoding_family(cfg, state.to_decode_BL, generator)
    # clean tokens not yet in the cache: for singleton sets the given ones first (the prefill)
    pending_BL = state.given_BL.clone() if not family.shares_sets else torch.zeros_like(state.given_BL)
    capacity = min(int(state.row_len_B.max()), state.max_len)
    cache = KVCache.for_model(model, B, capacity) if cfg.use_cache else None
    row_forwards_B = torch.zeros(B, dtype=torch.long)
    forwards, trace = 0, []
    while True:
        masked_BL = state.masked()
        live_B = masked_BL.any(dim=1)
        if not bool(live_B.any()):
            break
        active_BL, pending_BL = family.step(state, masked_BL, live_B, pending_BL)
        active_pos_BA, active_count_B = pack_positions(active_BL)
        # an AR-baseline forward holds the clean tokens only: its last one predicts the active position
        step_tokens_B = active_count_B if model.set_mode else torch.zeros_like(active_count_B)
        drop_B = state.enter(pending_BL, step_tokens_B, family.block_BL)
        logits_BAV = _step_logits(model, cache, state, pending_BL, active_pos_BA, active_count_B, drop_B,
                                  family.shares_sets)
        forwards += 1
        slot_A = torch.arange(active_pos_BA.shape[1])
        candidate_BA = (slot_A[None, :] < active_count_B[:, None]) & masked_BL.gather(1, active_pos_BA)
        if cfg.record_logits:
            trace.append(StepTrace(state.tokens_BL.clone(), pending_BL.clone(), active_pos_BA.clone(),
                                   candidate_BA, logits_BAV.clone()))

        if cfg.repetition_penalty != 1.0:  # the [B, V] table of seen ids is built only when used
            logits_BAV = repetition_penalty(logits_BAV, state.seen_tokens(logits_BAV.shape[-1]),
                                            cfg.repetition_penalty)
        tokens_BA, confidence_BA = choose_tokens(logits_BAV, cfg.temperature, cfg.top_p, generator, cfg.confidence)
        confidence_BA = confidence_BA.masked_fill(~candidate_BA, -1.0)
        unmask_BA = candidate_BA & (confidence_BA >= cfg.tau)
        unmask_BA[torch.arange(B), confidence_BA.argmax(dim=1)] |= live_B
        rows, slots = unmask_BA.nonzero(as_tuple=True)
        cols = active_pos_BA[rows, slots]
        state.tokens_BL[rows, cols] = tokens_BA[rows, slots]
        state.decoded_BL[rows, cols] = True
        pending_BL = family.decoded(pending_BL, rows, cols)
        row_forwards_B += live_B
        if cfg.eos_id is not None:
            eos_BL = state.decoded_BL & (state.tokens_BL == cfg.eos_id)
            first_eos_B = torch.where(eos_BL, state.pos_L[None, :], L).min(dim=1).values
            state.last_pos_B = torch.minimum(state.last_pos_B, first_eos_B)

    canvas_BL, to_decode_BL, inside_BL = state.tokens_BL, state.to_decode_BL, state.inside_BL
    assert torch.equal(canvas_BL[state.given_BL], given_tokens), "a given token changed during decoding"
    kept_BL = state.pos_L[None, :] <= state.last_pos_B[:, None]
    assert bool((state.decoded_BL | ~to_decode_BL | ~kept_BL).all()), "a position before the stop was left masked"
    sequences = [canvas_BL[b, kept_BL[b] & inside_BL[b]].tolist() for b in range(B)]
    generated = [canvas_BL[b, kept_BL[b] & to_decode_BL[b]].tolist() for b in range(B)]
    stats = DecodeStats(forwards, row_forwards_B.tolist(), [len(g) for g in generated],
                        time.perf_counter() - start)
    return DecodeResult(sequences, generated, stats, trace)


def _check_canvases(model: SetDiffusionTransformer, cfg: DecodeConfig, state: "_Canvas") -> None:
    """What a model kind cannot decode, named before any forward."""
    family = parse_order(cfg.order)
    longest = int(state.row_len_B.max())
    if not model.set_mode:
        after_mask_BL = state.to_decode_BL.long().cumsum(dim=1) > 0
        if bool((after_mask_BL & state.given_BL).any()):
            raise ValueError("an AR-baseline model sees no right context: its masked positions must end each row "
                             "(infilling needs a set-mode model)")
        if longest > state.max_len:  # its cache is not cropped: it was trained on one window of seq_len
            raise ValueError(f"AR-baseline decoding stays within the model's seq_len {state.max_len}: a row of "
                             f"{longest} tokens (prompt + new) is longer")
    elif family.name == "mdlm" and longest > state.max_len:
        raise ValueError(f"mdlm decodes a canvas as one set: {longest} tokens exceed the model's seq_len "
                         f"{state.max_len}")


def _step_logits(model: SetDiffusionTransformer, cache: KVCache | None, state: "_Canvas", pending_BL: torch.Tensor,
                 active_pos_BA: torch.Tensor, active_count_B: torch.Tensor, drop_B: torch.Tensor,
                 shares_sets: bool) -> torch.Tensor:
    """[B, A, V_padded] logits of a step's active positions: the active tokens in the noisy half
    (set mode), or the last clean token's prediction of the next position (AR baseline); from the
    KV cache, or recomputed from scratch (model/sampling_reference.py) without one."""
    if cache is None:
        if not model.set_mode:
            return ar_recompute_logits(model, state.tokens_BL, state.entered_B)
        return recompute_logits(model, state.tokens_BL, state.entry_rank_BL, state.clean_set_BL,
                                state.window_start_BL, state.window_start_B, active_pos_BA, active_count_B,
                                shares_sets)
    cache.crop_left(drop_B)
    clean_pos_BN, clean_count_B = pack_positions(pending_BL)
    clean_ids_BN = state.tokens_BL.gather(1, clean_pos_BN)
    if not model.set_mode:
        none_BA = torch.zeros(active_pos_BA.shape[0], 0, dtype=torch.long)
        hidden_BSH = cached_forward(model, cache, clean_ids_BN, clean_pos_BN, clean_count_B, none_BA,
                                    0 * clean_count_B)
        last_B = (clean_count_B - 1).clamp(min=0).to(hidden_BSH.device)
        rows_B = torch.arange(hidden_BSH.shape[0], device=hidden_BSH.device)
        return model.logits(hidden_BSH[rows_B, last_B][:, None]).float().cpu()
    hidden_BSH = cached_forward(model, cache, clean_ids_BN, clean_pos_BN, clean_count_B, active_pos_BA,
                                active_count_B, shares_sets, clean_set_BN=state.clean_set_BL.gather(1, clean_pos_BN),
                                masked_ids_BA=state.tokens_BL.gather(1, active_pos_BA))
    return model.logits(hidden_BSH[:, clean_pos_BN.shape[1]:]).float().cpu()


def generate(model: SetDiffusionTransformer, prompts: Sequence[Sequence[int]], cfg: DecodeConfig,
             generator: torch.Generator | None = None) -> DecodeResult:
    """Continue each prompt by up to cfg.max_new_tokens tokens (set-mode or AR-baseline model)."""
    for b, prompt in enumerate(prompts):
        if model.mask_id in prompt:
            raise ValueError(f"prompt {b} holds the [MASK] id {model.mask_id}: use infill for masked spans")
    return decode_canvases(model, prompt_canvases(prompts, cfg.max_new_tokens, model.mask_id), cfg, generator)
