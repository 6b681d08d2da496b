"""`harp-bench robustness`: accuracy of every backend of an artifact, clean and under attack.

    run_robustness(artifact_dir, RobustnessOptions(dataset="digits", n=1000)) -> dict

What runs (the first `n` test images of the dataset, the same for everything):

- clean accuracy of every backend (torch, onnxruntime, onnxruntime-sparse, harp);
- white-box attacks crafted on the torch model rebuilt from the artifact's bundle
  (`torch_graph`, checked against the exporter's stored torch logits): FGSM,
  PGD L-inf and PGD L2 (`harp.attacks`, the dataset's `harp eval` settings) and
  the standard AutoAttack (pyautoattack, version="standard": APGD-CE, APGD-T,
  FAB-T, Square at the L-inf eps). The same adversarial images are fed to every
  backend: its accuracy on them, and its agreement with torch's predictions;
- the black-box Square L-inf attack (pyautoattack's SquareAttack, `queries`
  queries, p_init 0.8) run on each exported runtime itself (harp, onnxruntime,
  onnxruntime-sparse) through its numpy outputs alone;
- robustness curves (`curves`): L-inf and L2 PGD and the greedy L0 pixel attack;
- sanity checks (`sanity`).

The harp runtime runs with fallback="sparse" here (no per-batch-size timing, so
the same kernels every call; attacks call it with many batch sizes). Every
backend runs on `threads` threads.
"""

from __future__ import annotations

import functools
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import click
import numpy as np
import torch

from harp.commands.options import POSITIVE, SEED
from harp.errors import HarpError
from harp.export.artifact import Artifact, open_artifact

from .artifact import check_backend_packages, check_backends, default_backends
from .curves import BATCH, robustness_curves, torch_accuracy
from .latency_bench import BACKEND_ORDER, write_outputs
from .machine import usable_cores
from .options import CommaList, OutputFile, check_distinct_outputs, data_root, json_out, md_out
from .sanity import LARGE_EPS, sanity_checks
from .tables import distinct, fmt, markdown_link, markdown_table, text_table

WHITE_BOX = ("fgsm", "pgd", "pgd-l2", "autoattack")
ATTACKS = (*WHITE_BOX, "square")
CURVES = ("linf", "l2", "l0")
BLACK_BOX_TARGETS = ("harp", "onnxruntime", "onnxruntime-sparse")  # the deployed runtimes, numpy in and out
SANITY_INPUTS = 64  # clean images for the logits and determinism checks
LARGE_EPS_INPUTS = 256

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RobustnessOptions:
    dataset: str | None = None  # default: the dataset the manifest names
    data_root: str = "data"
    n: int = 1000
    attacks: tuple[str, ...] = ATTACKS
    backends: tuple[str, ...] | None = None  # default: those the artifact and this machine can run
    eps: float | None = None  # L-inf budget; default: the dataset's
    l2_eps: float | None = None  # default: the dataset's
    steps: int | None = None  # PGD steps; default: the dataset's `harp eval` steps
    queries: int = 1000  # Square query budget
    curves: tuple[str, ...] = CURVES
    curve_steps: int | None = None  # PGD steps per curve point; default: `steps`
    threads: int = 1
    seed: int = 0

    def check(self) -> None:
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise HarpError(f"unknown attack {unknown[0]!r} (choose from {', '.join(ATTACKS)})")
        unknown = [c for c in self.curves if c not in CURVES]
        if unknown:
            raise HarpError(f"unknown curve {unknown[0]!r} (choose from {', '.join(CURVES)})")
        if self.backends is not None:
            if "torch" not in self.backends:
                raise HarpError("backend torch is required: white-box attacks are crafted on it")
            if "square" in self.attacks and not set(self.backends) & set(BLACK_BOX_TARGETS):
                raise HarpError(f"attack square runs on the exported runtimes ({', '.join(BLACK_BOX_TARGETS)}); "
                                "--backends names none of them")
        if self.n < 1 or self.queries < 1 or self.threads < 1:
            raise HarpError(f"--n, --queries and --threads must be >= 1, got {self.n}, {self.queries}, "
                            f"{self.threads}")
        cores = usable_cores()
        if self.threads > cores:
            raise HarpError(f"--threads {self.threads} exceeds the {cores} cores this process may use")
        for name, v in (("--eps", self.eps), ("--l2-eps", self.l2_eps)):
            if v is not None and v <= 0:
                raise HarpError(f"{name} must be > 0, got {v}")
        for name, v in (("--steps", self.steps), ("--curve-steps", self.curve_steps)):
            if v is not None and v < 1:
                raise HarpError(f"{name} must be >= 1, got {v}")


