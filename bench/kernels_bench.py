"""`harp-bench kernels`: per-layer timings of an artifact's own conv/linear layers, several ways.

For every conv2d/linear step of the model, at each batch size:

- sparse / dense / winograd / unrolled: that step inside harp's runtime, loaded
  with fallback="sparse", "dense", "winograd" and "unrolled" (winograd only for
  the 3x3 stride-1 convs Winograd covers, unrolled only for the convs
  `harp.kernels.unrolled` is offered for at this batch size, '-' elsewhere;
  `Runtime.profile`: median of `repeats` runs of the whole model, timed step by
  step). A step includes what
  the runtime fused into it (bias, activation, residual add, a 2x2 max pooling)
  and writing the packed input layout of the next conv;
- torch: `F.conv2d` / `F.linear` with the densified weight and bias, alone
  (followed by `F.max_pool2d` where the runtime fused a 2x2 max pooling);
- onnxruntime: a one-node ONNX model (Conv / Gemm) with the dense weight, alone
  (Conv then MaxPool where the runtime fused one);
- auto: the kernel `fallback="auto"` picks for the step at this batch size.

torch and onnxruntime time their layer alone on seeded standard-normal inputs
of the layer's input shape, as in `harp.kernels._microbench` (3 untimed runs,
then runs for about `budget_s` seconds, at least 5, median). Every backend gets
`threads` threads.
"""

from __future__ import annotations

import os
from typing import Any

import click
import numpy as np

from harp.commands.options import NON_NEGATIVE
from harp.errors import HarpError
from harp.export.artifact import open_artifact

from .options import CommaList, check_distinct_outputs, json_out, md_out
from .tables import fmt, markdown_table, text_table

CONV_LIKE = ("conv2d", "linear")


def run_kernels(artifact: str | os.PathLike[str], *, batches: tuple[int, ...] = (1,), threads: int = 1,
                repeats: int = 30, budget_s: float = 0.1) -> dict[str, Any]:
    """Per-layer table of the artifact (see the module doc): {"artifact", "machine", "threads", "rows"}."""
    from harp.kernels._microbench import median_us
    from harp.kernels.runtime import load_runtime
    from harp.kernels.threads import max_threads

    from .machine import machine_info

    art = open_artifact(artifact)
    if not 1 <= threads <= max_threads():
        raise HarpError(f"--threads must be in 1..{max_threads()} (NUMBA_NUM_THREADS), got {threads}")
    machine = machine_info(threads)
    runtimes = {kind: load_runtime(art.root, threads=threads, fallback=kind)
                for kind in ("sparse", "dense", "winograd", "unrolled", "auto")}
    graph = runtimes["sparse"].graph
    shapes = graph.validate()
    baselines = _baselines(threads)
    pooled = {s.name for s in runtimes["sparse"].plan.steps if "unpooled_shape" in s.attrs}  # conv + max pooling
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).random((batch, *art.input_shape), dtype=np.float32)
        profiles = {kind: {r["name"]: r for r in rt.profile(x, repeats=repeats)} for kind, rt in runtimes.items()
                    if kind != "auto"}
        auto = {r["name"]: r["kernel"] for r in runtimes["auto"].plan_report(batch)}
        for name, step in profiles["sparse"].items():
            if step["op"] not in CONV_LIKE:
                continue
            node = graph.node_by_name(name)
            weight = graph.tensors[node.params["weight"]].to_dense()
            bias = graph.tensors[node.params["bias"]] if "bias" in node.params else None
            layer_x = np.random.default_rng(1).standard_normal((batch, *shapes[node.inputs[0]])).astype(np.float32)
            timed = {label: median_us(fn, budget_s) if fn is not None else None
                     for label, fn in ((label, make(node, weight, bias, layer_x, name in pooled))
                                       for label, make in baselines.items())}
            sparse_us, dense_us = step["time_us"], profiles["dense"][name]["time_us"]
            winograd_us, unrolled_us = (profiles[kind][name]["time_us"] if profiles[kind][name]["kernel"] == kind
                                        else None for kind in ("winograd", "unrolled"))
            fastest_baseline = min((t for t in timed.values() if t is not None), default=None)
            rows.append({
                "layer": name, "op": node.op, "fused": step["nodes"][1:], "batch": batch,
                "weight_shape": list(weight.shape), "input_shape": list(shapes[node.inputs[0]]),
                "density": step["density"], "nnz": int(np.count_nonzero(weight)),
                "sparse_us": sparse_us, "dense_us": dense_us, "winograd_us": winograd_us, "unrolled_us": unrolled_us,
                "torch_us": timed.get("torch"), "onnxruntime_us": timed.get("onnxruntime"),
                "auto_kernel": auto.get(name),
                "speedup_vs_fastest_baseline": fastest_baseline / sparse_us if fastest_baseline else None,
            })
    return {"artifact": {"path": str(art.root), "name": art.name, "architecture": art.architecture},
            "machine": machine, "threads": threads, "repeats": repeats, "budget_s": budget_s, "rows": rows}


