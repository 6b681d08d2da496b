"""Every pruning method on one robust dense model: accuracy, robustness, densities, cost.

    .venv/bin/python -m harp.bench.pruning_report --dataset digits --sparsity 0.99 \
        [--dense DIR] [--methods harp,hydra,lwm,global-magnitude,random,pwoa,mrpf] [--granularity weight] \
        [--prune-epochs N] [--finetune-epochs N] [--subset N] [--apgd-square N] [--autoattack N] \
        [--curve-sparsity S] \
        [--work DIR] [--name NAME] [--resume]

Protocol
- One dense checkpoint for all methods: `--dense DIR`, or trained here with `harp train`
  defaults for the dataset (its PGD-AT epochs are then the "dense PGD-AT epoch" reference).
- Each method prunes with its per-dataset defaults (`harp prune`), then fine-tunes with
  the same defaults (`harp finetune`, PGD-AT); both stages in this process, one after
  another. Exceptions (FINETUNE_LOSS): PwoA is not fine-tuned (its masked retraining
  under distillation is its fine-tuning; it gets prune + finetune epochs in all), MRPF
  fine-tunes with TRADES as in its paper. `--subset N`: every epoch of both stages sees
  the first N training examples (a budget knob for MNIST-sized data on a CPU).
- Test metrics of the final model: natural accuracy and PGD with the dataset's evaluation
  budget on the full test split (or its first `--test-size` examples), optionally
  `--apgd-square N`: AutoAttack's APGD-CE and its black-box Square attack (5000 queries),
  worst case per example, which catches both a weak gradient attack and gradient masking
  at a fraction of the standard set's cost, and the standard AutoAttack (`--autoattack N`),
  on the first N test examples, and an L-inf PGD curve over
  eps (harp.bench.curves) for every method at `--curve-sparsity`, overlaid in one PNG.
  The pruned stage is scored on at most 1000 test examples. Per-layer densities from
  the checkpoint metadata.
- Cost: wall seconds of the pruning stage (training, validation and its scoring), mean
  epoch seconds of its training loop, and that epoch's ratio to one dense PGD-AT epoch
  on the same number of examples, measured in this process (the dense stage is trained
  here, or one PGD-AT epoch of the given model's architecture is timed on the first 4096
  training examples and scaled). Adversarial examples: training examples replaced by an
  attack in each stage (`metrics["adversarial_examples"]`), plus MRPF's sensitivity PGD runs.
- Writes bench/results/NAME.md, .json (and NAME-linf.png with a curve); NAME defaults to
  pruning-DATASET-GRANULARITY. Rewritten after every row; `--resume` keeps finished rows.
  `--from-json FILE --methods ... --name NAME` re-renders a subset of an earlier run.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harp.checkpoint import load_checkpoint
from harp.cli_errors import ScriptArgumentParser, script_main
from harp.data import dataset_spec
from harp.errors import HarpError
from harp.io import atomic_write_bytes, atomic_write_json, read_json
from harp.values import is_number
from harp.pruning.finetune import finetune_checkpoint
from harp.pruning.methods import METHODS, PruneOptions, make_config, prune_checkpoint
from harp.training.train import TrainOptions, load_data, train

from . import check_report_files, results_dir
from .curves import LINF_SCALES, pgd_curve, torch_accuracy
from .plots import curves_plot
from .robustness import autoattack

RESULTS = results_dir()
PROBE_EXAMPLES = 4096  # training examples of the dense PGD-AT epoch probe
ATTACK_KEYS = ("autoattack", "apgd_square", "linf_curve")  # what attack_final adds to a row


def dense_reference(dataset: str, dense: Path | None, work: Path, data_root: str,
                    subset: int | None = None) -> tuple[Path, float]:
    """The dense checkpoint and the seconds of one PGD-AT epoch of it (on `subset` examples), timed here."""
    if dense is None:
        dense = work / "dense"
        metrics = train(TrainOptions(dataset=dataset, data_root=data_root, download=None, subset=subset), dense,
                        force=True, quiet=True)
        return dense, metrics["mean_epoch_seconds"]
    ckpt = load_checkpoint(dense)  # validated before anything runs
    # one epoch on a slice of the training data, scaled to the stages' epoch (keeps MNIST's probe short)
    full = len(load_data(ckpt.spec, data_root, None, 0, subset).train)
    sliced = len(load_data(ckpt.spec, data_root, None, 0, PROBE_EXAMPLES).train)
    metrics = train(TrainOptions(dataset=dataset, arch=ckpt.meta["architecture"], epochs=1, data_root=data_root,
                                 download=None, subset=PROBE_EXAMPLES, test_size=100),  # its own score is not used
                    work / "dense-epoch", force=True, quiet=True)
    return dense, metrics["mean_epoch_seconds"] * full / sliced


# How a method's row is completed after its pruning stage. The default is the issue's
# protocol: PGD-AT fine-tuning with the dataset's defaults. PwoA's masked retraining under
# self-distillation is its own fine-tuning (adding PGD-AT would void "no adversarial
# examples"), and MRPF's paper fine-tunes with TRADES.
FINETUNE_LOSS: dict[str, str | None] = {"pwoa": None, "mrpf": "trades"}


@dataclass(frozen=True)
class Protocol:
    """Everything a row depends on besides the method and the target."""

    granularity: str
    prune_epochs: int | None
    finetune_epochs: int | None
    subset: int | None  # training examples per epoch (None: the whole split)
    test_size: int | None
    autoattack: int  # test examples for the standard AutoAttack (0: skip)
    apgd_square: int  # test examples for AutoAttack's APGD-CE + Square only (0: skip)
    curve_sparsity: float | None  # L-inf robustness curve for rows at this target
    curve_examples: int
    data_root: str


def run_method(method: str, sparsity: float, dense: Path, work: Path, p: Protocol) -> dict[str, Any]:
    tag = f"{method}-{p.granularity}-{sparsity:g}"
    finetune_loss = FINETUNE_LOSS.get(method, "pgd")
    # the pruned stage's own score is a progress check; 1000 examples are enough, unless it is final
    prune_test = p.test_size if finetune_loss is None else min(p.test_size or 1000, 1000)
    epochs = p.prune_epochs
    if method == "pwoa" and p.prune_epochs and p.finetune_epochs:
        epochs = p.prune_epochs + p.finetune_epochs  # ADMM + retraining: as many passes as prune + finetune
    common = {"data_root": p.data_root, "download": None, "subset": p.subset}  # it offers no --download
    t0 = time.perf_counter()
    pruned = prune_checkpoint(dense, work / tag, make_config(method, sparsity=sparsity, granularity=p.granularity),
                              PruneOptions(epochs=epochs, test_size=prune_test, **common), force=True, quiet=True)
    prune_seconds = time.perf_counter() - t0
    tuned = pruned
    if finetune_loss is not None:
        opts = PruneOptions(epochs=p.finetune_epochs, adv=finetune_loss, test_size=p.test_size, **common)
        tuned = finetune_checkpoint(work / tag, work / f"{tag}-ft", opts, force=True, quiet=True)
    info = load_checkpoint(work / tag).meta["pruning"]
    row = {
        "method": method, "sparsity": sparsity, "granularity": p.granularity,
        "achieved_sparsity": info["achieved_sparsity"], "flops_reduction": info.get("flops_reduction"),
        "pruned": {"natural": pruned["natural_accuracy"], "robust": pruned["robust_accuracy"]},
        "finetuned": {"natural": tuned["natural_accuracy"], "robust": tuned["robust_accuracy"]},
        "finetune_loss": finetune_loss,
        "robust_attack": tuned["robust_attack"], "test_examples": tuned["test_examples"],
        "layers": {d["name"]: d["density"] for d in info["layers"]},
        "prune_seconds": round(prune_seconds, 1),
        "prune_epoch_seconds": pruned.get("mean_epoch_seconds"),
        "finetune_epoch_seconds": tuned.get("mean_epoch_seconds") if finetune_loss else None,
        "adversarial_examples": {
            "prune": int(info.get("adversarial_examples", pruned.get("adversarial_examples", 0))),
            "finetune": int(tuned.get("adversarial_examples", 0)) if finetune_loss else 0},
    }
    return attack_final(row, work, p)


def final_dir(row: dict[str, Any], work: Path) -> Path:
    """Where a row's final model is: the fine-tuned checkpoint, or the pruned one when there is no fine-tuning."""
    tag = f"{row['method']}-{row['granularity']}-{row['sparsity']:g}"
    return work / (tag if row.get("finetune_loss", "pgd") is None else f"{tag}-ft")


