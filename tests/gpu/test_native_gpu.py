"""The native extension on one real GPU: CUDA kernels and the NCCL path (world size 1).

Skips without CUDA; fails instead when DDL_TEST_GPU=1. Written with unittest so that the GPU
check machine, which may lack pytest, runs it with `python -m unittest` (scripts/gpu-check.sh);
pytest runs it too. The bandwidth test prints a table (pytest: use -s to see it).
"""

import os
import time
import unittest
from datetime import timedelta
from typing import Any, ClassVar, Final

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import TCPStore

REQUIRED: Final = os.environ.get("DDL_TEST_GPU") == "1"
DTYPES: Final = (torch.float32, torch.float16, torch.bfloat16)
# Awkward sizes: 1 element, odd, not a multiple of the vector width, several chunks.
SIZES: Final = (1, 7, 4_099, 1_000_003)
SMALL_CHUNK: Final = 1 << 16
# Spacing of float16 subnormals: near zero a relative tolerance alone is too strict.
SUBNORMAL_STEP: Final = 2.0**-24


def setUpModule() -> None:
    if not torch.cuda.is_available():
        message = "no CUDA device"
        if REQUIRED:
            raise RuntimeError(f"DDL_TEST_GPU=1 but {message}")
        raise unittest.SkipTest(message)
    from ddl_worker import allreduce  # noqa: F401  (a build error fails here, loudly)

    if not torch.ops.ddl.has_nccl():
        message = "the extension was built without CUDA/NCCL"
        if REQUIRED:
            raise RuntimeError(f"DDL_TEST_GPU=1 but {message} (DDL_NATIVE_CUDA=1 to force it)")
        raise unittest.SkipTest(message)
    if not dist.is_initialized():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=60))
        # NCCL for CUDA tensors (DDP's own broadcasts), Gloo for the CPU side.
        dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=0, world_size=1)


