"""Speed of each method's network at one input size: inference and training step, CPU and (if present) CUDA.

    python -m bench.speed [--methods stpm rd] [--size 256] [--repeats 5] [--out bench/results] [--profile] [--bundle]

Inference is timed from a normalised image tensor to maps and scores (``predict``), at batch 32 (throughput)
and batch 1 (latency); a training step is one ``training_step`` at the method's batch size. Each figure is
the median of ``--repeats`` runs after a warm-up. Untrained networks are timed: speed does not depend on weights.
``--profile`` adds, per method, the operators that take the most time in one batch-32 inference and one
training step (``torch.profiler``), to show where the remaining time goes. ``--bundle`` also exports each method
as a deployment bundle (``kdcore.export``) and times its ONNX graph with onnxruntime on the CPU, from uint8
pixels to maps and scores (fp32), beside kdcore's torch path (which uses bfloat16 where the CPU has it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import kdcore
from kdcore.registry import list_trainable_methods


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocator, kernels, autotuning
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Weights do not change speed: US's teacher, distilled before the students train, gets a single step here.
SPEED_ONLY_PARAMS = {"us": {"teacher_steps": 1}}


def top_operators(fn, device: torch.device, rows: int = 8) -> str:
    """The ``rows`` operators with the most self time in one call of ``fn``, as a text table."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=40)


def prepare_for_timing(method) -> Callable[[torch.Tensor], float] | None:
    """Build an untrained method so that ``predict`` and training steps can be timed; returns the step (None for
    a method with nothing to train, such as ``teacher_knn``)."""
    size = method.config.size
    method._build(method.config.weights)
    method.setup_training(torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8))
    # predict() refuses unfitted models; a placeholder calibration is enough to time the network.
    method.calibration = {"placeholder": True}
    if not method.trains:
        return None
    optimizers = method.configure_optimizers()

    def step(x: torch.Tensor) -> float:
        method.net.train()
        with method._autocast(training=True):
            return method.training_step(x, optimizers)

    return step


def measure(name: str, size: int, device: str, repeats: int, profile: bool = False) -> tuple[dict, "kdcore.AnomalyMethod"]:
    """The timings of one method on one device, and the (untrained) method that was timed."""
    method = kdcore.create_method(name, size=size, device=device, **SPEED_ONLY_PARAMS.get(name, {}))
    step_on = prepare_for_timing(method)
    dev = method.device
    batch32 = torch.randn(32, 3, size, size, device=dev)
    batch1 = batch32[:1].clone()
    train_batch = torch.randn(method.config.batch_size, 3, size, size, device=dev)

    def train_step():
        step_on(train_batch)

    # Training steps first: they give BatchNorm running statistics, without which an untrained student's
    # activations drift into denormal floats and inference times measure the CPU's denormal penalty instead.
    step = _median_seconds(train_step, repeats, dev) if step_on is not None else None
    throughput = 32 / _median_seconds(lambda: method.predict(batch32, 32), repeats, dev)
    latency = _median_seconds(lambda: method.predict(batch1, 1), repeats, dev)
    if profile:
        print(f"\n{name} on {dev.type}, inference at batch 32:\n" + top_operators(lambda: method.predict(batch32, 32), dev))
        if step_on is not None:
            print(f"{name} on {dev.type}, training step at batch {method.config.batch_size}:\n" +
                  top_operators(train_step, dev), flush=True)
    return {"method": name, "device": dev.type, "size": size, "images_per_second_b32": round(throughput, 2),
            "latency_ms_b1": round(latency * 1000, 1), "train_step_seconds": None if step is None else round(step, 3),
            "train_batch_size": method.config.batch_size, "threads": torch.get_num_threads()}, method


def measure_bundle(method, repeats: int) -> dict:
    """onnxruntime throughput (batch 32) and latency (batch 1) of the method's exported bundle."""
    import numpy as np
    import onnxruntime

    from kdcore.export import export_bundle

    size = method.config.size
    method.set_threshold(0.0)
    with tempfile.TemporaryDirectory() as folder:
        bundle = export_bundle(method.save(Path(folder) / "model.pt"), Path(folder) / "bundle")
        session = onnxruntime.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (32, size, size, 3), dtype=np.uint8)
    boxes = np.tile(np.array([[0, 0, size, size]], dtype=np.int64), (32, 1))
    cpu = torch.device("cpu")
    throughput = 32 / _median_seconds(lambda: session.run(None, {"image": images, "box": boxes}), repeats, cpu)
    latency = _median_seconds(lambda: session.run(None, {"image": images[:1], "box": boxes[:1]}), repeats, cpu)
    return {"onnx_images_per_second_b32": round(throughput, 2), "onnx_latency_ms_b1": round(latency * 1000, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list_trainable_methods())
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--profile", action="store_true", help="print the costliest operators per method")
    parser.add_argument("--bundle", action="store_true", help="also time each method's ONNX bundle (CPU)")
    args = parser.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    bundle_header = " ONNX img/s (b32) | ONNX latency ms (b1) |" if args.bundle else ""
    print(f"| method | device | img/s (b32) | latency ms (b1) | train step s (batch) |{bundle_header}\n"
          f"|---|---|---|---|---|{'---|---|' if args.bundle else ''}")
    for device in devices:
        for name in args.methods:
            row, method = measure(name, args.size, device, args.repeats, args.profile)
            line = (f"| {name} | {device} | {row['images_per_second_b32']} | {row['latency_ms_b1']} | "
                    f"{row['train_step_seconds']} ({row['train_batch_size']}) |")
            if args.bundle and device == "cpu":
                row.update(measure_bundle(method, args.repeats))
                line += f" {row['onnx_images_per_second_b32']} | {row['onnx_latency_ms_b1']} |"
            rows.append(row)
            print(line, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed_{args.size}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
