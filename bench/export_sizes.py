"""Artifact sizes and parity of `harp export`, written to bench/results/export.md.

    .venv/bin/python -m harp.bench.export_sizes [--digits-checkpoint DIR] [--demo-checkpoint DIR] [--digits-epochs 10] [--out PATH]

Protocol
- Sizes: the digits demo model (small_cnn, PGD-trained with `harp train --dataset digits` defaults
  except --epochs, or an existing checkpoint) and random-init VGG16-BN and ResNet18 for CIFAR-10
  (torch seed 0), each pruned one-shot by global magnitude to 90%, 99% and 99.9% and exported with
  every format. Raw bytes and gzip (level 6) bytes of every file. model.onnx is the shipped,
  channel-trimmed dense ONNX; "full dense ONNX" is the same model traced without trimming (the
  unpruned-size baseline the acceptance ratios are meant against); both ratios are reported.
- Parity: every registry architecture on CIFAR-10 shapes, random init with randomised BatchNorm
  statistics (seeded) so folding matters, pruned two ways: weight = global magnitude 90%, channel =
  50% of the output channels of every conv/linear except the classifier zeroed, and baked as harp's
  channel pruning bakes them (weight rows, the following BatchNorm's weight and bias, and the weights
  that read a zeroed channel, zero). No CIFAR data
  is on disk, so their parity inputs are 16 uniform [0, 1] random images (numpy seed 0); the digits
  rows use 256 test images + 64 PGD examples. fp16 rows repeat the channel-pruned export with fp16
  weight values.
- Single process, torch and onnxruntime at 2 threads; sizes and parity numbers are deterministic,
  times are not reported.
"""

from __future__ import annotations

import gzip
import io
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harp.checkpoint import load_checkpoint, save_checkpoint
from harp.cli_errors import ScriptArgumentParser, script_main
from harp.data import dataset_spec
from harp.export.bundle import PREAMBLE, load_bundle, write_bundle
from harp.export.exporter import export_checkpoint, export_model
from harp.export.onnx_writer import graph_to_onnx
from harp.export.trace import trace_model
from harp.io import atomic_write_bytes
from harp.models import build_model, prunable_layers
from harp.pruning.layers import bake, make_masked
from harp.pruning.masks import apply_masks, global_magnitude_masks
from harp.sparsity import model_sparsity

from . import check_report_files, results_dir
from .random_models import randomise_batchnorm, zero_channels_like_pruner

SPARSITIES = (0.9, 0.99, 0.999)
SIZE_ARCHS = ("vgg16_bn", "resnet18")
PARITY_ARCHS = ("small_cnn", "vgg16_bn", "resnet18", "wrn-28-4", "mobilenet_v2")
CHANNEL_FRACTION = 0.5
ACCEPTANCE = {0.99: 40, 0.999: 250}  # full dense ONNX / bundle must reach this ratio
FILES = ("model.onnx", "model.sparse.onnx", "model.harpz", "parity.npz")


# ---------------------------------------------------------------------------
# models


def prune_channels(model: nn.Module, fraction: float, seed: int = 0) -> nn.Module:
    """`model` with `fraction` of its output channels zeroed (`zero_channels_like_pruner`), then baked as
    `harp prune --granularity channel` bakes its masks: the weights reading a zeroed channel are zero too."""
    zero_channels_like_pruner(model, fraction, seed)
    masks = {name: layer.weight != 0 for name, layer in prunable_layers(model)}
    return bake(model, make_masked(model, masks, "channel"))[0].eval()


def random_model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_batchnorm(build_model(arch, dataset_spec("cifar10")), seed).eval()


# ---------------------------------------------------------------------------
# measuring one export


def gz(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=6, mtime=0))


def file_sizes(out: Path) -> dict[str, tuple[int, int]]:
    return {name: (len(b := (out / name).read_bytes()), gz(b)) for name in FILES if (out / name).is_file()}


def untrimmed_sizes(model: nn.Module, shape: tuple[int, int, int], work: Path) -> dict[str, tuple[int, int]]:
    graph = trace_model(model, shape)
    onnx_bytes = graph_to_onnx(graph).SerializeToString()
    path = work / "untrimmed.harpz"
    write_bundle(graph, path)
    bundle_bytes = path.read_bytes()
    path.unlink()
    return {"full dense ONNX": (len(onnx_bytes), gz(onnx_bytes)), "untrimmed bundle": (len(bundle_bytes),
                                                                                       gz(bundle_bytes))}


