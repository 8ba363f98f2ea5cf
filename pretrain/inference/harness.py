"""A set diffusion model in EleutherAI's lm-evaluation-harness: the ``setdiff`` model.

    lm_eval --model setdiff --model_args pretrained=hf/demo_cpu,tau=0.9 --tasks hellaswag

``lm_eval`` finds this class through the start-up hook the package installs
(lm_eval_hook.py). ``setdiff-lm-eval`` is lm_eval's own command line with this model
registered and expected failures printed as one line; from Python, ``import
pretrain.inference.harness`` then ``lm_eval.simple_evaluate(model="setdiff", ...)``. It needs
the ``eval`` extra.

- ``loglikelihood``: the context is clean context (the first sets, never masked, no loss) and the
  continuation is scored by the model's bound under its order family: the exact log-likelihood
  of that order for singleton-set families (``ar``: the AR factorization, as a causal LM scores),
  the NELBO for block and mdlm families; averaged over ``orders`` sampled orders (and noise).
  ``is_greedy``: every continuation token is the argmax of its prediction (the first order).
- ``loglikelihood_rolling``: the harness's disjoint rolling windows of the model's seq_len, each
  scored as above and summed.
- ``generate_until``: the KV-cached sampler (greedy unless the task asks for a temperature) with
  the model args ``tau``, ``window`` and ``order`` (default: the model's decoding family), cut at
  the first ``until`` string; decoding stops at EOS.

Model args: pretrained (a setdiff-convert directory), tau, window, order, orders, seed, device,
batch_size. Another name stops with it named.
"""
from __future__ import annotations

import pathlib
import sys

import lm_eval.models  # noqa: F401  (the harness's own models first: an empty registry is filled only then)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from data_pipeline.collator import SetDiffusionCollator
from model.objectives import forward_step, sequence_nll
from model.sampling import generate
from pretrain.cli_errors import EXPECTED, error_line
from pretrain.inference.convert import model_diffusion
from pretrain.inference.sample import decode_config, load_model

MODEL_ARGS = ("pretrained", "tau", "window", "order", "orders", "seed", "device", "batch_size", "max_batch_size")


def _number(name: str, value, kind, low):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"setdiff model arg {name}={value!r} is not a {kind.__name__}") from None
    if number < low:
        raise ValueError(f"setdiff model arg {name}={value!r} must be at least {low}")
    return number


def _plain_lm_eval_command() -> bool:
    """Whether this process is lm_eval's own command line (`lm_eval`, `lm-eval`, `python -m lm_eval`)."""
    program = pathlib.Path(sys.argv[0] if sys.argv else "")
    return program.name in ("lm_eval", "lm-eval") or program.parts[-2:] == ("lm_eval", "__main__.py")