# ---------------------------------------------------------------- inputs and backends


def evaluation_spec(art: Artifact, options: RobustnessOptions):
    """The spec of the dataset the artifact is evaluated on, after checking it fits the model."""
    from harp.data import dataset_spec

    name = options.dataset or art.dataset
    if name is None:
        raise HarpError(f"{art.root}: the manifest names no dataset; pass --dataset")
    try:
        spec = dataset_spec(name)
    except HarpError:
        if options.dataset is None:
            raise HarpError(f"{art.root} was exported for dataset {name!r}, which harp cannot load; "
                            "pass --dataset") from None
        raise
    if spec.input_shape != art.input_shape or spec.classes != art.classes:
        raise HarpError(f"dataset {name} has {'x'.join(map(str, spec.input_shape))} images in {spec.classes} "
                        f"classes, but {art.name} takes {'x'.join(map(str, art.input_shape))} inputs and outputs "
                        f"{art.classes} classes")
    # same count, other folders (renamed or replaced classes): every label would mean another class
    if art.class_names is not None and spec.class_names is not None and list(spec.class_names) != art.class_names:
        raise HarpError(f"{art.name} was trained on classes {', '.join(art.class_names)}; dataset {name} "
                        f"now has {', '.join(spec.class_names)}")
    return spec


@functools.lru_cache(maxsize=4)
def _test_split(name: str, data_root: str):
    """The dataset's test split, read once per process: `checked_options` reads it up front (missing data
    is refused before the first artifact runs), the evaluation then uses the same copy."""
    from harp.data import load_split

    return load_split(name, False, root=data_root)


def evaluation_data(art: Artifact, options: RobustnessOptions):
    """(dataset spec, x float32 (n, C, H, W) in [0, 1], y int64) after checking the dataset fits the model."""
    spec = evaluation_spec(art, options)
    test = _test_split(spec.name, str(options.data_root)).subset(options.n)
    x = test.images.float().div(255.0).contiguous()
    return spec, x, test.labels.clone()


def checked_options(art: Artifact, options: RobustnessOptions, *, note: Callable[[str], None] = lambda s: None
                    ) -> RobustnessOptions:
    """`options` with the backends to run on `art`, after everything `run_robustness` would refuse
    was checked: backends (by default those the artifact and machine can run; `note` names the others),
    packages, threads, the dataset's fit and that its test split can be read."""
    options.check()
    backends = options.backends
    if backends is None:
        backends = default_backends(art, "evaluating", note,
                                    required=("torch", "white-box attacks are crafted on it"))
        options = replace(options, backends=backends)
        options.check()  # square needs a runtime besides torch
    check_backends(art, list(backends))
    check_backend_packages(list(backends))
    if "harp" in backends:
        from harp.kernels.threads import max_threads

        if options.threads > max_threads():
            raise HarpError(f"--threads {options.threads} exceeds the {max_threads()} threads numba may use "
                            "(NUMBA_NUM_THREADS)")
    _test_split(evaluation_spec(art, options).name, str(options.data_root))
    return options


def build_predictors(art: Artifact, model: torch.nn.Module, names: tuple[str, ...], threads: int) -> dict[str, Predict]:
    """name -> x (N, C, H, W) float32 -> logits, for each backend (see `harp.bench.latency`)."""
    from .latency import harp_backend, onnxruntime_backend, onnxruntime_sparse_backend, torch_backend

    makers = {"torch": lambda: torch_backend(model, threads),
              "onnxruntime": lambda: onnxruntime_backend(art.root, threads),
              "onnxruntime-sparse": lambda: onnxruntime_sparse_backend(art.root, threads),
              "harp": lambda: harp_backend(art.root, threads, fallback="sparse")}
    return {name: makers[name]().run for name in names}


def predict(fn: Predict, x: np.ndarray) -> np.ndarray:
    """Logits of fn on x, BATCH images per call."""
    return np.concatenate([np.asarray(fn(np.ascontiguousarray(x[i:i + BATCH]))) for i in range(0, len(x), BATCH)])


