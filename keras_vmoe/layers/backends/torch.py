"""The torch adapter: eager dynamic shapes, one fused segment matmul.

- Exact-row dispatch beats the slot path (`sorted_beats_slots`).
- The segment matmul is one autograd function: each expert's `addmm`
  writes into its rows of one output, and the backward pass writes each
  kernel gradient into its slice of one [E, a, c] tensor.
- `stable_argsort` asks `torch.argsort` for `stable=True`: torch sorts
  are not stable unless asked.
"""

import keras
import torch

from keras_vmoe.layers.backends import BackendAdapter
from keras_vmoe.layers.backends import _int_list


class TorchAdapter(BackendAdapter):
    def sorted_beats_slots(self):
        return True

    def segment_matmul(self, rows, kernels, biases, counts):
        kernels = keras.ops.convert_to_tensor(kernels)
        biases = keras.ops.convert_to_tensor(biases)
        rows = keras.ops.convert_to_tensor(rows)
        counts = _int_list(counts)
        return _SegmentMatmul.apply(rows, kernels, biases, counts)

    def accelerator(self):
        device = keras.ops.zeros(()).device.type
        return "gpu" if device in ("cuda", "mps") else "cpu"

    def supports_grouped_matmul(self):
        return True

    def grouped_matmul_is_fast(
        self, dtype, num_rows, width_in, width_out, num_experts
    ):
        # CUTLASS grouped GEMM: bfloat16 on sm90+ with 16-byte rows.
        if keras.backend.standardize_dtype(dtype) != "bfloat16":
            return False
        if keras.ops.zeros(()).device.type != "cuda":
            return False
        major, _ = torch.cuda.get_device_capability()
        return major >= 9 and width_in % 8 == 0 and width_out % 8 == 0

    def grouped_matmul(self, rows, kernels, group_sizes):
        rows, kernels, group_sizes = (
            keras.ops.convert_to_tensor(v) for v in (rows, kernels, group_sizes)
        )
        for name, size in (("a", rows.shape[-1]), ("c", kernels.shape[-1])):
            if size * rows.element_size() % 16:
                raise ValueError(
                    "torch's grouped_mm needs rows of a multiple of 16 bytes: "
                    f"the width {name}={size} of [R, a] @ [E, a, c] in "
                    f"{rows.dtype} is not; use dispatch='sorted'. Received: "
                    f"rows.shape={tuple(rows.shape)}, "
                    f"kernels.shape={tuple(kernels.shape)}"
                )
        if rows.is_cuda and {rows.dtype, kernels.dtype} != {torch.bfloat16}:
            raise ValueError(
                "torch's grouped_mm on a GPU needs bfloat16 rows and kernels "
                "(e.g. the 'mixed_bfloat16' dtype policy); use "
                "dispatch='auto' or 'slots' here. Received: "
                f"rows.dtype={rows.dtype}, kernels.dtype={kernels.dtype}"
            )
        # Group end offsets, int32 and on the rows' device (no host read).
        # The last group runs to the end of the rows: `grouped_mm` leaves
        # rows past the last offset (and their input gradients)
        # uninitialized, while these rows only carry zero gradients.
        offsets = torch.cumsum(group_sizes, 0).to(
            device=rows.device, dtype=torch.int32
        )
        offsets[-1] = rows.shape[0]
        return torch.nn.functional.grouped_mm(rows, kernels, offs=offsets)

    def stable_argsort(self, x, axis=-1):
        x = keras.ops.convert_to_tensor(x)
        return torch.argsort(x, dim=axis, stable=True).to(torch.int32)


class _SegmentMatmul(torch.autograd.Function):
    """The torch segment matmul as one autograd function.

    `_SegmentMatmul.apply(rows, kernels, biases, sizes)`: rows [N, a]
    sorted by expert, kernels [E, a, c], biases [E, c], `sizes` a list of
    E Python ints; returns [N, c] in the result type of `rows` and
    `kernels`. Each expert's `addmm` writes straight into its rows of one
    output (no `cat` of the segments), and the backward pass writes each
    kernel gradient into its slice of one [E, a, c] tensor (autodiff
    through `unbind` would `stack` E separate gradients); the gradients
    are in the dtypes of the inputs.
    """

    @staticmethod
    def forward(ctx, rows, kernels, biases, sizes):
        ctx.dtypes = (rows.dtype, kernels.dtype, biases.dtype)
        dtype = torch.result_type(rows, kernels)
        rows, kernels, biases = (v.to(dtype) for v in (rows, kernels, biases))
        outputs = rows.new_empty((rows.shape[0], kernels.shape[-1]))
        start = 0
        for e, size in enumerate(sizes):
            if size:
                end = start + size
                torch.addmm(
                    biases[e],
                    rows[start:end],
                    kernels[e],
                    out=outputs[start:end],
                )
                start = end
        ctx.save_for_backward(rows, kernels)
        ctx.sizes = sizes
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grads):
        rows, kernels = ctx.saved_tensors
        grads = grads.contiguous()
        d_rows = d_kernels = d_biases = None
        if ctx.needs_input_grad[0]:
            d_rows = torch.empty_like(rows)
        if ctx.needs_input_grad[1]:
            d_kernels = torch.empty_like(kernels)
        if ctx.needs_input_grad[2]:
            d_biases = kernels.new_empty((kernels.shape[0], kernels.shape[-1]))
        start = 0
        for e, size in enumerate(ctx.sizes):
            if not size:
                # An expert without rows gets exact zero gradients.
                if d_kernels is not None:
                    d_kernels[e].zero_()
                if d_biases is not None:
                    d_biases[e].zero_()
                continue
            end = start + size
            g = grads[start:end]
            if d_rows is not None:
                torch.mm(g, kernels[e].t(), out=d_rows[start:end])
            if d_kernels is not None:
                torch.mm(rows[start:end].t(), g, out=d_kernels[e])
            if d_biases is not None:
                torch.sum(g, dim=0, out=d_biases[e])
            start = end
        # Gradients in the dtypes of the inputs, as autodiff of the casts
        # would give them.
        grads = [
            None if g is None else g.to(dtype)
            for g, dtype in zip((d_rows, d_kernels, d_biases), ctx.dtypes)
        ]
        return (*grads, None)
