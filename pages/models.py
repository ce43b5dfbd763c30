"""Models: every trained model with its training and hold-out numbers; evaluate one on its test split; export it
as a bundle for the line; delete."""
import json
import zipfile

import streamlit as st

import ui
from kdcore.recommend import recommend
from kdcore.store import EVALUATE, EXPORT, TRAIN, Model, StoreError

METRICS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AU-PRO",
           "f1_max": "image F1-max",
           # F1-max's baseline: what calling every test image defective scores on this test set.
           "f1_all_defective": "F1 if all NG", "aupr": "image AUPR",
           # On synthetic defects made from the hold-out normals (kdcore.synthetic_check): evidence without defects.
           "synthetic_image_auroc": "synthetic image AUROC", "synthetic_pixel_auroc": "synthetic pixel AUROC",
           "synthetic_aupro": "synthetic AU-PRO"}

store = ui.get_store()
st.title("Models")


def metric_cell(value: float | None) -> str:
    # Text, so that a model without this metric shows a dash rather than the grid's "None"; three decimals
    # in [0, 1] still sort correctly as text.
    return "–" if value is None else f"{value:.3f}"


def table_row(model: Model, metric_keys: list[str]) -> dict:
    holdout = model.calibration
    row = {"id": model.id, "method": model.method, "dataset": model.dataset_name}
    # Right after the model's name: what decides between models is on screen without scrolling.
    row.update({METRICS[key]: metric_cell((model.metrics or {}).get(key)) for key in metric_keys})
    row.update({
        "size": model.params.get("size"), "epochs": model.training.get("epochs_run"),
        "trained": ui.when(model.created_at), "training time": ui.duration(model.training.get("seconds")),
        "hold-out n": holdout["n"], "hold-out mean": holdout["mean"], "hold-out p99": holdout["quantiles"]["0.99"],
        "threshold": (model.threshold or {}).get("value"), "file MB": round(model.file_bytes / 1e6, 1),
    })
    return row


def models_table(models: list[Model]) -> None:
    # Only the metrics some model has: an image-level dataset never gets pixel columns full of dashes.
    metric_keys = [key for key in METRICS if any((model.metrics or {}).get(key) is not None for model in models)]
    numbers = {label: st.column_config.NumberColumn(format="%.4g")
               for label in ["hold-out mean", "hold-out p99", "threshold"]}
    st.dataframe([table_row(model, metric_keys) for model in models], hide_index=True, width="stretch",
                 column_config=numbers)
    if not metric_keys:
        st.caption("Metrics appear here once a model is evaluated: on labelled test images when its dataset has "
                   "them, and always on synthetic defects made from its hold-out normals.")
    elif any((model.metrics or {}).get(key) is None for model in models for key in metric_keys):
        st.caption("–: not measured, either because the model is not evaluated yet (select it below and press "
                   "Evaluate) or because its dataset has no labelled test images (or masks) for that metric.")


def details(model: Model) -> None:
    n_holdout = model.calibration["n"]
    if n_holdout < 10:
        st.warning(f"Only {n_holdout} hold-out image(s) calibrate this model, so its threshold and hold-out "
                   "statistics are rough: add more normal images (10 % are held out) and train again.")
    with st.expander("Parameters, teacher weights, training and hold-out scores"):
        left, right = st.columns(2)
        left.markdown("**Parameters**")
        left.json(model.params)
        left.markdown("**Teacher weights**")
        left.json(model.teacher_weights)
        right.markdown("**Training**")
        right.json(model.training)
        right.markdown("**Hold-out scores** (normal images never trained on)")
        right.json({k: v for k, v in model.calibration.items() if k != "scores"})
    st.caption(f"File: `{store.model_file(model)}`")


def actions(model: Model) -> None:
    blocker = store.evaluation_blocker(model)
    st.caption(blocker or store.evaluation_scope(model))
    if st.button("Evaluate", disabled=blocker is not None, type="primary"):
        job = store.enqueue_job(EVALUATE, model.method, {}, model.dataset_id, model_id=model.id)
        ui.supervise()
        st.success(f"Queued evaluation job #{job.id}.")
    if ui.confirm_delete("Delete this model…", f"Delete model #{model.id} ({model.method} on "
                         f"{model.dataset_name})? Its file is removed.", key=f"delete_model_{model.id}"):
        try:
            store.delete_model(model.id, by=ui.current_user())
            st.rerun()
        except StoreError as exc:
            st.error(str(exc))