def bundle_breakdown(path: Path) -> dict[str, int]:
    """Bytes of a bundle by part: preamble, compressed header (and its JSON parts before compression), arrays, padding."""
    header = load_bundle(path).header
    total = path.stat().st_size
    with open(path, "rb") as f:
        header_length = PREAMBLE.unpack(f.read(PREAMBLE.size))[4]
    parts = {f"JSON {key} (uncompressed)": len(json.dumps(header[key], separators=(",", ":"),
                                                            ensure_ascii=False).encode())
             for key in ("graph", "tensors", "meta")}
    parts["preamble"] = PREAMBLE.size
    parts["header (zlib)"] = header_length
    for role in ("indptr", "indices", "values", "data"):
        parts[role if role != "data" else "dense (bias, affine)"] = sum(
            t["arrays"][role]["length"] for t in header["tensors"] if role in t["arrays"])
    stored = sum(v for k, v in parts.items() if not k.startswith("JSON"))
    parts["alignment padding"] = total - stored
    parts["total"] = total
    return parts


def parity_row(manifest: dict[str, Any]) -> dict[str, Any]:
    results = manifest["parity"]["results"]
    return {
        "sparsity": manifest["model"]["sparsity"],
        "removed": manifest["channel_trimming"]["channels_removed"],
        "channels": manifest["channel_trimming"]["channels_before"],
        "n": next(iter(results.values()))["n_inputs"],
        "max_logit": next(iter(results.values()))["max_abs_logit"],
        "diffs": {fmt: r["max_abs_diff"] for fmt, r in results.items()},
        "argmax": min(r["argmax_agree"] for r in results.values()),
        "executor": results["csr"]["executor"] if "csr" in results else "-",
        "passed": all(r["passed"] for r in results.values()),
    }


# ---------------------------------------------------------------------------
# the runs


def digits_checkpoints(work: Path, checkpoint: Path | None, epochs: int) -> tuple[str, dict[float, Path]]:
    """(how the dense digits model was made, {sparsity: pruned checkpoint dir})."""
    from harp.training.train import TrainOptions, train

    if checkpoint is None:
        checkpoint = work / "digits-dense"
        train(TrainOptions(dataset="digits", epochs=epochs), checkpoint, quiet=True)
        origin = f"trained here: `harp train --dataset digits --epochs {epochs}` settings (PGD, seed 0)"
    else:
        origin = f"the checkpoint given with --digits-checkpoint ({checkpoint})"
    ckpt = load_checkpoint(checkpoint)
    metrics = ckpt.meta.get("metrics", {})
    if "natural_accuracy" in metrics:
        origin += (f"; dense natural / PGD accuracy {metrics['natural_accuracy']:.2%} / "
                   f"{metrics['robust_accuracy']:.2%}")
    pruned = {}
    for sparsity in SPARSITIES:
        model = ckpt.build_model()
        masks = global_magnitude_masks(model, sparsity)
        apply_masks(model, masks)
        meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "version", "versions", "files")}
        meta["pruning"] = {"method": "global_magnitude", "granularity": "weight", "target_sparsity": sparsity,
                           "achieved_sparsity": model_sparsity(model), "layers": sorted(masks), "finetuned": False}
        pruned[sparsity] = work / f"digits-{sparsity}"
        save_checkpoint(pruned[sparsity], model, meta, masks)
    return origin, pruned


