"""setdiff-study --config configs/study_cpu.yaml --out study/: the paper's comparisons at small
scale, in one command.

Every family of the study config is trained from the same recipe, on the same data, for the
same steps and tokens, once per seed (``runs/<family>-s<seed>``, a plain setdiff-pretrain run
resumed with ``--resume auto``), converted with its EMA weights (``models/``) and evaluated
(``eval/``): the likelihood bound on the validation split, averaged over sampled orders.
With a ``curve`` section, the SetDLM and BD3-LM models (seed 0) decode unconditional samples
over a sweep of tau (and window) scored by a judge, by default the study's own AR baseline
(``curve.csv``, ``curve.png``); with an ``infill`` section they fill masked spans of held-out
text (pretrain/inference/infill.py). ``REPORT.md`` gathers the tables, the loss curves
(``loss_curves.png``, from each run's TensorBoard scalars) and one line per claim of the paper
saying whether this run agrees, from its numbers.

With a ``slurm`` section the runs are Slurm jobs submitted side by side through
launchers/slurm.sbatch (pretrain/study_slurm.py); ``--no-wait`` submits and returns, and the same
command run again waits for those jobs and goes on.

Resumable at every stage: a run whose result.json has the study's steps is not trained again,
a model or an evaluation already written is not redone, and a killed run continues from its
last checkpoint. Deleting one run's folder redoes that run and what is computed from it. A run
folder made with other settings (``study_run.json`` records them) is an error naming it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import subprocess
import sys

import yaml

from pretrain.cli_errors import EXPECTED, error_line, read_json
from pretrain.config import check_run_name, load_config

# the paper's likelihood claim, as family kinds in increasing perplexity: AR < SetDLM < BD3-LM < MDLM
CLAIM_ORDER = ("ar", "setdlm", "bd3lm", "mdlm")


@dataclasses.dataclass
class Study:
    recipe: str
    """The training recipe every run starts from (configs/*.yaml)."""
    data: str
    """The prepared corpus every run trains and is evaluated on."""
    steps: int
    """Optimizer steps of every run."""
    families: dict
    """name -> {kind: ar|setdlm|bd3lm|mdlm, overrides: [section.key=value, ...]}."""
    seeds: list = dataclasses.field(default_factory=lambda: [0])
    """One run per seed and family (train.seed)."""
    overrides: list = dataclasses.field(default_factory=list)
    """Overrides of the recipe shared by every run (before each family's own)."""
    eval_orders: int = 4
    """Sampled orders per validation sequence of the likelihood bound."""
    eval_batches: int = 16
    """Validation micro-batches of the likelihood bound."""
    infill: dict = dataclasses.field(default_factory=dict)
    """Infilling of the SetDLM and BD3-LM families (seed 0) on validation text: {spans: [4, 8, 16],
    sequences: N, tau: 0.9} (pretrain/inference/infill.py); empty: not measured."""
    slurm: dict = dataclasses.field(default_factory=dict)
    """Train the runs as Slurm jobs through launchers/slurm.sbatch: {sbatch: [extra sbatch arguments],
    poll: seconds between squeue checks, script: another sbatch script} (pretrain/study_slurm.py);
    empty: one after another on this machine."""
    curve: dict = dataclasses.field(default_factory=dict)
    """The speed-quality curve of the SetDLM and BD3-LM families (seed 0): {judge: a family whose converted
    model scores the samples (the AR baseline: a causal LM of the same data) or a transformers directory,
    taus: [...], windows: [...], samples: N, new_tokens: M}; empty: not measured."""


def load_study(path: pathlib.Path) -> Study:
    """The study config, every run's recipe + overrides validated, errors naming the key or family."""
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:  # a YAML tag included: safe_load builds plain data only
        raise ValueError(f"{path}: not plain YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("study"), dict):
        raise ValueError(f"{path}: needs a top-level 'study' mapping")
    fields = {f.name for f in dataclasses.fields(Study)}
    unknown = sorted(set(raw["study"]) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown study key {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    try:
        study = Study(**raw["study"])
    except TypeError as err:
        raise ValueError(f"{path}: {err}") from None
    if not isinstance(study.families, dict) or not study.families:
        raise ValueError(f"{path}: study.families must map names to {{kind, overrides}}")
    curve_keys = {"judge", "taus", "windows", "samples", "new_tokens"}
    if study.curve and (set(study.curve) - curve_keys or "judge" not in study.curve):
        raise ValueError(f"{path}: study.curve needs 'judge' and takes {', '.join(sorted(curve_keys))}; got "
                         f"{', '.join(sorted(study.curve))}")
    if set(study.infill) - {"spans", "sequences", "tau"}:
        raise ValueError(f"{path}: study.infill takes spans, sequences and tau; got {', '.join(sorted(study.infill))}")
    if study.slurm:
        from pretrain.study_slurm import check

        check(study.slurm, str(path))
    for name, family in study.families.items():
        try:  # runs/<family>-s<seed> and eval/<family>-s<seed>.json stay inside --out
            check_run_name(f"{name}", f"study.families.{name}")
        except ValueError as err:
            raise ValueError(f"{path}: {err}".replace("config: ", "")) from None
        if not isinstance(family, dict) or family.get("kind") not in CLAIM_ORDER:
            raise ValueError(f"{path}: study.families.{name}.kind must be one of {', '.join(CLAIM_ORDER)}")
        for seed in study.seeds:
            load_config(study.recipe, run_overrides(study, name, seed, pathlib.Path("study")))
    return study


def run_name(family: str, seed: int) -> str:
    return f"{family}-s{seed}"


def run_overrides(study: Study, family: str, seed: int, out: pathlib.Path) -> list[str]:
    return [f"data.path={study.data}", f"out_dir={out / 'runs'}", f"name={run_name(family, seed)}",
            f"train.steps={study.steps}", f"train.seed={seed}", *study.overrides,
            *study.families[family].get("overrides", [])]


def finished(study: Study, out: pathlib.Path, name: str) -> bool:
    """The run's result.json has the study's steps and no stop before them."""
    result = read_json(out / "runs" / name / "result.json") if (out / "runs" / name / "result.json").is_file() else {}
    return result.get("steps") == study.steps and not result.get("stopped")


def unfinished_run(study: Study, out: pathlib.Path, family: str, seed: int) -> list[str] | None:
    """The overrides of a run still to train, its folder made ready (its settings recorded, what
    was computed from an earlier state of it removed); None when it is finished."""
    name = run_name(family, seed)
    run_dir, overrides = out / "runs" / name, run_overrides(study, family, seed, out)
    record = {"recipe": study.recipe, "overrides": overrides}
    if (run_dir / "study_run.json").is_file() and read_json(run_dir / "study_run.json") != record:
        raise ValueError(f"{run_dir} was trained with other settings than {record['overrides']} "
                         f"(see its study_run.json): delete it to train it again")
    if finished(study, out, name):
        return None
    shutil.rmtree(out / "models" / name, ignore_errors=True)  # computed from the old run
    for stale in (out / "eval" / f"{name}.json", out / "eval" / f"{name}.infill.json", out / "curve.csv"):
        stale.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "study_run.json").write_text(json.dumps(record, indent=2))
    return overrides


def train_here(study: Study, out: pathlib.Path, name: str, overrides: list[str]) -> None:
    """Train (or finish) one run in a child process of this machine, its output in logs/<run>.log."""
    (out / "logs").mkdir(exist_ok=True)
    print(f"study: training {name}", flush=True)
    with open(out / "logs" / f"{name}.log", "a") as log:
        proc = subprocess.run([sys.executable, "-m", "pretrain.cli", "--config", study.recipe, *overrides,
                               "--resume", "auto"], stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"study: run {name} failed (exit {proc.returncode}); see {out / 'logs' / f'{name}.log'}")


def train_runs(study: Study, out: pathlib.Path, wait: bool = True) -> bool:
    """Every unfinished run trained, one after another here or side by side as Slurm jobs
    (study.slurm); False when they were left to Slurm without waiting (``wait=False``)."""
    runs = {}
    for family in study.families:
        for seed in study.seeds:
            overrides = unfinished_run(study, out, family, seed)
            if overrides is not None:
                runs[run_name(family, seed)] = overrides
    if runs and study.slurm:
        from pretrain import study_slurm

        study_slurm.train_all(study.slurm, out, study.recipe, runs, wait, lambda name: finished(study, out, name))
        return wait
    for name, overrides in runs.items():
        train_here(study, out, name, overrides)
    return True


def quiet(out: pathlib.Path, tag: str):
    """Third-party output of an in-process stage (library warnings) into logs/<tag>.log."""
    from pretrain.inference.quiet import third_party_output_to

    (out / "logs").mkdir(parents=True, exist_ok=True)
    return third_party_output_to(out / "logs" / f"{tag}.log")


def convert_and_evaluate(study: Study, out: pathlib.Path, name: str) -> dict:
    """The run's EMA weights converted (models/<name>) and its likelihood bound (eval/<name>.json)."""
    from pretrain.inference.convert import convert
    from pretrain.inference.evaluate import evaluate

    model_dir, evaluation = out / "models" / name, out / "eval" / f"{name}.json"
    if not (model_dir / "config.json").is_file():
        checkpoint = pathlib.Path(read_json(out / "runs" / name / "result.json")["checkpoint"])
        convert(checkpoint, model_dir, force=True)
    if not evaluation.is_file():
        print(f"study: evaluating {name}", flush=True)
        with quiet(out, f"{name}.eval"):
            (result,) = evaluate(model_dir, [pathlib.Path(study.data)], orders=study.eval_orders,
                                 batches=study.eval_batches)
        evaluation.parent.mkdir(exist_ok=True)
        evaluation.write_text(json.dumps(result, indent=2))
    return read_json(evaluation)


def speed_quality(study: Study, out: pathlib.Path) -> list[dict]:
    """The curve rows (pretrain/inference/curve.py) of seed 0 of every SetDLM and BD3-LM family,
    written to curve.csv / curve.png; read back when curve.csv is there (a retrained run removes it)."""
    from pretrain.inference.curve import curve_rows, write_curve
    from pretrain.inference.judge import load_judge

    c = study.curve
    settings = out / "curve_settings.json"  # the curve is redone when the study's curve section changes
    if (out / "curve.csv").is_file() and settings.is_file() and read_json(settings) == c:
        return read_curve_back(out)
    judge = out / "models" / run_name(c["judge"], study.seeds[0]) if c["judge"] in study.families else c["judge"]
    models = [out / "models" / run_name(family, study.seeds[0]) for family, spec in study.families.items()
              if spec["kind"] in ("setdlm", "bd3lm")]
    print("study: decoding the speed-quality curve", flush=True)
    with quiet(out, "curve"):
        rows = curve_rows(models, *load_judge(pathlib.Path(judge)), taus=c.get("taus", [0.9, 0.7, 0.5]),
                          windows=c.get("windows", [None]), samples=c.get("samples", 8),
                          new_tokens=c.get("new_tokens", 64), temperature=1.0, top_p=0.9)
    write_curve(rows, out / "curve")
    settings.write_text(json.dumps(c, indent=2))
    return read_curve_back(out)


def read_curve_back(out: pathlib.Path) -> list[dict]:
    """curve.csv as written (numbers as floats, an empty window None)."""
    import csv

    with open(out / "curve.csv") as rows:
        return [{k: (v if k in ("model", "order") else float(v) if v else None) for k, v in row.items()}
                for row in csv.DictReader(rows)]


FASTER_THAN = 1.5  # tokens per forward some setting must reach for the speed claim to be tested


def frontier_claim(rows: list[dict], kinds: dict[str, str]) -> str:
    """Whether SetDLM decodes more tokens per forward than block diffusion at equal sample quality:
    a point dominates another when it has at least its tokens per forward and at most its
    generative perplexity (one better); compares how many BD3-LM points some SetDLM point
    dominates with how many SetDLM points some BD3-LM point dominates. Where no setting of
    either decodes FASTER_THAN tokens per forward the claim is about speed and was not tested:
    the curve then compares quality at about one token a forward."""
    points = {kind: [(r["tokens_per_forward"], r["generative_perplexity"]) for r in rows
                     if kinds.get(pathlib.Path(r["model"]).name) == kind] for kind in ("setdlm", "bd3lm")}
    if not points["setdlm"] or not points["bd3lm"]:
        return "not tested: the curve needs SetDLM and BD3-LM models"
    fastest = max(t for pts in points.values() for t, _ in pts)
    if fastest < FASTER_THAN:
        return (f"not tested: no setting of SetDLM or BD3-LM decoded {FASTER_THAN:g} or more tokens per forward "
                f"(the fastest: {fastest:.2f}), so the curve compares quality at nearly one token a forward, not speed")

    def dominated(points_a, points_b):  # points of b that some point of a dominates
        return sum(any(ta >= tb and pa <= pb and (ta, pa) != (tb, pb) for ta, pa in points_a) for tb, pb in points_b)

    set_wins, block_wins = dominated(points["setdlm"], points["bd3lm"]), dominated(points["bd3lm"], points["setdlm"])
    verdict = "agrees" if set_wins > block_wins else "does not agree" if set_wins < block_wins else "inconclusive"
    return (f"{verdict}: SetDLM points dominate {set_wins} of {len(points['bd3lm'])} BD3-LM points (at least their "
            f"tokens per forward at no higher generative perplexity, better in one); BD3-LM points dominate "
            f"{block_wins} of {len(points['setdlm'])} SetDLM points")


def infilling(study: Study, out: pathlib.Path) -> dict[str, list[dict]]:
    """Infilling rows (eval/<run>.infill.json, reused when there) of seed 0 of every SetDLM and BD3-LM family."""
    from pretrain.inference.infill import infill_scores

    rows = {}
    for family, spec in study.families.items():
        if spec["kind"] not in ("setdlm", "bd3lm"):
            continue
        name = run_name(family, study.seeds[0])
        path = out / "eval" / f"{name}.infill.json"
        settings = {"spans": study.infill.get("spans", [4, 8, 16]), "sequences": study.infill.get("sequences", 16),
                    "tau": study.infill.get("tau", 0.9), "orders": study.eval_orders}
        if not path.is_file() or [r["span"] for r in read_json(path)] != settings["spans"] or any(
                (r["tau"], r["orders"]) != (settings["tau"], settings["orders"]) for r in read_json(path)):
            print(f"study: infilling with {name}", flush=True)
            with quiet(out, f"{name}.infill"):
                scores = infill_scores(out / "models" / name, pathlib.Path(study.data), **settings)
            path.write_text(json.dumps(scores, indent=2))
        rows[name] = read_json(path)
    return rows


def infill_claim(rows: dict[str, list[dict]], kinds: dict[str, str]) -> str:
    """Whether SetDLM infills better than block diffusion: at each span length, the lower NLL of
    the truth of the best SetDLM run against the best BD3-LM run (accuracy reported beside)."""
    best = {}
    for name, spans in rows.items():
        for row in spans:
            key = (kinds[name], row["span"])
            if key not in best or row["nll_per_token"] < best[key]["nll_per_token"]:
                best[key] = row
    spans = sorted({span for _, span in best})
    pairs = [(best.get(("setdlm", s)), best.get(("bd3lm", s))) for s in spans]
    pairs = [(s, a, b) for s, (a, b) in zip(spans, pairs) if a and b]
    if not pairs:
        return "not tested: infilling needs SetDLM and BD3-LM models"
    wins = sum(a["nll_per_token"] < b["nll_per_token"] for _, a, b in pairs)
    verdict = "agrees" if wins == len(pairs) else "does not agree" if wins == 0 else "mixed"
    detail = "; ".join(f"span {s}: NLL {a['nll_per_token']:.3f} vs {b['nll_per_token']:.3f}, accuracy "
                       f"{a['accuracy']:.3f} vs {b['accuracy']:.3f}" for s, a, b in pairs)
    return f"{verdict}: SetDLM vs BD3-LM, lower NLL of the true span at {wins} of {len(pairs)} span lengths ({detail})"


def infill_section(infill: dict[str, list[dict]]) -> list[str]:
    if not infill:
        return []
    lines = ["## Infilling (seed 0, EMA weights)", "",
             "A span in the middle of validation windows masked; everything else given. Accuracy of the decoded "
             "span, the decoder's forwards, and the NLL per token of the true span with the rest as clean context.",
             "", "| model | order | span | sequences | accuracy | forwards | NLL / span token |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['order']} | {r['span']} | {r['sequences']} | {r['accuracy']:.3f} | {r['forwards']} | "
              f"{r['nll_per_token']:.4f} |" for name, spans in infill.items() for r in spans]
    return lines + [""]


def loss_curve(run_dir: pathlib.Path) -> list[tuple[int, float]]:
    """(step, train/loss) of a run from its TensorBoard events (every resume included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return sorted({e.step: e.value for e in events.Scalars("train/loss")}.items())


def summarize(study: Study, evaluations: dict[str, dict]) -> list[dict]:
    """One row per family: mean and standard deviation over seeds of the NLL bound per token."""
    rows = []
    for family, spec in study.families.items():
        nlls = [evaluations[run_name(family, seed)]["nll_per_token"] for seed in study.seeds]
        mean = sum(nlls) / len(nlls)
        std = math.sqrt(sum((x - mean) ** 2 for x in nlls) / (len(nlls) - 1)) if len(nlls) > 1 else 0.0
        rows.append({"family": family, "kind": spec["kind"], "seeds": len(nlls), "nll_per_token": mean, "nll_std": std,
                     "perplexity": math.exp(min(mean, 50.0))})
    return rows


def likelihood_claim(rows: list[dict]) -> str:
    """Whether AR < SetDLM < BD3-LM < MDLM in perplexity holds for the best run of each kind present."""
    best = {}
    for row in rows:
        best[row["kind"]] = min(best.get(row["kind"], math.inf), row["perplexity"])
    kinds = [kind for kind in CLAIM_ORDER if kind in best]
    values = ", ".join(f"{kind} {best[kind]:.2f}" for kind in kinds)
    holds = all(best[a] < best[b] for a, b in zip(kinds, kinds[1:]))
    return (f"{'agrees' if holds else 'does not agree'}: the best perplexity of each kind, in the paper's "
            f"order: {values}"
            if len(kinds) > 1 else "not tested: the study has fewer than two kinds of model")


def curve_section(study: Study, curve: list[dict]) -> list[str]:
    if not curve:
        return []
    lines = ["## Speed and quality of decoding (seed 0, EMA weights)", "",
             f"Unconditional samples ({study.curve.get('samples', 8)} of {study.curve.get('new_tokens', 64)} tokens "
             f"per setting) scored by the judge `{study.curve['judge']}`; tokens per forward count generated tokens "
             "only.", "", "| model | order | window | tau | tokens / forward | tokens/s | generative perplexity | "
             "unigram entropy |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {pathlib.Path(r['model']).name} | {r['order']} | {'' if r['window'] is None else int(r['window'])} | "
              f"{r['tau']:g} | {r['tokens_per_forward']:.3f} | {r['tokens_per_s']:.1f} | "
              f"{r['generative_perplexity']:.2f} | {r['unigram_entropy_mean']:.3f} |" for r in curve]
    return lines + ["", "![speed-quality curve](curve.png)", ""]


def machine() -> str:
    """The machine the report was written on, in words."""
    import os
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return f"{os.cpu_count()} CPU cores ({names[0] if names else platform.processor() or 'unknown model'}), no GPU"


def write_report(study: Study, out: pathlib.Path, config_path: pathlib.Path, rows: list[dict],
                 curves: dict[str, list[tuple[int, float]]], curve: list[dict],
                 infill: dict[str, list[dict]]) -> pathlib.Path:
    import platform

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        axes.plot([s for s, _ in points], [v for _, v in points], label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("train/loss (logging-window mean)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "loss_curves.png", dpi=100)
    plt.close(figure)
    lines = [f"# Study: {config_path}", "",
             f"Recipe `{study.recipe}`, data `{study.data}`, {study.steps} steps per run, seeds {study.seeds}; "
             f"machine: {machine()}, Python {platform.python_version()}.",
             "", "```bash", f"setdiff-study --config {config_path} --out {out}", "```", "",
             "## Likelihood bound on the validation split (EMA weights)", "",
             f"NLL per token averaged over {study.eval_orders} sampled orders x {study.eval_batches} micro-batches; "
             "mean (and standard deviation) over seeds.", "",
             "| family | kind | seeds | NLL / token | std | perplexity (bound) |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['family']} | {r['kind']} | {r['seeds']} | {r['nll_per_token']:.4f} | "
              f"{r['nll_std']:.4f} | {r['perplexity']:.2f} |" for r in rows]
    kinds = {run_name(family, study.seeds[0]): spec["kind"] for family, spec in study.families.items()}
    speed = frontier_claim(curve, kinds) if curve else "not measured (the study config has no curve)"
    filling = infill_claim(infill, kinds) if infill else "not measured (the study config has no infill)"
    lines += ["", "![loss curves](loss_curves.png)", "", *curve_section(study, curve), *infill_section(infill),
              "## The paper's claims", "",
              f"- Likelihood between AR and block diffusion (AR < SetDLM < BD3-LM < MDLM): {likelihood_claim(rows)}.",
              f"- Better speed-quality trade-offs than block diffusion: {speed}.",
              f"- Stronger infilling than block diffusion: {filling}.", ""]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"likelihood": rows, "loss_curves": curves, "curve": curve, "infill": infill},
                                                 indent=2))
    return report


def run_study(config_path: pathlib.Path, out: pathlib.Path, wait: bool = True) -> pathlib.Path | None:
    """The whole study; None when its runs were left to Slurm without waiting (``wait=False``)."""
    study = load_study(config_path)
    out.mkdir(parents=True, exist_ok=True)
    if not train_runs(study, out, wait):
        return None
    evaluations, curves = {}, {}
    for family in study.families:
        for seed in study.seeds:
            name = run_name(family, seed)
            evaluations[name] = convert_and_evaluate(study, out, name)
            curves[name] = loss_curve(out / "runs" / name)
    curve = speed_quality(study, out) if study.curve else []
    infill = infilling(study, out) if study.infill else {}
    report = write_report(study, out, config_path, summarize(study, evaluations), curves, curve, infill)
    print(f"study: wrote {report}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="setdiff-study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=pathlib.Path, required=True, help="a study config (configs/study_cpu.yaml)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="the study's directory")
    parser.add_argument("--no-wait", action="store_true",
                        help="with study.slurm: submit the runs still to train and return; the same command "
                             "run again waits for them and goes on")
    args = parser.parse_args(argv)
    try:
        run_study(args.config, args.out, wait=not args.no_wait)
    except (*EXPECTED, RuntimeError) as err:
        print(error_line("setdiff-study", err), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
