"""Slow, obviously-correct NumPy twins of every kernel, with torch semantics.

Each function here is the specification its fast numba twin is tested against
(and is itself tested against `torch.nn.functional`). They favour clarity over
speed: accumulate in float64, loop over kernel taps or output positions, and
return the input's float dtype. NumPy only.

Shapes follow torch: activations are NCHW, conv weights (O, C/groups, kh, kw),
linear weights (O, I); pairs such as `stride` are (h, w) tuples.
"""

from __future__ import annotations

import numpy as np

Pair = tuple[int, int]


def conv2d_output_hw(in_hw: Pair, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    """Output (H, W) of a convolution, as torch computes it (floor division)."""
    out = []
    for size, k, s, p, d in zip(in_hw, kernel, stride, padding, dilation):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int,
                     ceil_mode: bool) -> int:
    """Output length of a pooling window along one axis, torch rules included.

    With `ceil_mode` the last window may start in the right padding only if it
    starts inside the input or the left padding; otherwise it is dropped.
    """
    span = dilation * (kernel - 1) + 1
    numerator = size + 2 * padding - span
    if ceil_mode:
        out = -(-numerator // stride) + 1
        if (out - 1) * stride >= size + padding:
            out -= 1
    else:
        out = numerator // stride + 1
    return out


def conv2d_ref(x, weight, bias, stride, padding, dilation, groups) -> np.ndarray:
    """torch.nn.functional.conv2d with symmetric zero padding; x (N, C, H, W)."""
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    if c != cg * groups or o % groups:
        raise ValueError(
            f"conv2d_ref: input channels {c} and weight {weight.shape} do not fit groups={groups}"
        )
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    ho, wo = conv2d_output_hw((h, w), (kh, kw), stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv2d_ref: output size ({ho}, {wo}) is empty for input {x.shape}")
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # (N, C, Hp, Wp)
    wd = weight.astype(np.float64)
    og = o // groups
    y = np.zeros((n, o, ho, wo), np.float64)
    for g in range(groups):
        xg = xp[:, g * cg : (g + 1) * cg]  # (N, Cg, Hp, Wp)
        wg = wd[g * og : (g + 1) * og]  # (Og, Cg, kh, kw)
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
                cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
                window = xg[:, :, rows, cols]  # (N, Cg, Ho, Wo)
                y[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", window, wg[:, :, i, j])
    if bias is not None:
        y += np.asarray(bias, np.float64)[None, :, None, None]
    return y.astype(x.dtype)


def linear_ref(x, weight, bias) -> np.ndarray:
    """y = x @ weight.T + bias; x (N, I), weight (O, I)."""
    y = x.astype(np.float64) @ weight.astype(np.float64).T
    if bias is not None:
        y += np.asarray(bias, np.float64)[None, :]
    return y.astype(x.dtype)


def maxpool2d_ref(x, kernel, stride, padding, dilation, ceil_mode) -> np.ndarray:
    """torch max_pool2d: padding counts as -inf, output size per `pool_output_size`."""
    n, c, h, w = x.shape
    ho = pool_output_size(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    wo = pool_output_size(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    y = np.full((n, c, ho, wo), -np.inf, x.dtype)
    for oh in range(ho):
        for ow in range(wo):
            for i in range(kernel[0]):
                r = oh * stride[0] - padding[0] + i * dilation[0]
                if not 0 <= r < h:
                    continue
                for j in range(kernel[1]):
                    s = ow * stride[1] - padding[1] + j * dilation[1]
                    if 0 <= s < w:
                        y[:, :, oh, ow] = np.maximum(y[:, :, oh, ow], x[:, :, r, s])
    return y


def avgpool2d_ref(x, kernel, stride, padding, ceil_mode, count_include_pad) -> np.ndarray:
    """torch avg_pool2d, divisor rules included.

    A window is first clipped to the padded input (ceil_mode windows may run past
    it); with `count_include_pad` the divisor is that clipped window's area,
    otherwise the number of real input elements it covers.
    """
    n, c, h, w = x.shape
    ho = pool_output_size(h, kernel[0], stride[0], padding[0], 1, ceil_mode)
    wo = pool_output_size(w, kernel[1], stride[1], padding[1], 1, ceil_mode)
    xd = x.astype(np.float64)
    y = np.zeros((n, c, ho, wo), np.float64)
    for oh in range(ho):
        r0 = oh * stride[0] - padding[0]
        r1 = min(r0 + kernel[0], h + padding[0])
        for ow in range(wo):
            s0 = ow * stride[1] - padding[1]
            s1 = min(s0 + kernel[1], w + padding[1])
            rr0, rr1, ss0, ss1 = max(r0, 0), min(r1, h), max(s0, 0), min(s1, w)
            total = xd[:, :, rr0:rr1, ss0:ss1].sum(axis=(2, 3))
            if count_include_pad:
                divisor = (r1 - r0) * (s1 - s0)
            else:
                divisor = (rr1 - rr0) * (ss1 - ss0)
            y[:, :, oh, ow] = total / divisor
    return y.astype(x.dtype)


def global_avgpool_ref(x) -> np.ndarray:
    """Mean over H and W: (N, C, H, W) -> (N, C, 1, 1)."""
    return x.astype(np.float64).mean(axis=(2, 3), keepdims=True).astype(x.dtype)


def csr_to_dense(indptr, indices, values, shape) -> np.ndarray:
    """Densify a CSR matrix of `shape` (rows, cols); duplicates are summed."""
    dense = np.zeros(shape, np.result_type(values, np.float32))
    for row in range(shape[0]):
        for p in range(int(indptr[row]), int(indptr[row + 1])):
            dense[row, int(indices[p])] += values[p]
    return dense


def csr_matmul_ref(indptr, indices, values, n_cols, x) -> np.ndarray:
    """CSR (O, n_cols) @ dense x (n_cols, M) -> (O, M)."""
    dense = csr_to_dense(indptr, indices, values, (len(indptr) - 1, n_cols))
    return (dense.astype(np.float64) @ x.astype(np.float64)).astype(x.dtype)


def epilogue_ref(y, act="none", clip_range=None, residual=None) -> np.ndarray:
    """The fused epilogue every kernel applies after bias: act(y + residual).

    act: "none", "relu" (max(y, 0)), "relu6" (clip to 0..6) or "clip" (to clip_range).
    """
    out = y.astype(np.float64)
    if residual is not None:
        out = out + residual
    if act == "relu":
        out = np.maximum(out, 0.0)
    elif act == "relu6":
        out = np.clip(out, 0.0, 6.0)
    elif act == "clip":
        out = np.clip(out, clip_range[0], clip_range[1])
    elif act != "none":
        raise ValueError(f"epilogue_ref: unknown activation {act!r}")
    return out.astype(y.dtype)


def add_ref(a, b, relu=False) -> np.ndarray:
    """Elementwise a + b, optionally followed by ReLU."""
    out = a.astype(np.float64) + b
    return (np.maximum(out, 0.0) if relu else out).astype(a.dtype)


def relu_ref(x) -> np.ndarray:
    """max(x, 0)."""
    return np.maximum(x, 0).astype(x.dtype)


def clip_ref(x, lo, hi) -> np.ndarray:
    """min(max(x, lo), hi)."""
    return np.minimum(np.maximum(x, lo), hi).astype(x.dtype)


def affine_ref(x, scale, shift) -> np.ndarray:
    """Per-channel y[:, c] = x[:, c] * scale[c] + shift[c] on NCHW (or NC) input."""
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    y = x.astype(np.float64) * np.reshape(scale, bshape) + np.reshape(shift, bshape)
    return y.astype(x.dtype)
