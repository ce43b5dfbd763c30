"""Command line: ``python -m kdcore train|evaluate|predict|export|ensemble|methods``, ``datasets``/``jobs`` on the app's data
directory (``kdcore.cli_store``) and ``worker``.

Errors the user can act on (bad data, bad parameters, missing files) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from kdcore import calibration, cli_store, data, verdicts, visualize
from kdcore import worker as kdcore_worker
from kdcore.backbones import DEFAULT_BACKBONE, BackboneError
from kdcore.evaluation import evaluate_model, predict_paths
from kdcore.registry import (create_method, get_method_class, list_methods, list_trainable_methods,
                             parse_param_value)

METRIC_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AU-PRO@0.3",
                 "f1_max": "image F1-max", "aupr": "image AUPR"}


class UsageError(Exception):
    """A problem with what the user asked for; reported as one line."""


def _method_params(args: argparse.Namespace) -> dict:
    params = {"size": args.size, "backbone": args.backbone, "weights": args.weights,
              "device": args.device, "seed": args.seed}
    if args.epochs is not None:
        params["epochs"] = args.epochs
    if args.batch_size is not None:
        params["batch_size"] = args.batch_size
    params.update(parse_settings(args.set))
    return params


def parse_settings(items: list[str] | None) -> dict:
    """``--set KEY=VALUE`` items as parameters; values are JSON where they parse as JSON, else text."""
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got '{item}'")
        params[key.replace("-", "_")] = parse_param_value(value)
    return params


def cmd_train(args: argparse.Namespace) -> int:
    method = create_method(args.method, **_method_params(args))
    dataset = data.load_dataset(args.data, holdout_fraction=args.holdout)
    print(dataset.summary())
    for path, reason in dataset.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)

    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        if stop_requested:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        stop_requested = True
        tqdm.write("stopping after this step; the best model so far will be saved (Ctrl-C again to abort)")

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    bar = tqdm(total=None, unit="step", dynamic_ncols=True, disable=args.quiet)

    def on_progress(p):
        bar.total = p.total_steps
        bar.n = p.step
        postfix = {"epoch": f"{p.epoch}/{p.epochs}", "loss": f"{p.loss:.4f}"}
        if p.holdout_score is not None:
            postfix["holdout"] = f"{p.holdout_score:.4g}"
        bar.set_postfix(postfix, refresh=True)

    try:
        method.fit(dataset, progress=on_progress, should_stop=lambda: stop_requested)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous_handler)
    out = method.save(args.out)
    info = method.training_info
    print(f"saved {out} ({args.method}, best epoch {info['best_epoch']}/{info['epochs_run']}, "
          f"{info['seconds']:.1f} s, threshold {method.threshold['value']:.4g})")
    return 0


def _load_model(args: argparse.Namespace):
    from kdcore.methods.base import load
    method = load(args.model, device=args.device)
    method.config.precision = args.precision
    return method


def _format_metric(value) -> str:
    return "n/a (no masks)" if value is None else f"{value:.4f}"


def cmd_evaluate(args: argparse.Namespace) -> int:
    method = _load_model(args)
    dataset = data.load_dataset(args.data)
    if dataset.test:
        with tqdm(total=len(dataset.test), unit="img", disable=args.quiet) as bar:
            result = evaluate_model(method, dataset, on_chunk=lambda done: bar.update(done - bar.n))
        print(f"{method.name} on {dataset.root}: {result['n_images']} images, {result['n_defective']} defective")
    elif args.synthetic:  # a plain folder of normal images: the synthetic check is all there is
        result = {key: None for key in (*METRIC_LABELS, "f1_all_defective", "n_images", "n_defective")}
        print(f"{method.name} on {dataset.root}: no labelled test images")
    else:
        raise data.DataError(f"{dataset.root} has no test images to evaluate on (expected test/good and "
                             "test/<defect>); --synthetic scores the model on synthetic defects instead")
    if args.synthetic:
        from kdcore.synthetic_check import synthetic_check

        result.update(synthetic_check(method, dataset))
        print(f"  synthetic defects on {result['synthetic_n_images'] // 2} hold-out normals: image AUROC "
              f"{_format_metric(result['synthetic_image_auroc'])}, pixel AUROC "
              f"{_format_metric(result['synthetic_pixel_auroc'])}, AU-PRO {_format_metric(result['synthetic_aupro'])}")
    if not dataset.test:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    for key, label in METRIC_LABELS.items():
        line = f"  {label:<13} {_format_metric(result[key])}"
        if key == "f1_max":
            line += f"  (calling everything defective: {result['f1_all_defective']:.4f})"
        print(line)
    for defect, value in result.get("per_defect", {}).items():
        pixel = result.get("per_defect_pixel", {}).get(defect)
        localization = result.get("per_defect_localization", {}).get(defect)
        print(f"  image AUROC, {defect} vs good: {value:.4f}"
              + (f"   pixel AUROC: {pixel:.4f}" if pixel is not None else "")
              + (f"   in-image localisation: {localization:.4f}" if localization is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _expand_paths(items: list[str]) -> list[Path]:
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in data.IMAGE_EXTENSIONS)
        elif path.is_file():
            paths.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}")
    return paths


def _readable(paths: list[Path]) -> list[Path]:
    usable = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
            usable.append(path)
        except Exception as exc:  # any decoder error means the same thing to the user
            print(f"skipped {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return usable


def cmd_predict(args: argparse.Namespace) -> int:
    method = _load_model(args)
    paths = _readable(_expand_paths(args.paths))
    if not paths:
        raise UsageError("no readable images among the given paths")
    with tqdm(total=len(paths), unit="img", disable=args.quiet) as bar:
        maps, scores = predict_paths(method, paths, on_chunk=lambda done: bar.update(done - bar.n))
    verdicts.report(paths, scores, method.threshold["value"], args.csv, f" ({method.threshold['mode']})")
    if args.heatmaps:
        _write_heatmaps(method, paths, maps, Path(args.heatmaps))
    return 0


def _write_heatmaps(method, paths: list[Path], maps: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cal = method.calibration
    for path, anomaly_map in zip(paths, maps):
        shown = calibration.normalize(anomaly_map, method.threshold["value"], cal["min"], cal["max"])
        image = data.read_image(path, method.config.size)
        Image.fromarray(visualize.overlay(image, shown)).save(folder / f"{path.stem}_heatmap.png")


def cmd_export(args: argparse.Namespace) -> int:
    from kdcore.export import export_bundle

    out = export_bundle(args.model, args.out, format=args.format, batch=args.batch)
    print(f"wrote {out} (check it with: python {out / 'predict.py'} --check)")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from kdcore.methods.base import load

    data_path = args.data
    if data_path is None:  # the dataset the first member was trained on, when it is on this machine
        data_path = load(args.models[0], device="cpu").training_info.get("dataset")
        if not data_path or not Path(data_path).is_dir():
            raise UsageError(f"the members' dataset ({data_path or 'unknown'}) is not here: give it with --data")
    dataset = data.load_dataset(data_path)
    method = create_method("ensemble", members=args.models, device=args.device).fit(dataset)
    out = method.save(args.out)
    print(f"saved {out} (ensemble of {', '.join(spec['method'] for spec in method.config.member_specs)}, "
          f"threshold {method.threshold['value']:.4g})")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for name in list_methods():
        print(f"{name:<10} {get_method_class(name).summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kdcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a method on the normal images of a dataset")
    train.add_argument("--method", required=True, help=f"one of: {', '.join(list_trainable_methods())}")
    train.add_argument("--data", required=True, help="MVTec-layout folder or a plain folder of normal images")
    train.add_argument("--out", required=True, help="model file to write")
    train.add_argument("--size", type=int, default=256, help="square input size (multiple of 32)")
    train.add_argument("--epochs", type=int, help="default: the method's own")
    train.add_argument("--batch-size", type=int, help="default: the method's own")
    train.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm CNN with features_only support")
    train.add_argument("--weights", default="default", help="default|imagenet|none|PATH to a state dict")
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--holdout", type=float, default=0.1, help="fraction of normal images held out")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="method parameter, e.g. --set lr=0.1")
    train.set_defaults(run=cmd_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a model on a dataset's labelled test split")
    evaluate.add_argument("model")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--json", help="also write the metrics as JSON here")
    evaluate.add_argument("--synthetic", action="store_true",
                          help="also score the model on seeded synthetic defects made from its dataset's hold-out "
                               "normals (synthetic_image_auroc, synthetic_pixel_auroc, synthetic_aupro)")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.set_defaults(run=cmd_evaluate)

    predict = sub.add_parser("predict", help="score images or folders with a model's threshold")
    predict.add_argument("model")
    predict.add_argument("paths", nargs="+")
    predict.add_argument("--csv", help="write path,score,verdict rows here instead of printing them")
    predict.add_argument("--heatmaps", help="folder for heatmap overlays")
    predict.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    predict.set_defaults(run=cmd_predict)

    export = sub.add_parser("export", help="write a bundle that runs a model with onnxruntime alone")
    export.add_argument("model", help="saved model file")
    export.add_argument("--out", required=True, help="new (or empty) folder for the bundle")
    export.add_argument("--format", default="onnx", choices=["onnx", "openvino"])
    export.add_argument("--batch", type=int, help="fixed batch size of the graph (default: any)")
    export.set_defaults(run=cmd_export)

    ensemble = sub.add_parser("ensemble", help="combine two or more trained models of one dataset into one model")
    ensemble.add_argument("models", nargs="+", metavar="MODEL")
    ensemble.add_argument("--out", required=True, help="model file to write")
    ensemble.add_argument("--data", help="the members' dataset (default: where the first member was trained)")
    ensemble.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ensemble.set_defaults(run=cmd_ensemble)

    methods = sub.add_parser("methods", help="list the registered methods")
    methods.set_defaults(run=cmd_methods)

    cli_store.add_parsers(sub)

    worker = sub.add_parser("worker", help="run the web app's queued training and evaluation jobs")
    kdcore_worker.add_arguments(worker)
    worker.set_defaults(run=kdcore_worker.command)

    for command in (train, evaluate, predict):
        command.add_argument("--quiet", action="store_true", help="no progress bar")
    for command in (evaluate, predict):
        command.add_argument("--precision", default="auto", choices=["auto", "fp32"],
                             help="auto: bfloat16 where the hardware has it natively; fp32: never")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, data.DataError, BackboneError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