def run(out_md: Path, work: Path, digits_checkpoint: Path | None, digits_epochs: int,
        demo_checkpoint: Path | None = None) -> str:
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    size_rows, parity_rows, fp16_rows, breakdowns = [], [], [], {}
    cifar = dataset_spec("cifar10")

    if demo_checkpoint is not None:  # the model `make demo` ships: HARP-pruned and fine-tuned
        demo = load_checkpoint(demo_checkpoint)
        out = work / "export-demo"
        manifest = export_checkpoint(demo_checkpoint, out)
        size_rows.append((f"small_cnn digits demo ({demo.meta['pruning']['method']}, fine-tuned)",
                          demo.meta["pruning"]["target_sparsity"], manifest, file_sizes(out),
                          untrimmed_sizes(demo.build_model().eval(), dataset_spec("digits").input_shape, work)))
        parity_rows.append(("small_cnn (digits demo)", f"weight {demo.meta['pruning']['target_sparsity']:.1%}",
                            parity_row(manifest)))

    digits_origin, pruned = digits_checkpoints(work, digits_checkpoint, digits_epochs)
    for sparsity, ckpt_dir in pruned.items():
        out = work / f"export-digits-{sparsity}"
        manifest = export_checkpoint(ckpt_dir, out)
        pruned_ckpt = load_checkpoint(ckpt_dir)
        model = pruned_ckpt.build_model().eval()
        adv = (pruned_ckpt.meta.get("training") or {}).get("adv", "unknown")  # as --digits-checkpoint was trained
        size_rows.append((f"small_cnn digits ({'naturally' if adv == 'none' else adv.upper()}-trained)", sparsity,
                          manifest, file_sizes(out),
                          untrimmed_sizes(model, dataset_spec("digits").input_shape, work)))
        if sparsity == SPARSITIES[-1]:
            breakdowns["small_cnn digits"] = bundle_breakdown(out / "model.harpz")
        parity_rows.append(("small_cnn (digits, trained)", f"weight {sparsity:.1%}", parity_row(manifest)))

    for arch in SIZE_ARCHS:
        for sparsity in SPARSITIES:
            model = random_model(arch)
            apply_masks(model, global_magnitude_masks(model, sparsity))
            out = work / f"export-{arch}-{sparsity}"
            manifest = export_model(model, cifar.input_shape, out, meta={"architecture": arch,
                                                                         "dataset": cifar.to_json()})
            size_rows.append((f"{arch} CIFAR-10 (random init)", sparsity, manifest, file_sizes(out),
                              untrimmed_sizes(model, cifar.input_shape, work)))
            if sparsity == SPARSITIES[-1]:
                breakdowns[arch] = bundle_breakdown(out / "model.harpz")
            shutil.rmtree(out)

    for arch in PARITY_ARCHS:
        for granularity in ("weight", "channel"):
            model = random_model(arch)
            if granularity == "weight":
                apply_masks(model, global_magnitude_masks(model, 0.9))
                label = "weight 90%"
            else:
                model = prune_channels(model, CHANNEL_FRACTION)
                label = f"channel {CHANNEL_FRACTION:.0%}"
            meta = {"architecture": arch, "dataset": cifar.to_json()}
            out = work / f"parity-{arch}-{granularity}"
            parity_rows.append((arch, label, parity_row(export_model(model, cifar.input_shape, out, meta=meta))))
            shutil.rmtree(out)
            if granularity == "channel":
                manifest = export_model(model, cifar.input_shape, out, meta=meta, values_dtype="float16")
                fp16_rows.append((arch, label, parity_row(manifest)))
                shutil.rmtree(out)
    manifest = export_checkpoint(pruned[0.9], work / "digits-fp16", values_dtype="float16")
    fp16_rows.append(("small_cnn (digits, trained)", "weight 90%", parity_row(manifest)))

    text = render(size_rows, parity_rows, fp16_rows, breakdowns, digits_origin, time.perf_counter() - t0)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_md, text.encode())
    return text


# ---------------------------------------------------------------------------
# the report


def kb(n: int) -> str:
    return f"{n / 1000:,.1f}"


