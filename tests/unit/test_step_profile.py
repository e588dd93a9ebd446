"""bench/step_profile.py: how a profiled fused step is summed by kind of work (issue 18's MFU). The CUDA
summary is checked here on events built by hand (kernel names as CUDA 13's cuBLAS, cuDNN, bitsandbytes and
torch print them), since no GPU runs in make test; the CPU summary runs for real in test_gpu_probe's smoke."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import step_profile  # noqa: E402


@pytest.mark.parametrize(("name", "want"), [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize2x1x1_execute_segment_k_off_"
     "kernel__5x_cublas", "gemm"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),  # CUTLASS, but attention first
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, "
     "int, int)", "dequant_4bit"),
    ("void kgemm_4bit_inference_naive<__nv_bfloat16, 128, 16>(int, int, int, __nv_bfloat16*, unsigned char*)",
     "dequant_4bit"),  # bitsandbytes' 4-bit matmul: the 4-bit path, not a dense GEMM
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
     "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)", "softmax_loss"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
     "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)",
     "elementwise"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
     "copy_index"),
    ("void at::native::index_elementwise_kernel<128, 4>(long, at::native::gpu_index_kernel)", "copy_index"),
    ("Memcpy HtoD (Pageable -> Device)", "copy_index"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float> > >",
     "elementwise"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("aten::mm", "gemm"), ("aten::baddbmm", "gemm"), ("aten::index_select", "copy_index"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::as_strided", "other"),
])
def test_kernel_and_op_names_fall_in_their_kind(name: str, want: str) -> None:
    assert step_profile.category(name) == want


@dataclass
class Span:
    start: float
    end: float

    def elapsed_us(self) -> float:
        return self.end - self.start


@dataclass
class Ev:
    name: str
    start: float
    end: float
    device_type: DeviceType = DeviceType.CUDA
    self_cpu_time_total: float = 0.0

    @property
    def time_range(self) -> Span:
        return Span(self.start, self.end)


def test_cuda_summary_splits_each_step_into_kernel_time_and_idle() -> None:
    """Two profiled steps of 1,000 µs each. Kernels overlap on two streams in step 1 (busy is their union,
    not their sum), and the GPU waits on the host 400 µs in step 1 and 700 µs in step 2. Kernel time by
    kind is the sum of each kernel's own time; the matmuls' TFLOP/s is the step's FLOPs over their time."""
    gemm = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_cublas"
    add = "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16> >"
    events = [
        Ev("ProfilerStep#2", 0, 1000, DeviceType.CPU), Ev("ProfilerStep#3", 1000, 2000, DeviceType.CPU),
        Ev("aten::mm", 10, 20, DeviceType.CPU, 10.0),  # host ops are not GPU work
        Ev(gemm, 100, 500), Ev(add, 300, 600),  # step 1: busy 100-600 = 500 µs, kernel time 700
        Ev("Memcpy HtoD (Pageable -> Device)", 900, 1000),  # step 1: +100 busy
        Ev(gemm, 1100, 1300), Ev(add, 1300, 1400),  # step 2: busy 300 µs
        Ev(gemm, 5000, 6000),  # after the profiled steps (another window): left out
    ]
    s = step_profile.summarize(events, cuda=True, flops_per_step=3e9, top=2)
    assert s["steps"] == 2 and s["wall_ms"] == 1.0
    assert s["busy_ms"] == pytest.approx(0.45) and s["idle_ms"] == pytest.approx(0.55)
    assert s["busy_share"] == pytest.approx(0.45)
    assert s["kernels_per_step"] == 2.5
    assert s["ms_per_step"] == {"gemm": 0.3, "elementwise": 0.2, "copy_index": 0.05}
    assert s["share"] == {"gemm": 0.5455, "elementwise": 0.3636, "copy_index": 0.0909}
    assert s["gemm_tflops"] == pytest.approx(3e9 / 300e-6 / 1e12, rel=1e-3)  # 600 µs over 2 steps
    assert [t["name"] for t in s["top"]] == [gemm, add] and s["top"][0]["calls_per_step"] == 1.0
    assert "busy 45%" in step_profile.text("1b K=8 bf16", s) and "gemm 0.3 ms (55%)" in step_profile.text("k", s)


def test_cpu_summary_sums_each_ops_own_time() -> None:
    events = [Ev("ProfilerStep#2", 0, 1000, DeviceType.CPU, 50.0),
              Ev("aten::linear", 10, 400, DeviceType.CPU, 20.0), Ev("aten::addmm", 20, 390, DeviceType.CPU, 370.0),
              Ev("aten::mul", 500, 600, DeviceType.CPU, 100.0)]
    s = step_profile.summarize(events, cuda=False)
    assert s["busy_ms"] == pytest.approx(0.49) and s["idle_ms"] == pytest.approx(0.51)
    assert s["ms_per_step"] == {"gemm": 0.37, "elementwise": 0.1, "other": 0.02}
    assert s["gemm_tflops"] is None


def test_a_profile_without_steps_says_so() -> None:
    with pytest.raises(ValueError, match="no ProfilerStep"):
        step_profile.summarize([Ev("aten::mm", 0, 1, DeviceType.CPU)], cuda=False)
