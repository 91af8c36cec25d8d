"""Known GPUs: their dense peak throughput and memory, each with its source (pure data, no torch).

One table, read by the config (``cluster.gpu_type``'s allowed values), the hardware detection
(a local GPU's own name -> its entry) and the planner (step time from a FLOP count). Peaks are the
vendor datasheets' *dense* figures: NVIDIA prints the bf16 tensor-core number "with sparsity",
twice the dense one, and the dense half is what training reaches for. fp32 is the non-tensor-core
(SIMT) figure, what PyTorch's default fp32 matmul (TF32 off) runs at.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    name: str  # as a reason prints it
    bf16_tflops: float  # dense tensor-core peak
    fp32_tflops: float  # non-tensor-core peak
    memory_gb: float
    source: str


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec(
        name="H100 SXM", bf16_tflops=989, fp32_tflops=67, memory_gb=80,
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM5): 1,979 TFLOP/s bf16 with sparsity = 989 dense; "
        "67 TFLOP/s fp32",
    ),
    "h100-pcie": GpuSpec(
        name="H100 PCIe", bf16_tflops=756, fp32_tflops=51, memory_gb=80,
        source="NVIDIA H100 Tensor Core GPU datasheet (PCIe): 1,513 TFLOP/s bf16 with sparsity = 756 dense; "
        "51 TFLOP/s fp32",
    ),
    "h200": GpuSpec(
        name="H200 SXM", bf16_tflops=989, fp32_tflops=67, memory_gb=141,
        source="NVIDIA H200 Tensor Core GPU datasheet (SXM): 1,979 TFLOP/s bf16 with sparsity = 989 dense; "
        "67 TFLOP/s fp32",
    ),
    "a100-80gb": GpuSpec(
        name="A100 80GB", bf16_tflops=312, fp32_tflops=19.5, memory_gb=80,
        source="NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOP/s bf16 dense (624 with sparsity); "
        "19.5 TFLOP/s fp32",
    ),
    "a100-40gb": GpuSpec(
        name="A100 40GB", bf16_tflops=312, fp32_tflops=19.5, memory_gb=40,
        source="NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOP/s bf16 dense (624 with sparsity); "
        "19.5 TFLOP/s fp32",
    ),
    "l40s": GpuSpec(
        name="L40S", bf16_tflops=362, fp32_tflops=91.6, memory_gb=48,
        source="NVIDIA L40S datasheet: 733 TFLOP/s bf16 with sparsity = 362 dense; 91.6 TFLOP/s fp32",
    ),
    "l4": GpuSpec(
        name="L4", bf16_tflops=121, fp32_tflops=30.3, memory_gb=24,
        source="NVIDIA L4 Tensor Core GPU datasheet: 242 TFLOP/s bf16 with sparsity = 121 dense; 30.3 TFLOP/s fp32",
    ),
}


def gpu_type_of(device_name: str, memory_gb: float) -> str | None:
    """The table's key for a GPU's own name (``torch.cuda.get_device_name``), or None when unknown.

    ``NVIDIA H100 80GB HBM3`` -> h100, ``NVIDIA H100 PCIe`` -> h100-pcie, ``NVIDIA A100-SXM4-40GB``
    -> a100-40gb (an A100 without its size in the name: by its memory), ``NVIDIA L40S`` -> l40s.
    """
    name = device_name.lower().replace("-", " ")
    words = name.split()
    if "h200" in name:
        return "h200"
    if "h100" in name:
        return "h100-pcie" if "pcie" in words else "h100"
    if "a100" in name:
        return "a100-80gb" if "80gb" in name or ("40gb" not in name and memory_gb > 50) else "a100-40gb"
    if "l40s" in words:
        return "l40s"
    if "l4" in words:
        return "l4"
    return None
