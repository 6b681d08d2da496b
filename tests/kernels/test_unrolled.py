"""The sparse conv compiled for one layer's pattern (`unrolled`) against the reference, and its cache."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.export.csr import dense_to_csr
from harp.kernels import unrolled
from harp.kernels.conv import plan_sparse_conv2d
from harp.kernels.csr import kernel_csr
from harp.kernels.layout import Layout
from harp.kernels.packing import image_group, pack_input
from harp.kernels.reference import conv2d_ref, epilogue_ref
from harp.kernels.unrolled import bind_unrolled_conv2d, compile_unrolled

ACTS = {"none": (0, -np.inf, np.inf), "relu": (1, 0.0, np.inf), "clip": (1, -0.5, 0.75)}


def run_unrolled(x, weight, bias, stride, padding, dilation, groups, act, residual, border=(0, 0)):
    """The conv through compile_unrolled + bind, output and residual in a bordered, image-grouped layout."""
    n, o = x.shape[0], weight.shape[0]
    indptr, indices, values = kernel_csr(dense_to_csr(weight))
    plan = plan_sparse_conv2d(indptr, indices, weight.shape, x.shape[2:], stride, padding, dilation, groups)
    ho, wo = plan.out_hw
    group = image_group(n, (ho - 1) * plan.packed_hw[1] + wo)
    code = compile_unrolled(plan, indptr, group)
    packed = pack_input(x, plan.stride, plan.padding, group, allow_view=False)
    layout = Layout(o, ho, wo, *border, group)
    out = np.zeros(layout.size(n), np.float32)
    res = None
    if residual is not None:
        res = np.zeros(layout.size(n), np.float32)
        res.reshape(n // group, o, ho + 2 * border[0], wo + 2 * border[1], group)[
            :, :, border[0]:border[0] + ho, border[1]:border[1] + wo] = \
            residual.reshape(n // group, group, o, ho, wo).transpose(0, 2, 3, 4, 1)
    code_act, lo, hi = ACTS[act]
    bind_unrolled_conv2d(code, values, packed, n, bias, code_act, lo, hi, res, layout if res is not None else None,
                         out, layout)()
    grid = out.reshape(n // group, o, ho + 2 * border[0], wo + 2 * border[1], group)
    frame = np.ones(grid.shape[2:4], bool)
    frame[border[0]:border[0] + ho, border[1]:border[1] + wo] = False
    assert not grid[:, :, frame].any()  # all four borders stay zero: the next conv reads them as padding
    inner = grid[:, :, border[0]:border[0] + ho, border[1]:border[1] + wo]
    return inner.transpose(0, 4, 1, 2, 3).reshape(n, o, ho, wo)


def expected(x, weight, bias, stride, padding, dilation, groups, act, residual):
    clip = {"clip": (-0.5, 0.75)}.get(act)
    y = conv2d_ref(x, weight, bias, stride, padding, dilation, groups)
    return epilogue_ref(y, act, clip, residual)


def assert_close(actual, wanted):
    atol = 1e-4 * max(1.0, float(np.abs(wanted).max(initial=0.0)))
    np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=atol)


@st.composite
def cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg, og = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 9))
    return dict(n=draw(st.sampled_from([16, 32])), groups=groups, cg=cg, o=og * groups, kernel=(kh, kw),
                stride=stride, padding=padding, dilation=dilation, hw=(h, w),
                density=draw(st.sampled_from([0.0, 0.1, 0.4, 1.0])), act=draw(st.sampled_from(sorted(ACTS))),
                residual=draw(st.booleans()), border=(draw(st.integers(0, 1)), draw(st.integers(0, 1))),
                seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=40, deadline=None)
@given(cases())
def test_unrolled_conv2d_matches_reference(case):
    # Blocks of 16 rows with 0-20 channels per group, input-channel passes of 16, image groups of 16 and 32.
    rng = np.random.default_rng(case["seed"])
    c = case
    x = rng.standard_normal((c["n"], c["cg"] * c["groups"], *c["hw"])).astype(np.float32)
    weight = rng.standard_normal((c["o"], c["cg"], *c["kernel"])).astype(np.float32)
    weight *= rng.random(weight.shape) < c["density"]
    bias = rng.standard_normal(c["o"]).astype(np.float32)
    wanted = expected(x, weight, bias, c["stride"], c["padding"], c["dilation"], c["groups"], c["act"], None)
    residual = rng.standard_normal(wanted.shape).astype(np.float32) if c["residual"] else None
    wanted = expected(x, weight, bias, c["stride"], c["padding"], c["dilation"], c["groups"], c["act"], residual)
    got = run_unrolled(x, weight, bias, c["stride"], c["padding"], c["dilation"], c["groups"], c["act"], residual,
                       c["border"])
    assert_close(got, wanted)


def test_a_resnet_sized_layer_in_passes_of_16_input_channels():
    # 64 -> 40 channels: three blocks of rows (16, 16, 8), four passes over the input channels, two tiles.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 64, 12, 12)).astype(np.float32)
    weight = rng.standard_normal((40, 64, 3, 3)).astype(np.float32) * (rng.random((40, 64, 3, 3)) < 0.13)
    weight[5] = 0.0  # an empty row
    bias = rng.standard_normal(40).astype(np.float32)
    got = run_unrolled(x, weight, bias, (1, 1), (1, 1), (1, 1), 1, "relu", None, border=(1, 1))
    assert_close(got, expected(x, weight, bias, (1, 1), (1, 1), (1, 1), 1, "relu", None))


def small_plan(rng, n=16):
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * (rng.random((4, 3, 3, 3)) < 0.5)
    indptr, indices, values = kernel_csr(dense_to_csr(weight))
    return weight, indptr, values, plan_sparse_conv2d(indptr, indices, weight.shape, (5, 5), 1, 1)


def test_only_image_groups_of_whole_vectors_and_checked_buffers():
    weight, indptr, values, plan = small_plan(np.random.default_rng(1))
    with pytest.raises(ValueError, match="image groups of a multiple of 16"):
        compile_unrolled(plan, indptr, 8)
    code = compile_unrolled(plan, indptr, 16)
    layout = Layout(4, 5, 5, 0, 0, 16)
    out = np.zeros(layout.size(16), np.float32)
    bias = np.zeros(4, np.float32)
    packed = np.zeros(3 * 7 * 7 * 16 - 1, np.float32)  # one element short
    with pytest.raises(ValueError, match="packed input must be"):
        bind_unrolled_conv2d(code, values, packed, 16, bias, 0, -np.inf, np.inf, None, None, out, layout)
    with pytest.raises(ValueError, match="values must be float32"):
        bind_unrolled_conv2d(code, values[:-1], np.zeros(3 * 7 * 7 * 16, np.float32), 16, bias, 0, -np.inf,
                             np.inf, None, None, out, layout)


def test_compiled_code_is_cached_and_a_damaged_file_is_compiled_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HARP_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(2)
    weight, indptr, values, plan = small_plan(rng)
    x = rng.standard_normal((16, 3, 5, 5)).astype(np.float32)
    wanted = expected(x, weight, None, (1, 1), (1, 1), (1, 1), 1, "none", None)

    def fresh_run():
        monkeypatch.setattr(unrolled, "_COMPILER", None)  # as in a new process: nothing loaded yet
        return run_unrolled(x, weight, np.zeros(4, np.float32), (1, 1), (1, 1), (1, 1), 1, "none", None)

    assert_close(fresh_run(), wanted)
    (cached,) = tmp_path.iterdir()
    data = cached.read_bytes()
    assert data.startswith(unrolled.CACHE_MAGIC) and unrolled._read_cached(cached) == data[40:]
    assert_close(fresh_run(), wanted)  # loaded from the file
    for damaged in (data[:-7], data[:60] + bytes([data[60] ^ 1]) + data[61:], b"not an object"):
        cached.write_bytes(damaged)
        assert unrolled._read_cached(cached) is None
        assert_close(fresh_run(), wanted)  # compiled again, and the file rewritten
        assert cached.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temporary files left


def test_an_unwritable_cache_only_costs_a_compile(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("HARP_CACHE_DIR", str(blocker / "cache"))  # under a file: mkdir fails
    monkeypatch.setattr(unrolled, "_COMPILER", None)
    rng = np.random.default_rng(3)
    weight, _, _, _ = small_plan(rng)
    x = rng.standard_normal((16, 3, 5, 5)).astype(np.float32)
    got = run_unrolled(x, weight, np.zeros(4, np.float32), (1, 1), (1, 1), (1, 1), 1, "none", None)
    assert_close(got, expected(x, weight, None, (1, 1), (1, 1), (1, 1), 1, "none", None))


def test_another_layers_cached_code_under_this_name_is_not_run(tmp_path, monkeypatch):
    # A file with a valid checksum that does not define this layer's function (copied over
    # from another layer) is compiled again, never called.
    monkeypatch.setenv("HARP_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(4)
    first, _, _, _ = small_plan(rng)
    second, _, _, _ = small_plan(rng)
    x = rng.standard_normal((16, 3, 5, 5)).astype(np.float32)
    bias = np.zeros(4, np.float32)
    monkeypatch.setattr(unrolled, "_COMPILER", None)
    run_unrolled(x, first, bias, (1, 1), (1, 1), (1, 1), 1, "none", None)
    (first_file,) = tmp_path.iterdir()
    run_unrolled(x, second, bias, (1, 1), (1, 1), (1, 1), 1, "none", None)
    (second_file,) = set(tmp_path.iterdir()) - {first_file}
    second_file.write_bytes(first_file.read_bytes())
    monkeypatch.setattr(unrolled, "_COMPILER", None)
    got = run_unrolled(x, second, bias, (1, 1), (1, 1), (1, 1), 1, "none", None)
    assert_close(got, expected(x, second, None, (1, 1), (1, 1), (1, 1), 1, "none", None))
    assert unrolled._read_cached(second_file) != unrolled._read_cached(first_file)  # rewritten