def tearDownModule() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _ulp(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


class KernelTest(unittest.TestCase):
    """CUDA kernels against a float64 reference and against the CPU kernels."""

    device: ClassVar[torch.device]

    @classmethod
    def setUpClass(cls) -> None:
        cls.device = torch.device("cuda", torch.cuda.current_device())

    def test_flatten_scale_cast_matches_float64_and_cpu(self) -> None:
        g = torch.Generator().manual_seed(0)
        scale = 0.37
        for src_dtype in DTYPES:
            for dst_dtype in DTYPES:
                # 100 tensors: more than one launch's worth of segments, some empty, and
                # views that start off the vector alignment.
                sizes = torch.randint(0, 5000, (100,), generator=g).tolist()
                base = [(torch.randn(n + 1, generator=g) * 100).to(src_dtype) for n in sizes]
                srcs_cpu = [b[1:] for b in base]
                srcs = [s.to(self.device) for s in base]
                srcs = [s[1:] for s in srcs]
                total = sum(sizes) + 13  # a padded tail must come back zero
                out = torch.full((total,), 7.0, dtype=dst_dtype, device=self.device)
                torch.ops.ddl.flatten_scale_cast_(srcs, out, scale)
                expected = (torch.cat([s.double() for s in srcs_cpu]) * scale).to(dst_dtype)
                where = f"{src_dtype}->{dst_dtype}"
                got = out[: sum(sizes)].cpu()
                torch.testing.assert_close(
                    got.double(),
                    expected.double(),
                    rtol=_ulp(dst_dtype),
                    atol=1e-30,
                    msg=where,
                )
                self.assertTrue(bool((out[sum(sizes) :] == 0).all()), where)
                cpu_out = torch.empty(total, dtype=dst_dtype)
                torch.ops.ddl.flatten_scale_cast_(srcs_cpu, cpu_out, scale)
                self.assertTrue(torch.equal(out.cpu(), cpu_out), f"{where}: CPU and CUDA differ")

    def test_compress_with_error_feedback(self) -> None:
        g = torch.Generator().manual_seed(1)
        for wire in (torch.bfloat16, torch.float16):
            for size in SIZES:
                for offset in (0, 1):  # aligned (vector path) and unaligned (scalar path)
                    # Slice on the device: a copy of a CPU view would be aligned again.
                    src_base = torch.randn(size + offset, generator=g)
                    res_base = torch.randn(size + offset, generator=g) * 1e-3
                    src, residual = src_base[offset:], res_base[offset:]
                    src_gpu = src_base.to(self.device)[offset:]
                    res_gpu = res_base.to(self.device)[offset:]
                    scale = 0.25
                    y = src.double() * scale + residual.double()
                    out = torch.empty(size + offset, dtype=wire, device=self.device)[offset:]
                    torch.ops.ddl.compress_ef_(src_gpu, out, res_gpu, scale)
                    where = f"{wire} size={size} offset={offset}"
                    # One rounding to the wire format (from float32, so allow one more ulp of
                    # float32 in y), and the residual carries exactly what was lost.
                    torch.testing.assert_close(
                        out.cpu().double(),
                        y.to(wire).double(),
                        rtol=_ulp(wire),
                        atol=SUBNORMAL_STEP,
                        msg=where,
                    )
                    recon = out.cpu().double() + res_gpu.cpu().double()
                    torch.testing.assert_close(recon, y, rtol=4 * _ulp(torch.float32), atol=1e-9)
                    no_feedback = torch.empty_like(out)
                    torch.ops.ddl.compress_ef_(src_gpu, no_feedback, None, scale)
                    torch.testing.assert_close(
                        no_feedback.cpu().double(),
                        (src.double() * scale).to(wire).double(),
                        rtol=_ulp(wire),
                        atol=SUBNORMAL_STEP,
                        msg=where,
                    )

    def test_bad_arguments_are_named(self) -> None:
        x = torch.ones(8, device=self.device)
        with self.assertRaisesRegex(RuntimeError, "dst: must be float16 or bfloat16"):
            torch.ops.ddl.compress_ef_(x, torch.empty_like(x), None, 1.0)
        with self.assertRaisesRegex(RuntimeError, "srcs\\[0\\]: on cpu"):
            torch.ops.ddl.flatten_scale_cast_([torch.ones(3)], x, 1.0)

    def test_kernel_bandwidth_vs_device_copy(self) -> None:
        """Prints GB/s of each kernel next to a device-to-device copy timed in the same run."""
        n = 64 << 20  # 256 MB of float32
        f32 = torch.randn(n, device=self.device)
        other = torch.empty_like(f32)
        b16 = torch.empty(n, dtype=torch.bfloat16, device=self.device)
        residual = torch.zeros_like(f32)

        def timed(fn: Any) -> float:
            for _ in range(3):
                fn()
            torch.cuda.synchronize(self.device)
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(10):
                    fn()
                torch.cuda.synchronize(self.device)
                best = min(best, (time.perf_counter() - start) / 10)
            return best

        rows = [
            ("device-to-device copy (float32)", 8 * n, lambda: other.copy_(f32)),
            (
                "pack float32->float32 x scale",
                8 * n,
                lambda: torch.ops.ddl.flatten_scale_cast_([f32], other, 0.5),
            ),
            (
                "cast float32->bfloat16",
                6 * n,
                lambda: torch.ops.ddl.flatten_scale_cast_([f32], b16, 1.0),
            ),
            (
                "decompress bfloat16->float32",
                6 * n,
                lambda: torch.ops.ddl.flatten_scale_cast_([b16], other, 1.0),
            ),
            (
                "compress + error feedback",
                14 * n,
                lambda: torch.ops.ddl.compress_ef_(f32, b16, residual, 1.0),
            ),
        ]
        results = [(name, nbytes / timed(fn) / 1e9) for name, nbytes, fn in rows]
        copy_rate = results[0][1]
        print(f"\n{'kernel (256 MB float32 input)':<34}{'GB/s':>10}{'vs copy':>10}")
        for name, rate in results:
            print(f"{name:<34}{rate:>10.0f}{rate / copy_rate:>10.2f}")
        for name, rate in results[1:]:
            # Memory-bound kernels should stream close to copy speed; 0.3 flags a broken one.
            self.assertGreater(rate / copy_rate, 0.3, name)


class NcclPathTest(unittest.TestCase):
    """The NCCL transport and communicators with one rank: every stage but the padded pack."""

    device: ClassVar[torch.device]

    @classmethod
    def setUpClass(cls) -> None:
        cls.device = torch.device("cuda", torch.cuda.current_device())

    def test_every_grid_dtype_op_and_backend_keeps_the_data(self) -> None:
        from ddl_worker import allreduce as ar

        g = torch.Generator().manual_seed(2)
        for backend, grids in (
            ("nccl-hierarchical", ((1,), (1, 1), (1, 1, 1))),
            ("nccl-flat", ((1,),)),
        ):
            for grid in grids:
                state = ar.make_hook_state(
                    grid,
                    "Hierarchical" if backend == "nccl-hierarchical" else "Ring",
                    backend=backend,  # type: ignore[arg-type]
                    op="sum",
                    chunk_bytes=SMALL_CHUNK,
                    device=self.device,
                )
                self.assertEqual(state.backend, backend)
                for size in SIZES:
                    for dtype in DTYPES:
                        for op in ("sum", "avg"):
                            x = torch.randn(size, generator=g).to(dtype).to(self.device)
                            ours = x.clone()
                            ar.submit(state, ours, op).wait()
                            where = f"{backend} grid={grid} size={size} {dtype} {op}"
                            self.assertTrue(torch.equal(ours, x), where)

    def test_compression_rounds_and_feeds_back(self) -> None:
        from ddl_worker import allreduce as ar

        for compression, wire in (("BF16", torch.bfloat16), ("FP16", torch.float16)):
            state = ar.make_hook_state(
                (1, 1),
                "Hierarchical",
                compression,  # type: ignore[arg-type]
                backend="nccl-hierarchical",
                chunk_bytes=SMALL_CHUNK,
                device=self.device,
            )
            x = torch.randn(300_001, device=self.device)
            ours = x.clone()
            ar.submit(state, ours, "sum", residual_key=0).wait()
            self.assertTrue(torch.equal(ours, x.to(wire).float()), compression)
            residual = state.residuals[("hierarchical", 0)]
            self.assertTrue(torch.equal(ours + residual, x), f"{compression}: feedback lost")

    def test_ddp_hook_on_a_side_stream_matches_plain_gradients(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from ddl_worker import allreduce as ar

        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
        ).to(self.device)
        reference = [p.detach().clone() for p in model.parameters()]
        ddp = DistributedDataParallel(model, device_ids=[self.device.index], bucket_cap_mb=0.25)
        state = ar.make_hook_state((1, 1), "Hierarchical", "None", device=self.device)
        ddp.register_comm_hook(state, ar.hierarchical_hook)
        x = torch.randn(64, 256, device=self.device)
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            ddp(x).square().mean().backward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        plain = torch.nn.Sequential(
            torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
        ).to(self.device)
        with torch.no_grad():
            for p, r in zip(plain.parameters(), reference, strict=True):
                p.copy_(r)
        plain(x).square().mean().backward()
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            assert p.grad is not None and q.grad is not None
            torch.testing.assert_close(p.grad, q.grad)

    def test_auto_fits_both_algorithms_and_stats_have_the_tiers(self) -> None:
        from ddl_worker import allreduce as ar

        ar.reset_stats()
        state = ar.make_hook_state((1, 1, 1), "Auto", device=self.device)
        self.assertEqual(set(state.fits), {"flat", "hierarchical"})
        x = torch.randn(1 << 20, device=self.device)
        y = x.clone()
        ar.submit(state, y, "sum").wait()
        self.assertTrue(torch.equal(x, y))
        tiers = ar.stats()
        self.assertTrue({"tier0", "tier1", "tier2", "flat"} <= set(tiers), tiers)
        # One rank: reduce-scatter and all-gather copy between buffers and take time; an
        # in-place allreduce may launch nothing at all.
        self.assertGreater(tiers["tier0"][1], 0.0, tiers)

    def test_wrong_device_and_unavailable_backend_raise(self) -> None:
        from ddl_worker import allreduce as ar

        state = ar.make_hook_state((1,), "Ring", backend="nccl-flat", device=self.device)
        with self.assertRaisesRegex(RuntimeError, "tensor: this NCCL communicator"):
            ar.submit(state, torch.ones(4), "sum")
        with self.assertRaisesRegex(RuntimeError, "unavailable"):
            ar.make_hook_state((1,), backend="nccl-flat", device=torch.device("cpu"))


if __name__ == "__main__":
    unittest.main()