def on_backends(predictors: dict[str, Predict], x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Every backend's accuracy on x_adv, and the share of its predictions equal to torch's."""
    x_np = x_adv.detach().numpy().astype(np.float32)
    preds = {name: predict(fn, x_np).argmax(1) for name, fn in predictors.items()}
    labels = y.numpy()
    return {name: {"accuracy": float((p == labels).mean()), "agreement_with_torch": float((p == preds["torch"])
                                                                                          .mean())}
            for name, p in preds.items()}


# ---------------------------------------------------------------- attacks


def white_box(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, spec, options: RobustnessOptions
              ) -> tuple[torch.Tensor, dict[str, Any]]:
    """(adversarial images, settings) of one white-box attack on the torch model."""
    from harp.attacks import fgsm, pgd
    from harp.training.train import eval_attack

    from .curves import batched

    eps = options.eps if options.eps is not None else spec.eps
    torch.manual_seed(options.seed)
    if name == "fgsm":
        return batched(lambda a, b: fgsm(model, a, b, eps), x, y), {"eps": eps, "norm": "linf", "steps": 1}
    if name in ("pgd", "pgd-l2"):
        norm = "l2" if name == "pgd-l2" else "linf"
        budget = (options.l2_eps if options.l2_eps is not None else spec.l2_eps) if norm == "l2" else eps
        cfg = eval_attack(spec, budget, options.steps, norm=norm)
        return batched(lambda a, b: pgd(model, a, b, cfg), x, y), {"eps": cfg.eps, "norm": norm, "steps": cfg.steps,
                                                                  "step_size": cfg.step_size}
    if name == "autoattack":
        attacks, targets = autoattack_plan(spec.classes)
        return autoattack(model, x, y, eps, options.seed), {
            "eps": eps, "norm": "linf", "version": "standard", "attacks": ", ".join(attacks),
            "target_classes": targets}
    raise HarpError(f"unknown white-box attack {name!r}")


AUTOATTACK_TARGETS = 9  # target classes of the standard version's APGD-T and FAB-T


def autoattack_plan(classes: int) -> tuple[list[str], int]:
    """The standard AutoAttack's attacks and target-class count for a `classes`-way model: the standard
    version assumes 10 or more classes (9 targets); fewer get every other class as a target, and APGD-T,
    whose targeted DLR loss needs 4 classes, is left out below that."""
    attacks = ["apgd-ce", "apgd-t", "fab-t", "square"]
    if classes < 4:
        attacks.remove("apgd-t")
    return attacks, min(AUTOATTACK_TARGETS, classes - 1)


def autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int,
               attacks: list[str] | None = None) -> torch.Tensor:
    """The standard AutoAttack (pyautoattack, L-inf) on the torch model, or only `attacks` of it (e.g. apgd-ce);
    with fewer than 10 classes, as `autoattack_plan` adapts it."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        raise HarpError("attack autoattack needs the package pyautoattack (pip install pyautoattack)") from e
    with torch.no_grad():
        standard, targets = autoattack_plan(model(x[:1]).shape[1])
    if attacks is None:
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", device="cpu", seed=seed)
        adversary.attacks_to_run = standard
    else:
        adversary = AutoAttack(model, attacks=attacks, norm="Linf", eps=eps, version="custom", device="cpu", seed=seed)
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = targets
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=BATCH)
    return x_adv