def recommendation(model: Model, models: list[Model]) -> None:
    """Which of the selected model's dataset's models to use, with the evidence and the cost."""
    siblings = [m for m in models if m.dataset_name == model.dataset_name]
    if len(siblings) < 2:
        return
    choice = recommend(siblings)
    if choice is None:
        st.caption(f"'{model.dataset_name}' has {len(siblings)} models: evaluate them to see which one to use.")
        return
    best = choice.model
    st.info(f"**For '{model.dataset_name}', use #{best.id} {best.method}** (best on {choice.basis}: "
            f"{choice.evidence}). Cost: {best.file_bytes / 1e6:.1f} MB, trained in "
            f"{ui.duration(best.training.get('seconds'))}; `python -m bench.speed --methods {best.method}` measures "
            "its images per second here.")
    if choice.caution:
        st.warning(choice.caution)


def combine(model: Model, models: list[Model]) -> None:
    """Queue an ensemble of the selected model and others of its dataset, of the same input size."""
    partners = [m for m in models if m.dataset_id == model.dataset_id and m.id != model.id and m.dataset_id
                and m.params.get("size") == model.params.get("size")
                and m.params.get("resize") == model.params.get("resize")]
    if not partners:
        return
    with st.expander("Combine with other models (ensemble)"):
        st.caption("The ensemble averages its members' maps, each standardised on the hold-out normals; it often "
                   "beats its best member and costs the sum of their inference times. Models of the same "
                   "dataset and input size.")
        by_id = {m.id: m for m in partners}
        chosen = st.multiselect("Combine with", list(by_id), format_func=lambda i: ui.model_label(by_id[i]),
                                key=f"ensemble_with_{model.id}")
        if st.button("Queue ensemble", disabled=not chosen, key=f"ensemble_{model.id}"):
            members = [model, *(by_id[i] for i in chosen)]
            job = store.enqueue_job(TRAIN, "ensemble", {
                "members": [str(store.model_file(m)) for m in members], "size": model.params.get("size", 256)},
                model.dataset_id)
            ui.supervise()
            st.success(f"Queued job #{job.id}: an ensemble of " + ", ".join(f"#{m.id} {m.method}" for m in members)
                       + ". It appears here when done; evaluate it to compare.")


def bundle_threshold(model: Model) -> dict | None:
    """The threshold record inside the model's bundle zip, or None when there is no readable bundle."""
    try:
        with zipfile.ZipFile(store.bundle_file(model)) as archive:
            return json.loads(archive.read("manifest.json"))["threshold"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def deployment(model: Model) -> None:
    st.markdown("**Deploy**: a bundle that runs this model with onnxruntime alone (no torch), with its "
                "threshold kept outside the graph, a standalone `predict.py` and a parity check.")
    exported = bundle_threshold(model)
    current = model.threshold or {}
    exporting = any(job.active and job.model_id == model.id for job in store.list_jobs(EXPORT))
    if exported is not None:
        if exported.get("value") != current.get("value"):
            st.warning(f"This bundle holds threshold {exported['value']:.4g}; the model's is now "
                       f"{current.get('value', float('nan')):.4g}. Prepare it again to ship the new one.")
        with open(store.bundle_file(model), "rb") as fh:
            st.download_button("Download bundle", fh, file_name=f"kdcore-model-{model.id}-{model.method}.zip",
                               mime="application/zip", icon=":material/download:")
    label = "Prepare the bundle again" if exported is not None else "Prepare bundle"
    # A callback queues the job before this run, so the button is already disabled while it waits.
    st.button(label, disabled=exporting, on_click=queue_export, args=(model,),
              help="Exports to ONNX and checks it against the model (about a minute); see Export jobs below")


def queue_export(model: Model) -> None:
    job = store.enqueue_job(EXPORT, model.method, {}, model.dataset_id, model_id=model.id)
    ui.supervise()
    st.toast(f"Queued export job #{job.id}.")


models = store.list_models()
ui.rerun_when_models_change(models)  # a finished training or ensemble appears without a reload
if not models:
    st.info("No trained models yet.")
    st.page_link("pages/train.py", label="Train one on the Train page", icon=ui.ICONS["train"])
else:
    models_table(models)
    # The choice lives in the URL: a finished job adding a model no longer moves the selection to another one.
    model = ui.pick_from_url("Model", models, "model", lambda m: f"#{m.id} {m.method} on {m.dataset_name} "
                                                                 f"({ui.when(m.created_at)})")
    recommendation(model, models)
    details(model)
    actions(model)
    combine(model, models)
    deployment(model)

st.subheader("Evaluation jobs")
ui.job_panel(EVALUATE)
st.subheader("Export jobs")
ui.job_panel(EXPORT)