class SetDiffusionLM(TemplateLM):
    """A setdiff-convert directory as an lm_eval model (module docstring)."""

    def __init__(self, pretrained: str | None = None, **args):
        super().__init__()
        try:
            self._setup(pretrained, args)
        except EXPECTED as err:
            if not _plain_lm_eval_command():
                raise  # a library caller (and setdiff-lm-eval) handles it
            # lm_eval's own command line would print a traceback: one line, as setdiff-lm-eval does
            print(error_line("lm_eval", err), file=sys.stderr)
            raise SystemExit(2) from None

    def _setup(self, pretrained: str | None, args: dict) -> None:
        unknown = sorted(set(args) - set(MODEL_ARGS))
        if unknown:
            raise ValueError(f"setdiff: unknown model arg {', '.join(unknown)} (known: {', '.join(MODEL_ARGS)})")
        if not pretrained:
            raise ValueError("setdiff: model arg pretrained=DIR (a setdiff-convert directory) is required")
        self.model_dir = pathlib.Path(pretrained)
        device = str(args.get("device") or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():  # lm_eval's default is cuda:0
            print(f"setdiff-lm-eval: no CUDA device here: running on the CPU, not {device}", file=sys.stderr)
            device = "cpu"
        self.model, self.fields, self.tokenizer, eos_id = load_model(self.model_dir, device)
        if eos_id is None:
            raise ValueError(f"setdiff: {self.model_dir / 'generation_config.json'} names no eos_token_id")
        self.eos_id, self.seq_len = int(eos_id), self.model.cfg.seq_len
        self.tau = float(_number("tau", args.get("tau", 0.9), float, 0.0))
        self.window = None if args.get("window") is None else _number("window", args["window"], int, 1)
        self.order = args.get("order")
        self.orders = _number("orders", args.get("orders", 1), int, 1)
        self.seed = _number("seed", args.get("seed", 0), int, 0)
        batch = args.get("batch_size", 8)
        self.batch_size = 8 if str(batch).startswith("auto") else _number("batch_size", batch, int, 1)
        self.set_mode = self.model.set_mode
        diffusion = model_diffusion(self.fields, str(self.model_dir / "config.json"))  # the training collator's
        if self.order is not None:
            diffusion = diffusion.with_order(self.order)
        diffusion = diffusion.for_evaluation()
        self.score_order = diffusion.order
        self.collate = [SetDiffusionCollator(diffusion, self.model.mask_id, seed=self.seed + k)
                        for k in range(self.orders)]

    # --- what TemplateLM asks of a model -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    @property
    def max_length(self) -> int:
        return self.seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = []
        for start in range(0, len(pairs), self.batch_size):
            results += self.score(pairs[start:start + self.batch_size])
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.seq_len - 1,
                context_len=1)]
            scores = [self.score(windows[start:start + self.batch_size])
                      for start in range(0, len(windows), self.batch_size)]
            totals.append(sum(logprob for batch in scores for logprob, _ in batch))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            for request, text in zip(batch, self.generate_batch([r.args for r in batch])):
                self.cache_hook.add_partial("generate_until", request.args, text)
                outputs.append(text)
        return outputs

    # --- scoring and decoding ---------------------------------------------------------------

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood bound of the continuation given the context, is greedy) per pair,
        each sequence (context + continuation)[-seq_len:] with at least one context token."""
        L, B = self.seq_len, len(pairs)
        tokens = torch.full((B, L), self.eos_id, dtype=torch.long)
        doc = torch.full((B, L), -1, dtype=torch.long)
        context = torch.zeros(B, L, dtype=torch.bool)
        for b, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError("setdiff: a loglikelihood request with an empty continuation")
            n_cont = min(len(cont), L - 1)
            seq = (list(ctx) + list(cont))[-L:]
            tokens[b, :len(seq)] = torch.tensor(seq)
            doc[b, :len(seq)] = 0
            context[b, :len(seq) - n_cont] = True
        device = next(self.model.parameters()).device
        nll, greedy = torch.zeros(B, dtype=torch.float64), None
        for collate in self.collate:
            batch = {k: v.to(device) for k, v in collate(tokens, doc, step=0, context=context).items()}
            logits, loss_fn = forward_step(batch, self.model, self.set_mode)
            weight = batch["loss_weight"]
            if greedy is None:
                greedy = ((logits.argmax(-1) == batch["targets"]) | (weight == 0)).all(dim=1).cpu()
            _, token_ce = loss_fn(logits)
            nll += sequence_nll(batch, token_ce).cpu()
        nll /= len(self.collate)
        return [(-float(nll[b]), bool(greedy[b])) for b in range(B)]

    def generate_batch(self, args: list[tuple[str, dict]]) -> list[str]:
        """Completions of (context, gen_kwargs) requests, decoded together with the batch's
        largest max_gen_toks and cut at each request's own ``until`` strings."""
        kwargs = [dict(gen or {}) for _, gen in args]
        max_new = max(min(int(k.get("max_gen_toks", 256)), self.seq_len - 1) for k in kwargs)
        temperature = max(float(k.get("temperature", 0.0)) if k.get("do_sample") else 0.0 for k in kwargs)
        prompts = [self.tok_encode(context)[-(self.seq_len - max_new):] or [self.eos_id] for context, _ in args]
        cfg = decode_config(self.fields, self.seq_len, max(map(len, prompts)), False, order=self.order,
                            window=self.window, tau=self.tau, temperature=temperature, max_new_tokens=max_new,
                            set_mode=self.set_mode)
        cfg.eos_id = self.eos_id
        result = generate(self.model, prompts, cfg, torch.Generator().manual_seed(self.seed))
        texts = []
        for row, k in zip(result.generated, kwargs):
            cap = min(int(k.get("max_gen_toks", 256)), self.seq_len - 1)
            text = self.tok_decode([t for t in row[:cap] if t != self.eos_id])
            until = k.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop:
                    text = text.split(stop, 1)[0]
            texts.append(text)
        return texts


# Registered by the importable module only: under ``python -m`` this file also runs as __main__,
# whose class is not the one lm_eval_hook's placeholder names.
if __name__ != "__main__":
    register_model("setdiff")(SetDiffusionLM)


def main(argv=None) -> int:
    """lm_eval's command line with the ``setdiff`` model registered; an expected failure (a
    model arg, a model directory) is one line naming it, exit 2."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["setdiff-lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except EXPECTED as err:
        print(error_line("setdiff-lm-eval", err), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from pretrain.inference import harness

    sys.exit(harness.main())