def attack_final(row: dict[str, Any], work: Path, p: Protocol) -> dict[str, Any]:
    """Add the AutoAttack score and the L-inf curve the protocol asks for and the row lacks."""
    # key: (test examples, the attacks of pyautoattack; None is the standard set)
    asked = {"autoattack": (p.autoattack, None), "apgd_square": (p.apgd_square, ["apgd-ce", "square"])}
    wanted = {k: v for k, v in asked.items() if v[0] and k not in row}
    if "autoattack" in row:  # the standard set includes APGD-CE and Square: the subset would add nothing
        wanted.pop("apgd_square", None)
    want_curve = p.curve_sparsity == row["sparsity"] and "linf_curve" not in row
    if not (wanted or want_curve):
        return row
    ckpt = load_checkpoint(final_dir(row, work))
    model = ckpt.build_model().eval()
    test = load_data(ckpt.spec, p.data_root, None, 0).test
    for key, (n, attacks) in wanted.items():
        x, y = next(test.subset(n).batches(n))
        t1 = time.perf_counter()
        x_adv = autoattack(model, x, y, ckpt.spec.eps, seed=0, attacks=attacks)
        row[key] = {"accuracy": torch_accuracy(model, x_adv, y), "examples": len(y),
                    "seconds": round(time.perf_counter() - t1, 1)}
    if want_curve:
        x, y = next(test.subset(p.curve_examples).batches(p.curve_examples))
        row["linf_curve"] = pgd_curve(model, x, y, [s * ckpt.spec.eps for s in LINF_SCALES], "linf",
                                      ckpt.spec.eval_steps)
    return row


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def render(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    atk = rows[0]["robust_attack"]
    pgd_name = f"PGD-{atk['steps']} (ε={atk['eps']:g})"
    aa = [r for r in rows if "autoattack" in r]
    apgd = [r for r in rows if "apgd_square" in r]
    # one reference per process that produced rows (a merged table may come from several)
    refs = " s / ".join(f"{v:.2f}" for v in
                        dict.fromkeys(r.get("dense_epoch_seconds", header["dense_epoch_seconds"]) for r in rows))
    lines = [f"# Pruning methods: {header['dataset']}, {header['granularity']} granularity", "",
             f"Generated by `{header['command']}` on {header['machine']} in {header['seconds']:.0f} s."
             + (f" {header['sources']}" if header.get("sources") else ""), "",
             f"Dense model: `{header['dense']}`: natural {header['dense_metrics']['natural_accuracy']:.2%}, "
             f"PGD {header['dense_metrics']['robust_accuracy']:.2%}; one dense PGD-AT epoch "
             f"{refs} s (training loop only, "
             f"{header.get('epoch_examples') or 'all'} training examples)"
             + ("; the processes timed it at different machine loads, so use harp.bench.epoch_cost (both jobs "
                "alternating batch by batch) for the HARP/dense ratio" if " / " in refs else "") + ".", "",
             f"Final models scored on {rows[0]['test_examples']} test examples, pruned ones on at most 1000; "
             f"robust accuracy is {pgd_name}"
             + (f"; APGD-CE + Square (AutoAttack's APGD-CE and its black-box Square attack with 5000 queries, "
                f"worst case per example; L-inf, ε={atk['eps']:g}) on the first "
                f"{apgd[0]['apgd_square']['examples']} test examples" if apgd else "")
             + (f"; AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; L-inf, ε={atk['eps']:g}) on the first "
                f"{aa[0]['autoattack']['examples']} test examples where measured" if aa else "") + ".", "",
             # channel pruning's target is FLOPs; its zero weights leave weights of kept channels reading pruned
             # ones (inert: their inputs are 0) uncounted, so the two columns are in different units
             ("| method | target (FLOPs) | zero weights " if header["granularity"] == "channel" else
              "| method | target | achieved ") + "| FLOPs removed | pruned natural | pruned PGD | final natural "
             "| final PGD | APGD-CE + Square | AutoAttack | prune stage (s) | prune epoch (s) | vs dense / HARP epoch "
             "| adversarial examples (prune + fine-tune) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    harp_epoch = {r["sparsity"]: r["prune_epoch_seconds"] for r in rows if r["method"] == "harp"}
    for r in rows:
        ep = r["prune_epoch_seconds"]
        ratio = f"{ep / r.get('dense_epoch_seconds', header['dense_epoch_seconds']):.2f}x" if ep else "one-shot"
        ratio += f" / {ep / harp_epoch[r['sparsity']]:.2f}x" if ep and harp_epoch.get(r["sparsity"]) else ""
        flops = f"{r['flops_reduction']:.1%}" if r["flops_reduction"] is not None else "-"
        adv = r.get("adversarial_examples")
        adv_text = f"{_count(adv['prune'])} + {_count(adv['finetune'])}" if adv else "-"
        final = f"**{r['finetuned']['natural']:.2%}** | **{r['finetuned']['robust']:.2%}**"
        lines.append(f"| {r['method']} | {r['sparsity']:.2%} | {r['achieved_sparsity']:.3%} | {flops} "
                     f"| {r['pruned']['natural']:.2%} | {r['pruned']['robust']:.2%} | {final} "
                     f"| {_pct(r.get('apgd_square', {}).get('accuracy'))} "
                     f"| {_pct(r.get('autoattack', {}).get('accuracy'))} | {r.get('prune_seconds', '-')} "
                     f"| {ep if ep else '-'} | {ratio} | {adv_text} |")
    losses = {r["method"]: r.get("finetune_loss", "pgd") for r in rows}
    lines += ["", "Final = after fine-tuning: " + ", ".join(
        f"{m} {'PGD-AT' if v == 'pgd' else v.upper() if v else 'none (its own retraining)'}"
        for m, v in losses.items()) + ". Prune epoch: mean seconds of one epoch of the pruning stage's "
        "training loop; vs dense / HARP epoch: its ratio to one dense PGD-AT epoch on the same number of examples "
        "(timed once per process, so it shares that moment's machine load) and to HARP's epoch at the same target "
        "in the same process."]
    lines += winners(rows, dataset_spec(header["dataset"]).classes)
    names = list(rows[0]["layers"])
    lines += ["", "Per-layer density (kept fraction of weights) after pruning:", "",
              "| method | target | " + " | ".join(f"`{n}`" for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['sparsity']:.2%} | "
                     + " | ".join(f"{r['layers'][n]:.4f}" for n in names) + " |")
    curves = [r for r in rows if "linf_curve" in r]
    if curves:
        budgets = curves[0]["linf_curve"]["budgets"]
        lines += ["", f"Robustness vs L-inf budget at {curves[0]['sparsity']:.2%} sparsity (PGD-"
                  f"{curves[0]['linf_curve']['steps']}, step 2.5·ε/steps, first "
                  f"{header.get('curve_examples', '?')} test examples; plot `{header.get('curve_png', '')}`):", "",
                  "| method | " + " | ".join(f"ε={b:.3g}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for r in curves:
            lines.append(f"| {r['method']} | " + " | ".join(f"{a:.2%}" for a in r["linf_curve"]["accuracy"]) + " |")
    return "\n".join(lines) + "\n"


def worst_case(row: dict[str, Any]) -> float:
    """The lowest robust accuracy any measured attack left: PGD, APGD-CE + Square, AutoAttack."""
    return min([row["finetuned"]["robust"]] + [row[k]["accuracy"] for k in ("apgd_square", "autoattack") if k in row])


def winners(rows: list[dict[str, Any]], classes: int) -> list[str]:
    """Which method is best where, and whether the published ordering at 99% holds, computed from the rows.

    A model whose natural accuracy is below twice chance (2/classes) is left out of
    the ranking: a constant classifier "keeps" its ~10% under any attack, which
    says nothing about robustness.
    """
    measures = {"natural": lambda r: r["finetuned"]["natural"], "PGD": lambda r: r["finetuned"]["robust"],
                "worst case": worst_case}
    floor = 2 / classes
    lines = ["", f"Who wins (computed from the table; worst case = the lowest robust accuracy any measured attack "
             f"left; models below {floor:.0%} natural accuracy, twice chance, are not ranked):", ""]
    for target in sorted({r["sparsity"] for r in rows}):
        at = [r for r in rows if r["sparsity"] == target and r["finetuned"]["natural"] >= floor]
        dropped = [r["method"] for r in rows if r["sparsity"] == target and r not in at]
        best = []
        for label, key in measures.items():
            top = max((key(r) for r in at), default=None)
            if top is not None:
                best.append(f"{label} {' = '.join(r['method'] for r in at if key(r) == top)} ({top:.2%})")
        lines.append(f"- {target:.2%}: " + ("; ".join(best) or "no model above the floor")
                     + (f"; not ranked: {', '.join(dropped)}" if dropped else "") + ".")
    at99 = {r["method"]: r for r in rows if r["sparsity"] == 0.99}
    if {"harp", "hydra", "pwoa"} <= set(at99):
        ranked = {m: at99[m]["finetuned"]["natural"] >= floor for m in ("harp", "hydra", "pwoa")}
        for label in ("PGD", "worst case"):
            key = measures[label]
            # an unranked (chance-level) model is behind any ranked one, whatever its number
            holds = all(ranked["harp"] and (not ranked[m] or key(at99["harp"]) > key(at99[m]))
                        for m in ("hydra", "pwoa"))
            lines.append(f"- The published ordering at 99% (HARP ahead of HYDRA and PwoA), by {label}: "
                         + ", ".join(f"{m} {key(at99[m]):.2%}{'' if ranked[m] else ' (not ranked)'}"
                                     for m in ("harp", "hydra", "pwoa"))
                         + f": {'holds' if holds else 'does not hold'}.")
    return lines


def write_results(name: str, rows: list[dict[str, Any]], header: dict[str, Any]) -> None:
    curves = {r["method"]: {"linf": r["linf_curve"]} for r in rows if "linf_curve" in r}
    if curves:
        header["curve_png"] = f"{name}-linf.png"
    text = render(rows, header)  # before any file is written: a row it cannot show leaves none half-made
    RESULTS.mkdir(exist_ok=True)
    if curves:
        curves_plot(curves, RESULTS / header["curve_png"])
    atomic_write_bytes(RESULTS / f"{name}.md", text.encode())
    atomic_write_json(RESULTS / f"{name}.json", {"header": header, "rows": rows})


def rerender(sources: list[Path], methods: list[str], name: str) -> None:
    """Write NAME.md/.json from earlier runs' JSON (e.g. one per sparsity, run in parallel), rows of `methods`."""
    runs = [_read_results(p) for p in sources]
    merged: dict[tuple[str, float], dict[str, Any]] = {}
    for run in runs:  # each row keeps its own process's dense reference
        for r in run["rows"]:
            if r["method"] in methods:
                key = (r["method"], r["sparsity"])
                # the same row in several files (copies attacked separately): their measurements combine
                merged[key] = {**merged.get(key, {}), "dense_epoch_seconds": run["header"]["dense_epoch_seconds"],
                               **r}
    order = {m: i for i, m in enumerate(methods)}
    rows = sorted(merged.values(), key=lambda r: (r["sparsity"], order[r["method"]]))
    if not rows:
        raise HarpError(f"{', '.join(map(str, sources))}: no rows for {', '.join(methods)}")
    files = ", ".join(f"`{p.name}`" for p in sources)
    header = {**runs[0]["header"], "seconds": max(r["header"]["seconds"] for r in runs),
              "command": f"python -m harp.bench.pruning_report --from-json {','.join(map(str, sources))} "
                         f"--methods {','.join(methods)} --name {name}",
              "sources": f"Rows of {', '.join(methods)} merged from {files} (processes that ran side by side; "
                         "each file's header names the commands that produced it)."}
    try:
        write_results(name, rows, header)
    except (KeyError, TypeError) as e:  # a row written by hand or cut short: it lacks what the table shows
        raise HarpError(f"{', '.join(map(str, sources))}: a row of {', '.join(methods)} lacks a field the "
                        f"report shows ({type(e).__name__}: {e})") from e


def _read_results(path: Path) -> dict[str, Any]:
    """An earlier run's results JSON, checked for the parts a merge or a resume reads."""
    try:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("header"), dict) \
                or not isinstance(data.get("rows"), list):
            raise ValueError("no header/rows")
        header = data["header"]
        if not all(is_number(header.get(k)) for k in ("seconds", "dense_epoch_seconds")) \
                or not isinstance(header.get("command"), str):
            raise ValueError("its header lacks seconds, dense_epoch_seconds or command")
        for i, row in enumerate(data["rows"]):
            if not (isinstance(row, dict) and isinstance(row.get("method"), str) and is_number(row.get("sparsity"))):
                raise ValueError(f"rows[{i}] lacks a method or a sparsity")
        return data
    except (OSError, ValueError) as e:
        raise HarpError(f"{path}: not a pruning report's results JSON ({e})") from e


def main(argv: list[str] | None = None) -> None:
    ap = ScriptArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--dense", type=Path, default=None)
    ap.add_argument("--sparsity", default="0.99", help="comma-separated targets")
    ap.add_argument("--methods", default="harp,hydra,lwm,global-magnitude,random")
    ap.add_argument("--granularity", default="weight", choices=("weight", "channel"))
    ap.add_argument("--prune-epochs", type=int, default=None)
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--subset", type=int, default=None, help="train on the first N training examples per epoch")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-pruning"))
    ap.add_argument("--name", default=None, help="results file stem (default pruning-DATASET-GRANULARITY)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test-size", type=int, default=None,
                    help="score the final models on the first N test examples (default: all)")
    ap.add_argument("--autoattack", type=int, default=0, metavar="N",
                    help="standard AutoAttack on the first N test examples of every final model (0: skip)")
    ap.add_argument("--apgd-square", type=int, default=0, metavar="N",
                    help="AutoAttack's APGD-CE + Square only, on the first N test examples (0: skip)")
    ap.add_argument("--curve-sparsity", type=float, default=None,
                    help="L-inf robustness-vs-eps curve of every method at this target, overlaid in one PNG")
    ap.add_argument("--curve-examples", type=int, default=500)
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in NAME.json (adding the attacks asked for that they lack), "
                         "run the rest")
    ap.add_argument("--from-json", default=None, metavar="FILE[,FILE...]",
                    help="only re-render: write NAME from these results JSON files, rows of --methods")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise HarpError(f"unknown method(s): {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    name = args.name or f"pruning-{args.dataset}-{args.granularity}"
    check_report_files(*(RESULTS / f"{name}{suffix}" for suffix in (".md", ".json")))
    if args.from_json is not None:
        return rerender([Path(p) for p in args.from_json.split(",")], methods, name)
    torch.set_num_threads(args.threads)
    try:
        sparsities = [float(s) for s in args.sparsity.split(",")]
    except ValueError:
        raise HarpError(f"--sparsity {args.sparsity!r} is not a comma-separated list of numbers") from None
    for sparsity in sparsities:  # every method's options, before minutes of dense training and timing
        for method in methods:
            make_config(method, sparsity=sparsity, granularity=args.granularity)
    if args.dense is not None:
        load_checkpoint(args.dense)  # validated before --work is created
    protocol = Protocol(args.granularity, args.prune_epochs, args.finetune_epochs, args.subset, args.test_size,
                        args.autoattack, args.apgd_square, args.curve_sparsity, args.curve_examples, args.data_root)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    command = "python -m harp.bench.pruning_report " + " ".join(sys.argv[1:] if argv is None else argv)
    done: dict[tuple[str, float], dict[str, Any]] = {}
    earlier, dense_epoch = 0.0, None
    if args.resume and (RESULTS / f"{name}.json").exists():
        previous = _read_results(RESULTS / f"{name}.json")
        done = {(r["method"], r["sparsity"]): r for r in previous["rows"]}
        earlier = previous["header"]["seconds"]
        command = f"{previous['header']['command']}` then `{command}"
        if args.dense is not None and previous["header"]["dense"] == str(args.dense):
            dense_epoch = previous["header"]["dense_epoch_seconds"]  # the finished rows' reference
    if dense_epoch is None:
        dense, dense_epoch = dense_reference(args.dataset, args.dense, args.work, args.data_root, args.subset)
    else:
        dense = args.dense
    fixed = {"dataset": args.dataset, "granularity": args.granularity, "dense": str(dense),
             "dense_metrics": load_checkpoint(dense).meta["metrics"], "dense_epoch_seconds": dense_epoch,
             "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                        f"Python {platform.python_version()}, torch {torch.__version__}"}
    # every finished row stays in the file, also those of methods or targets not asked for this time
    results: dict[tuple[str, float], dict[str, Any]] = dict(done)
    for sparsity in sparsities:
        for method in methods:
            key = (method, sparsity)
            if key in done:  # finished earlier; only the attacks asked for now may be missing
                had = {k for k in ATTACK_KEYS if k in done[key]}
                results[key] = attack_final(done[key], args.work, protocol)
                if had == {k for k in ATTACK_KEYS if k in results[key]}:
                    continue
            else:
                results[key] = {**run_method(method, sparsity, dense, args.work, protocol),
                                "dense_epoch_seconds": dense_epoch}
            print(json.dumps({k: results[key].get(k) for k in ("method", "sparsity", "finetuned", "apgd_square",
                                                                "autoattack", "prune_seconds",
                                                                "adversarial_examples")}), flush=True)
            # rewritten after every row: a long run leaves usable partial results
            header = {**fixed, "command": command, "seconds": earlier + time.perf_counter() - t0,
                      "curve_examples": args.curve_examples, "epoch_examples": args.subset}
            write_results(name, list(results.values()), header)
    print(f"wrote {RESULTS / f'{name}.md'}")


if __name__ == "__main__":
    sys.exit(script_main(main, "pruning_report"))
