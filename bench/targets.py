"""The project's performance targets, checked against a bench/run.py results file by
`python bench/report.py RESULTS --targets` (forward+backward records, "ours" against the named
implementation, all figures from the same run).

Each target: op, shape_name, batch, dtype, device type; `metric` is
  "speedup"  ours' speed-up over implementation `vs` (>= goal),
  "bw"       ours' GB/s on the case's minimal bytes as a fraction of the run's copy bandwidth (>= goal),
  "mem"      ours' peak extra memory over that of `vs` (<= goal),
  "ratio"    ours' time over the time of implementation `vs` of the same case, or of ours at shape `of`
             of the same op, batch and dtype (<= goal): an upstream gradient against upstream 1 (timed
             in the same rounds), a training step against another method's.
"""

CPU_TARGETS = [
    # the multi-level DCT-KD loss (preset paper) and the AT preset
    dict(op="dct_at_loss", shape="cifar_r32x4_r8x4", batch=64, dtype="float32", metric="speedup",
         vs="compiled_reference", goal=1.3),
    dict(op="dct_at_loss", shape="cifar_r32x4_r8x4", batch=64, dtype="float32", metric="speedup",
         vs="eager_paper", goal=6.0),
    dict(op="dct_at_loss", shape="cifar_r32x4_r8x4", batch=64, dtype="bfloat16", metric="speedup",
         vs="compiled_reference", goal=1.3),
    dict(op="dct_at_loss", shape="cifar_r32x4_r8x4", batch=64, dtype="bfloat16", metric="speedup",
         vs="eager_paper", goal=6.0),
    dict(op="dct_at_loss", shape="r50_r18", batch=16, dtype="float32", metric="speedup",
         vs="compiled_reference", goal=1.3),
    dict(op="dct_at_loss", shape="cifar_r32x4_r8x4", batch=64, dtype="float32", metric="bw", goal=0.8),
    dict(op="dct_at_loss", shape="r50_r18", batch=16, dtype="float32", metric="bw", goal=0.8),
    dict(op="at_loss", shape="cifar_r32x4_r8x4", batch=64, dtype="float32", metric="speedup",
         vs="compiled_at", goal=1.3),
    dict(op="dct2d", shape="r18_stage1_maps", batch=16, dtype="float32", metric="speedup",
         vs="eager_reference", goal=2.0),
    # the FAM layer (one spectral GEMM) against the authors' module
    dict(op="fam_layer", shape="cifar_r32x4_r8x4:256x256@8", batch=64, dtype="float32", metric="speedup",
         vs="eager_module", goal=2.0),
    dict(op="fam_layer", shape="cifar_r32x4_r8x4:256x256@8", batch=64, dtype="float32", metric="speedup",
         vs="compiled_module", goal=2.0),
    dict(op="fam_layer", shape="cifar_r32x4_r8x4:256x256@8", batch=64, dtype="float32", metric="mem",
         vs="eager_module", goal=0.5),
    dict(op="fam_layer", shape="imagenet_r34_r18:256x256@14", batch=32, dtype="float32", metric="speedup",
         vs="eager_module", goal=2.0),
    dict(op="fam_layer", shape="imagenet_r34_r18:256x256@14", batch=32, dtype="float32", metric="speedup",
         vs="compiled_module", goal=2.0),
    dict(op="fam_layer", shape="imagenet_r34_r18:256x256@14", batch=32, dtype="float32", metric="mem",
         vs="eager_module", goal=0.5),
    dict(op="fam_layer", shape="cifar_wrn40_2_wrn16_2:32x32@32", batch=64, dtype="float32", metric="speedup",
         vs="eager_module", goal=5.0),
    dict(op="fam_layer", shape="cifar_wrn40_2_wrn16_2:32x32@32", batch=64, dtype="float32", metric="mem",
         vs="eager_module", goal=0.5),
    dict(op="global_filter", shape="fam_cifar_64ch_32", batch=64, dtype="complex64", metric="bw", goal=0.7),
    # with a loss-shaped upstream gradient (an MSE's: values near 1e-7)
    dict(op="fam_layer", shape="cifar_r32x4_r8x4:256x256@8/grad=mse", batch=64, dtype="float32", metric="speedup",
         vs="eager_module", goal=2.0),
    dict(op="fam_layer", shape="imagenet_r34_r18:256x256@14/grad=mse", batch=32, dtype="float32",
         metric="speedup", vs="eager_module", goal=2.0),
    dict(op="fam_layer", shape="cifar_wrn40_2_wrn16_2:32x32@32/grad=mse", batch=64, dtype="float32",
         metric="speedup", vs="eager_module", goal=5.0),
    # FAM-KD's head (fused local attention + FrequencyAttention) against the released head, and the
    # local-attention op on its minimal bytes
    dict(op="fam_head", shape="cifar_r32x4_r8x4", batch=64, dtype="float32", metric="speedup",
         vs="eager_released", goal=5.0),
    dict(op="fam_head", shape="cifar_r32x4_r8x4", batch=64, dtype="float32", metric="speedup",
         vs="compiled_released", goal=2.0),
    dict(op="fam_head", shape="cifar_r32x4_r8x4", batch=64, dtype="float32", metric="mem",
         vs="eager_released", goal=0.25),
] + [
    dict(op="local_attention", shape=f"cifar_r32x4_r8x4:{level}", batch=64, dtype="float32", metric="bw", goal=0.6)
    for level in ("64@32", "128@16", "256@8")
] + [
    # a loss weight applied outside the fused loss costs at most 10%
    dict(op="dct_at_loss", shape="cifar_r32x4_r8x4/grad=scale0.37", batch=64, dtype="float32", metric="ratio",
         vs="ours_upstream1", goal=1.1),
    # the whole training step: FAM-KD and the DCT-KD / AT methods against KD's step
    dict(op="train_step", shape="cifar_r32x4_r8x4:fam", batch=64, dtype="float32", metric="ratio",
         of="cifar_r32x4_r8x4:kd", goal=1.3),
] + [
    dict(op="train_step", shape=f"cifar_r32x4_r8x4:{m}", batch=64, dtype="float32", metric="ratio",
         of="cifar_r32x4_r8x4:kd", goal=1.05) for m in ("at", "dct", "dct+kd", "dct-paper")
]

GPU_TARGETS = [
    dict(op="dct_at_loss", shape="r50_r18", batch=128, dtype="bfloat16", metric="bw", goal=0.8),
    dict(op="dct_at_loss", shape="r50_r18", batch=128, dtype="bfloat16", metric="speedup",
         vs="eager_paper", goal=3.5),
    dict(op="dct_at_loss", shape="r50_r18", batch=128, dtype="bfloat16", metric="speedup",
         vs="compiled_reference", goal=1.3),
    dict(op="dct_at_loss", shape="r50_r18", batch=16, dtype="bfloat16", metric="speedup",
         vs="eager_paper", goal=10.0),
]

TARGETS = {"cpu": CPU_TARGETS, "cuda": GPU_TARGETS}
