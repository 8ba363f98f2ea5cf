"""setdiff-eval MODEL [MODEL ...] --curve OUT_PREFIX --judge JUDGE: the speed-quality curve.

For every model, every --window (staggered decoding; other orders decode with their own window)
and every --tau, unconditional samples are decoded and scored by the judge (judge.decode_and_score,
the path of --judge). OUT_PREFIX.csv gets one row per setting; OUT_PREFIX.png plots generative
perplexity and mean unigram entropy against tokens per forward, one line per model and window,
labelled by the model's directory name, decode order and window, its points in --tau order.
Tokens per forward and tokens/s count generated tokens only, never the prompt (the EOS each
sample starts from).
"""
from __future__ import annotations

import csv
import importlib.util
import itertools
import pathlib

import torch

COLUMNS = ("model", "order", "window", "tau", "tokens_per_forward", "tokens_per_s", "generative_perplexity",
           "unigram_entropy_mean", "samples_below_entropy_4", "samples", "new_tokens", "judge_tokens")
PLOTS = (("generative_perplexity", "generative perplexity (judge)"),
         ("unigram_entropy_mean", "mean unigram entropy (nats)"))


def output_paths(prefix: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """OUT_PREFIX.csv and OUT_PREFIX.png (a prefix's own dots stay: runs/v1.2 -> runs/v1.2.csv)."""
    prefix = pathlib.Path(prefix)
    return prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".png")


def check_curve_inputs(model_dirs: list[pathlib.Path], prefix: pathlib.Path) -> None:
    """Every model directory, the output folder and matplotlib, before any decoding starts."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--curve draws with matplotlib, which this Python lacks: it is in the eval extra "
                         "(make env, or pip install -e '.[eval]')")
    for model_dir in model_dirs:
        if not (pathlib.Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"model directory {model_dir}: no config.json (a setdiff-convert directory)")
    folder = pathlib.Path(prefix).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"--curve {prefix}: the folder {folder} does not exist")


@torch.no_grad()
def curve_rows(model_dirs: list[pathlib.Path], judge, judge_tokenizer, *, taus: list[float],
               windows: list[int | None], samples: int, new_tokens: int, temperature: float, top_p: float,
               repetition_penalty: float = 1.0, seed: int = 0) -> list[dict]:
    """One row per (model, window, tau): the judge's generative perplexity of the samples, their
    mean unigram entropy and the decoding's speed. Windows apply to staggered models only."""
    from pretrain.inference.judge import decode_and_score, load_sampler
    from pretrain.inference.sample import decode_config, decoding_window

    rows = []
    for model_dir in model_dirs:
        model, fields, tokenizer, eos_id = load_sampler(model_dir)
        own = decode_config(fields, model.cfg.seq_len, 1, False)  # the model's own decode order
        swept = windows if own.order.startswith("staggered:") else [None]
        for window, tau in itertools.product(swept, taus):
            cfg = decode_config(fields, model.cfg.seq_len, 1, infill=False, window=window, tau=tau,
                                temperature=temperature, top_p=top_p, max_new_tokens=new_tokens,
                                repetition_penalty=repetition_penalty, set_mode=model.set_mode)
            scored = decode_and_score(model, tokenizer, eos_id, cfg, judge, judge_tokenizer, samples, seed)
            rows.append({"model": str(model_dir), "order": cfg.order, "window": decoding_window(cfg), "tau": tau,
                         "new_tokens": new_tokens, **{k: v for k, v in scored.items() if k in COLUMNS}})
    return rows


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in COLUMNS} for row in rows)


def line_label(row: dict) -> str:
    window = f", window {row['window']}" if row["window"] is not None else ""
    return f"{pathlib.Path(row['model']).name} ({row['order']}{window})"


def draw_curve(rows: list[dict]):
    """The figure (Agg canvas, never a display): one line per (model, window) in each panel,
    through its rows' (tokens_per_forward, value) points in row order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    lines = {}
    for row in rows:
        lines.setdefault((row["model"], row["window"]), []).append(row)
    for axes, (column, title) in zip(figure.subplots(1, 2), PLOTS):
        for points in lines.values():
            axes.plot([p["tokens_per_forward"] for p in points], [p[column] for p in points], marker="o",
                      label=line_label(points[0]))
            for p in points:
                axes.annotate(f"tau {p['tau']:g}", (p["tokens_per_forward"], p[column]), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
        axes.set_xlabel("tokens per forward (generated tokens only)")
        axes.set_ylabel(title)
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    return figure


def write_curve(rows: list[dict], prefix: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    csv_path, png_path = output_paths(prefix)
    write_csv(rows, csv_path)
    draw_curve(rows).savefig(png_path)
    return csv_path, png_path


def speed_quality_curve(model_dirs: list[pathlib.Path], prefix: pathlib.Path, judge_dir: pathlib.Path,
                        gguf_file: str | None = None, **decoding) -> dict:
    """The sweep of ``curve_rows`` under the judge at ``judge_dir``, written to OUT_PREFIX.csv/.png."""
    from pretrain.inference.judge import load_judge

    check_curve_inputs(model_dirs, prefix)
    judge, judge_tokenizer = load_judge(judge_dir, gguf_file)
    rows = curve_rows(model_dirs, judge, judge_tokenizer, **decoding)
    csv_path, png_path = write_curve(rows, prefix)
    return {"judge": str(judge_dir), "csv": str(csv_path), "png": str(png_path), "rows": rows}