def _baselines(threads: int) -> dict[str, Any]:
    """label -> make(node, dense weight, bias, x, pooled) -> a no-argument callable, for each library installed
    here; `pooled`: a 2x2 stride-2 max pooling follows the conv (the runtime fused one)."""
    from harp.lazy_group import is_installed

    out: dict[str, Any] = {}
    if is_installed("torch"):
        out["torch"] = lambda node, w, b, x, pooled: _torch_layer(node, w, b, x, threads, pooled)
    if is_installed("onnxruntime") and is_installed("onnx"):  # onnx builds the one-node model
        out["onnxruntime"] = lambda node, w, b, x, pooled: _ort_layer(node, w, b, x, threads, pooled)
    return out


def _torch_layer(node, weight: np.ndarray, bias: np.ndarray | None, x: np.ndarray, threads: int, pooled: bool):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    xt, wt = torch.from_numpy(x), torch.from_numpy(weight)
    bt = torch.from_numpy(np.array(bias, np.float32)) if bias is not None else None
    a = node.attrs
    if node.op == "linear":
        return lambda: _no_grad(F.linear, xt, wt, bt)
    conv = (F.conv2d, xt, wt, bt, tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]), int(a["groups"]))
    if pooled:
        return lambda: _no_grad(F.max_pool2d, _no_grad(*conv), 2)
    return lambda: _no_grad(*conv)


def _no_grad(fn, *args):
    import torch

    with torch.no_grad():
        return fn(*args)


def _ort_layer(node, weight: np.ndarray, bias: np.ndarray | None, x: np.ndarray, threads: int, pooled: bool):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    o = weight.shape[0]
    b = np.zeros(o, np.float32) if bias is None else np.asarray(bias, np.float32)
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(b, "B")]
    if node.op == "linear":
        op = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
        out_shape = [x.shape[0], o]
    else:
        a = node.attrs
        ph, pw = a["padding"]
        op = helper.make_node("Conv", ["x", "W", "B"], ["c" if pooled else "y"], strides=list(a["stride"]),
                              pads=[ph, pw, ph, pw], dilations=list(a["dilation"]), group=int(a["groups"]),
                              kernel_shape=list(weight.shape[2:]))
        out_shape = None
    ops = [op] + ([helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])] if pooled else [])
    graph = helper.make_graph(ops, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    opsets = [helper.make_opsetid("", 17)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)  # onnxruntime may lag onnx's newest IR
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"x": x})


HEADERS = ("layer", "op", "batch", "weight", "density", "sparse µs", "dense µs", "winograd µs", "unrolled µs",
           "torch µs", "ORT µs", "auto", "sparse vs best lib")


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    return [[r["layer"] + (f" (+{', '.join(r['fused'])})" if r["fused"] else ""), r["op"], str(r["batch"]),
             "x".join(map(str, r["weight_shape"])), fmt(r["density"], ".2%"), fmt(r["sparse_us"], ".1f"),
             fmt(r["dense_us"], ".1f"), fmt(r.get("winograd_us"), ".1f"), fmt(r.get("unrolled_us"), ".1f"),
             fmt(r["torch_us"], ".1f"),
             fmt(r["onnxruntime_us"], ".1f"),
             r["auto_kernel"] or "-", _times(r["speedup_vs_fastest_baseline"])]
            for r in result["rows"]]


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def kernels_markdown(result: dict[str, Any]) -> str:
    from .machine import describe

    return (f"Per-layer kernels of `{result['artifact']['path']}`, {result['threads']} thread(s), medians in "
            f"µs. Machine: {describe(result['machine'])}.\n\n"
            "sparse/dense/winograd/unrolled: the step inside harp's runtime (fused epilogue included); "
            "torch/ORT: the layer alone (conv/linear + bias) with the dense weight. "
            "*sparse vs best lib* = min(torch, ORT) / sparse.\n\n"
            + markdown_table(HEADERS, table_rows(result)) + "\n")


@click.command("kernels")
@click.argument("artifact", type=click.Path())
@click.option("--batch", "batches", type=CommaList(int, minimum=1), default="1", show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(min=3), default=30, show_default=True,
              help="Runs of the whole model per runtime profile.")
@click.option("--budget", "budget_s", type=NON_NEGATIVE, default=0.1, show_default=True,
              help="Seconds of timed runs per torch/onnxruntime layer.")
@json_out
@md_out
def kernels_command(artifact, batches, threads, repeats, budget_s, json_path, md_path):
    """Per-layer sparse vs dense kernel vs torch vs onnxruntime on ARTIFACT's own layer shapes."""
    from .latency_bench import write_outputs

    check_distinct_outputs(json=json_path, md=md_path)
    result = run_kernels(artifact, batches=tuple(batches), threads=threads, repeats=repeats, budget_s=budget_s)
    if json_path != "-":
        click.echo(text_table(HEADERS, table_rows(result)))
    write_outputs(result, json_path, md_path, kernels_markdown)