def render(size_rows, parity_rows, fp16_rows, breakdowns, digits_origin: str, seconds: float) -> str:
    import onnx
    import onnxruntime

    w = io.StringIO()
    p = lambda s="": print(s, file=w)  # noqa: E731
    p("# Export sizes and parity")
    p()
    p("Generated by `.venv/bin/python -m harp.bench.export_sizes` (protocol in its docstring) on "
      f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
      f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}; {seconds:.0f} s in all.")
    p()
    p(f"Digits model: {digits_origin}; pruned one-shot by global magnitude, not fine-tuned.")
    p()
    p("Random-init CIFAR models: no CIFAR data is on disk, so their parity inputs are 16 uniform [0, 1] "
      "random images (numpy seed 0), not test images. Digits rows use 256 test images + 64 PGD examples.")
    p()
    p("## Sizes (kB = 1000 bytes)")
    p()
    p("`model.onnx`, `model.sparse.onnx` and `model.harpz` are the shipped files (dead channels trimmed). "
      "*full dense ONNX* is the same model traced without trimming: the size of the dense model, which the "
      "acceptance ratios (bundle <= 1/40 of it at 99%, <= 1/250 at 99.9%) are measured against. "
      "*model.onnx/bundle* compares with the trimmed dense ONNX instead.")
    p()
    p("| model | sparsity | nonzero weights | full dense ONNX | model.onnx | model.sparse.onnx | model.harpz | "
      "parity.npz | full ONNX / bundle | model.onnx / bundle | acceptance |")
    p("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, sparsity, manifest, sizes, untrimmed in size_rows:
        full, bundle, dense = untrimmed["full dense ONNX"][0], sizes["model.harpz"][0], sizes["model.onnx"][0]
        need = ACCEPTANCE.get(sparsity)
        verdict = "-" if need is None else (f"pass (>= {need})" if full / bundle >= need else f"MISS (< {need})")
        p(f"| {name} | {sparsity:.1%} | {manifest['model']['nonzero_params']:,} | {kb(full)} | {kb(dense)} | "
          f"{kb(sizes['model.sparse.onnx'][0])} | {kb(bundle)} | {kb(sizes['parity.npz'][0])} | "
          f"{full / bundle:,.0f}x | {dense / bundle:,.1f}x | {verdict} |")
    p()
    p("gzip -6 of the same files:")
    p()
    p("| model | sparsity | full dense ONNX | model.onnx | model.sparse.onnx | model.harpz | full ONNX.gz / "
      "bundle.gz | model.onnx.gz / bundle.gz |")
    p("|---|---|---|---|---|---|---|---|")
    for name, sparsity, manifest, sizes, untrimmed in size_rows:
        full, bundle, dense = untrimmed["full dense ONNX"][1], sizes["model.harpz"][1], sizes["model.onnx"][1]
        p(f"| {name} | {sparsity:.1%} | {kb(full)} | {kb(dense)} | {kb(sizes['model.sparse.onnx'][1])} | "
          f"{kb(bundle)} | {full / bundle:,.1f}x | {dense / bundle:,.1f}x |")
    p()
    p("Channel trimming per export (channels of all channel spaces; parameters of all tensors):")
    p()
    p("| model | sparsity | channels removed | of which zero / unread | params before -> after | "
      "untrimmed bundle | trimmed bundle |")
    p("|---|---|---|---|---|---|---|")
    for name, sparsity, manifest, sizes, untrimmed in size_rows:
        t = manifest["channel_trimming"]
        p(f"| {name} | {sparsity:.1%} | {t['channels_removed']:,} / {t['channels_before']:,} | "
          f"{t['zero_channels']:,} / {t['unread_channels']:,} | {t['params_before']:,} -> {t['params_after']:,} | "
          f"{kb(untrimmed['untrimmed bundle'][0])} | {kb(sizes['model.harpz'][0])} |")
    p()
    p("Where the bytes of a 99.9% bundle go (the JSON columns are the header's parts before zlib; "
      "the stored columns sum to the total):")
    p()
    roles = list(next(iter(breakdowns.values()))) if breakdowns else []
    p("| model | " + " | ".join(roles) + " |")
    p("|---|" + "---|" * len(roles))
    for arch, parts in breakdowns.items():
        p(f"| {arch} | " + " | ".join(f"{parts[r]:,}" for r in roles) + " |")
    p()
    p("## Parity (fp32 values)")
    p()
    p("Criterion: max |format - torch| <= 1e-4 * max(1, max |torch logit|) and identical argmax (near-ties "
      "with a torch top-2 margin <= 2x tolerance exempt). Diffs are max |logit difference| over all inputs.")
    p()
    _parity_table(p, parity_rows)
    p()
    p("## Parity with fp16 weight values")
    p()
    p("Same criterion with rtol 1e-2. *bounded* = max |diff| / max(1, max |logit|), the quantity the "
      "tolerance bounds; *relative* = max |diff| / max |logit|.")
    p()
    _parity_table(p, fp16_rows, relative=True)
    return w.getvalue()


def _parity_table(p, rows, relative: bool = False) -> None:
    extra = " bounded | relative |" if relative else ""
    p(f"| model | pruning | sparsity | channels removed | inputs | max logit | onnx | onnx-sparse | csr "
      f"(executor) |{extra} argmax agree | pass |")
    p("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if relative else "") + "---|---|")
    for arch, label, r in rows:
        d = r["diffs"]
        worst = max(d.values())
        rel = f" {worst / max(1.0, r['max_logit']):.1e} | {worst / r['max_logit']:.1e} |" if relative else ""
        p(f"| {arch} | {label} | {r['sparsity']:.1%} | {r['removed']:,} / {r['channels']:,} | {r['n']} | "
          f"{r['max_logit']:.3g} | {d.get('onnx', 0):.1e} | {d.get('onnx-sparse', 0):.1e} | "
          f"{d.get('csr', 0):.1e} ({r['executor']}) |{rel} {r['argmax']}/{r['n']} | "
          f"{'yes' if r['passed'] else 'NO'} |")


def main(argv: list[str] | None = None) -> None:
    parser = ScriptArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits-checkpoint", type=Path, default=None,
                        help="Dense digits checkpoint to prune (default: train one).")
    parser.add_argument("--demo-checkpoint", type=Path, default=None,
                        help="A pruned checkpoint to add as its own row (e.g. runs/demo/finetuned).")
    parser.add_argument("--digits-epochs", type=int, default=10, help="Epochs when training the digits model.")
    parser.add_argument("--out", type=Path, default=results_dir() / "export.md")
    parser.add_argument("--work", type=Path, default=None, help="Scratch directory (default: a temporary one).")
    args = parser.parse_args(argv)
    check_report_files(args.out)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        print(run(args.out, args.work, args.digits_checkpoint, args.digits_epochs, args.demo_checkpoint))
        return
    with tempfile.TemporaryDirectory(prefix="harp-export-sizes-") as work:
        print(run(args.out, Path(work), args.digits_checkpoint, args.digits_epochs, args.demo_checkpoint))


if __name__ == "__main__":
    sys.exit(script_main(main, "export_sizes"))