def square(fn: Predict, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int, seed: int) -> torch.Tensor:
    """pyautoattack's Square L-inf attack on a numpy callable: outputs only, no gradients."""
    try:
        from pyautoattack.square import SquareAttack
    except ImportError as e:
        raise HarpError("attack square needs the package pyautoattack (pip install pyautoattack)") from e

    def logits(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(predict(fn, t.detach().numpy().astype(np.float32)))

    # pyautoattack counts its first (stripe) perturbation as query 1, then runs n_queries more
    attack = SquareAttack(logits, norm="Linf", n_queries=queries - 1, eps=eps, p_init=0.8, n_restarts=1, seed=seed,
                          verbose=False, resc_schedule=True, device="cpu")
    return attack.perturb(x, y)


def _max_perturbation(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> float:
    d = (x_adv - x).flatten(1)
    return float(d.abs().max() if norm == "linf" else d.norm(dim=1).max()) if len(d) else 0.0


# ---------------------------------------------------------------- the evaluation


def run_robustness(artifact: str | os.PathLike[str] | Artifact, options: RobustnessOptions = RobustnessOptions(),
                   *, label: str | None = None, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Clean, white-box, black-box accuracy, curves and sanity checks of one artifact (module doc).

    label: the artifact's name in tables and plots (default its name; `run_robustness_many` numbers repeats).
    """
    from .torch_graph import load_torch_model

    art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
    options = checked_options(art, options, note=log)
    label = label or art.name
    spec, x, y = evaluation_data(art, options)
    torch.set_num_threads(options.threads)
    model = load_torch_model(art)
    predictors = build_predictors(art, model, options.backends, options.threads)
    eps = options.eps if options.eps is not None else spec.eps
    clean = on_backends(predictors, x, y)
    result: dict[str, Any] = {
        "artifact": {"path": str(art.root), "name": art.name, "label": label, "architecture": art.architecture,
                     "sparsity": art.sparsity, "method": art.method},
        "dataset": spec.name, "n": len(y), "eps": eps, "options": asdict(options),
        "clean": clean, "attacks": {}, "blackbox": {}, "curves": {},
    }
    log(f"{label}: clean " + ", ".join(f"{b} {r['accuracy']:.2%}" for b, r in clean.items()))
    for name in (a for a in WHITE_BOX if a in options.attacks):
        start = time.perf_counter()
        x_adv, settings = white_box(name, model, x, y, spec, options)
        backends = on_backends(predictors, x_adv, y)
        result["attacks"][name] = {**settings, "torch_accuracy": backends["torch"]["accuracy"], "backends": backends,
                                   "max_perturbation": _max_perturbation(x_adv, x, settings["norm"]),
                                   "seconds": time.perf_counter() - start}
        log(f"{label}: {name} " + ", ".join(f"{b} {r['accuracy']:.2%}" for b, r in backends.items()))
    if "square" in options.attacks:
        targets = [b for b in options.backends if b in BLACK_BOX_TARGETS]
        result["blackbox"] = {"attack": "square", "norm": "linf", "eps": eps, "queries": options.queries,
                              "backends": {}}
        for backend in targets:
            start = time.perf_counter()
            x_adv = square(predictors[backend], x, y, eps, options.queries, options.seed)
            acc = float((predict(predictors[backend], x_adv.numpy()).argmax(1) == y.numpy()).mean())
            result["blackbox"]["backends"][backend] = {"accuracy": acc, "seconds": time.perf_counter() - start,
                                                       "max_perturbation": _max_perturbation(x_adv, x, "linf")}
            log(f"{label}: square on {backend} {acc:.2%}")
    if options.curves:
        steps = options.curve_steps or options.steps or spec.eval_steps
        l2_eps = options.l2_eps if options.l2_eps is not None else spec.l2_eps
        result["curves"] = robustness_curves(model, x, y, eps=eps, l2_eps=l2_eps, steps=steps, seed=options.seed,
                                             kinds=tuple(options.curves))
        log(f"{label}: curves done")
    result["sanity"] = [c.to_json() for c in _sanity(result, model, predictors, x, y, options)]
    return result


def _sanity(result: dict[str, Any], model, predictors: dict[str, Predict], x: torch.Tensor, y: torch.Tensor,
            options: RobustnessOptions):
    from harp.attacks import AttackConfig, pgd

    large = None
    if "pgd" in options.attacks or options.curves:
        steps = max(10, options.steps or 10)
        cfg = AttackConfig(eps=LARGE_EPS, step_size=2.5 * LARGE_EPS / steps, steps=steps)
        xs, ys = x[:LARGE_EPS_INPUTS], y[:LARGE_EPS_INPUTS]
        torch.manual_seed(options.seed)
        large = torch_accuracy(model, pgd(model, xs, ys, cfg), ys)
    probe = x[:SANITY_INPUTS].numpy()
    outputs = {name: predict(fn, probe) for name, fn in predictors.items()}
    repeated = {name: predict(fn, probe) for name, fn in predictors.items()}
    return sanity_checks(result, large_eps_accuracy=large, outputs=outputs, repeated=repeated)


def run_robustness_many(artifacts: list[str | os.PathLike[str]], options: RobustnessOptions = RobustnessOptions(),
                        *, log: Callable[[str], None] = lambda s: None,
                        note: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """run_robustness on each artifact (all checked before any runs), with the machine block once."""
    from .machine import machine_info

    opened = [open_artifact(a) for a in artifacts]
    checked = [checked_options(art, options, note=note) for art in opened]
    labels = distinct([art.name for art in opened])
    machine = machine_info(options.threads, warn=False)
    return {"machine": machine, "runs": [run_robustness(art, opts, label=label, log=log)
                                         for art, opts, label in zip(opened, checked, labels)]}


# ---------------------------------------------------------------- rendering


def attack_rows(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): accuracy of every backend, clean and per attack, with the lowest agreement with torch."""
    backends = list(run["clean"])
    headers = ["attack", "eps", *backends, "min agreement"]
    rows = [["clean", "-", *(fmt(run["clean"][b]["accuracy"], ".2%") for b in backends),
             fmt(min(r["agreement_with_torch"] for r in run["clean"].values()), ".2%")]]
    for name, a in run["attacks"].items():
        rows.append([name, fmt(a["eps"], ".4g"), *(fmt(a["backends"][b]["accuracy"], ".2%") for b in backends),
                     fmt(min(r["agreement_with_torch"] for r in a["backends"].values()), ".2%")])
    bb = run.get("blackbox") or {}
    if bb.get("backends"):
        rows.append([f"square ({bb['queries']} queries, black-box)", fmt(bb["eps"], ".4g"),
                     *(fmt(bb["backends"][b]["accuracy"], ".2%") if b in bb["backends"] else "-" for b in backends),
                     "-"])
    return headers, rows


def curve_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["artifact", "curve", "budget: accuracy"]
    rows = [[run["artifact"]["label"], kind,
             ", ".join(f"{b:.3g}: {a:.1%}" for b, a in zip(c["budgets"], c["accuracy"]))]
            for run in runs for kind, c in run["curves"].items()]
    return headers, rows


def robustness_text(result: dict[str, Any]) -> str:
    out = []
    for run in result["runs"]:
        out.append(f"{run['artifact']['path']} on {run['dataset']} (n={run['n']})")
        out.append(text_table(*attack_rows(run)))
        out.append("")
    if any(run["curves"] for run in result["runs"]):
        out += [text_table(*curve_rows(result["runs"])), ""]
    for run in result["runs"]:
        out.append(f"sanity checks ({run['artifact']['label']}):")
        out += [f"  {c['status']:<4}  {c['name']}: {c['detail']}" for c in run["sanity"]]
    return "\n".join(out)


def robustness_markdown(result: dict[str, Any], curves_png: str | None = None, *, command: str | None = None) -> str:
    """The result as Markdown; `command`, the line that made it, heads a results file of its own."""
    from .machine import describe

    out = ([f"Generated by `{command}`.", ""] if command else []) + [f"Machine: {describe(result['machine'])}.", ""]
    for run in result["runs"]:
        o = run["options"]
        square_note = (f"; Square runs on each runtime itself ({o['queries']} queries)"
                       if (run.get("blackbox") or {}).get("backends") else "")
        out += [f"### {run['artifact']['label']} ({run['artifact']['architecture']}, {run['artifact']['method']}, "
                f"sparsity {run['artifact']['sparsity']:.2%})", "",
                f"{run['dataset']} test set, first {run['n']} images; white-box attacks crafted on the torch model "
                f"rebuilt from the bundle and fed to every backend{square_note}. Seed {o['seed']}.", "",
                markdown_table(*attack_rows(run)), ""]
    if any(run["curves"] for run in result["runs"]):
        out += ["Robustness curves (accuracy of the torch model):", "", markdown_table(*curve_rows(result["runs"])),
                ""]
        if curves_png:
            out += [f"![robustness curves]({curves_png})", ""]
    for run in result["runs"]:
        out += [f"Sanity checks ({run['artifact']['label']}):", ""]
        out += [f"- **{c['status']}** {c['name']}: {c['detail']}" for c in run["sanity"]]
        out.append("")
    return "\n".join(out)


def command_line(runs: list[dict[str, Any]]) -> str:
    """The `harp-bench robustness` command that evaluates these runs' artifacts with their options again
    (output files aside): what a results file says it was made by. An option resolved to different
    values per artifact (the dataset each manifest names) was left to its default."""
    def flags(o: dict[str, Any]) -> dict[str, Any]:
        return {"--dataset": o["dataset"], "--data-root": o["data_root"] if o["data_root"] != "data" else None,
                "--n": o["n"], "--attacks": ",".join(o["attacks"]),
                "--backends": ",".join(o["backends"]) if o["backends"] else None, "--eps": o["eps"],
                "--l2-eps": o["l2_eps"], "--steps": o["steps"], "--queries": o["queries"],
                "--curves": ",".join(o["curves"]) if o["curves"] else None, "--curve-steps": o["curve_steps"],
                "--threads": o["threads"], "--seed": o["seed"]}

    each = [flags(run["options"]) for run in runs]
    words = ["harp-bench", "robustness", *(_shown_path(run["artifact"]["path"]) for run in runs)]
    words += [word for flag, value in each[0].items()
              if value is not None and all(f[flag] == value for f in each) for word in (flag, str(value))]
    return shlex.join(words + ([] if runs[0]["options"]["curves"] else ["--no-curves"]))


def _shown_path(path: str) -> str:
    """`path` relative to the working folder where it lies inside it (results files name runs/...)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


@click.command("robustness")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@click.option("--dataset", default=None, help="Dataset of the test images. Default: the one the manifest names.")
@data_root
@click.option("--n", type=click.IntRange(min=1), default=1000, show_default=True, help="Test images.")
@click.option("--attacks", type=CommaList(choices=ATTACKS), default=",".join(ATTACKS), show_default=True)
@click.option("--backends", type=CommaList(choices=BACKEND_ORDER), default=None,
              help=f"Comma-separated backends ({', '.join(BACKEND_ORDER)}); torch is required (white-box attacks run "
                   "on it). Default: every one that the artifact and this machine can run.")
@click.option("--eps", type=POSITIVE, default=None, help="L-inf budget. Default: the dataset's.")
@click.option("--l2-eps", type=POSITIVE, default=None, help="L2 budget. Default: the dataset's.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="PGD steps. Default: the dataset's `harp eval` steps.")
@click.option("--queries", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Square attack query budget.")
@click.option("--curves", type=CommaList(choices=CURVES), default=",".join(CURVES), show_default=True,
              help="Robustness curves to draw (linf, l2, l0).")
@click.option("--no-curves", is_flag=True, help="Skip the robustness curves.")
@click.option("--curve-steps", type=click.IntRange(min=1), default=None,
              help="PGD steps per curve point. Default: --steps.")
@click.option("--threads", type=click.IntRange(1, usable_cores()), default=1, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@json_out
@md_out
@click.option("--plot", "plot_path", type=OutputFile(), default=None,
              help="Write the robustness curves (all artifacts overlaid) as a PNG.")
@click.pass_context
def robustness_command(ctx, artifacts, dataset, data_root, n, attacks, backends, eps, l2_eps, steps, queries, curves,
                       no_curves, curve_steps, threads, seed, json_path, md_path, plot_path):
    """Clean and adversarial accuracy of every backend of each ARTIFACT, curves and sanity checks."""
    if plot_path and no_curves:
        raise click.UsageError("--plot draws the robustness curves; drop it or --no-curves")
    given = [f"--{name.replace('_', '-')}" for name in ("curves", "curve_steps")
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if no_curves and given:  # they would be ignored
        raise click.UsageError(f"{' and '.join(given)} set the curves that --no-curves skips; drop one or the other")
    check_distinct_outputs(json=json_path, md=md_path, plot=plot_path)
    options = RobustnessOptions(dataset, data_root, n, tuple(attacks), backends and tuple(backends), eps, l2_eps,
                                steps, queries,
                                () if no_curves else tuple(curves), curve_steps, threads, seed)
    quiet = json_path == "-"
    result = run_robustness_many(list(artifacts), options, log=lambda s: None if quiet else click.echo(s, err=True),
                                 note=lambda s: click.echo(f"harp-bench: note: {s}", err=True))
    if not quiet:
        click.echo(robustness_text(result))
    if plot_path:
        from .plots import curves_plot

        curves_plot({run["artifact"]["label"]: run["curves"] for run in result["runs"]}, plot_path)
    png = markdown_link(plot_path, md_path) if plot_path and md_path else None
    write_outputs(result, json_path, md_path, lambda r: robustness_markdown(r, png, command=command_line(r["runs"])))
