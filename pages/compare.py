"""Compare: one image, two to five models side by side. Thresholds only recolour maps computed once per model."""
import plotly.graph_objects as go
import streamlit as st

import ui
from kdcore import data, heatmaps, image_refs, scoring, thresholds, verdicts
from kdcore.store import StoreError

MAX_MODELS = 5
HOVER_CELLS = 64  # the detail view's hover grid per side: enough to read scores, small enough to send quickly

store = ui.get_store()
st.title("Compare")
st.caption("Where do models disagree? Each column shows one model's heatmap over the same image: the white "
           "outline is the region above that model's threshold, magenta the ground truth when the image has one.")


def step(key: str, delta: int, count: int) -> None:
    st.session_state[key] = (st.session_state.get(key, 0) + delta) % count


def browse(images, key: str, url_key: str):
    """Previous/next buttons and a list over ``images``; the index lives in the URL under ``url_key`` (reload,
    shared link)."""
    wanted = st.query_params.get(url_key, "")
    if key not in st.session_state:
        st.session_state[key] = int(wanted) if wanted.isdigit() else 0
    st.session_state[key] = min(st.session_state[key], len(images) - 1)  # images may have been deleted since
    back, choice, forward = st.columns([1.2, 6, 1.2], vertical_alignment="bottom")
    back.button("Previous", icon=":material/chevron_left:", on_click=step, args=(key, -1, len(images)),
                width="stretch")
    forward.button("Next", icon=":material/chevron_right:", on_click=step, args=(key, 1, len(images)),
                   width="stretch")
    index = choice.selectbox("Test image", range(len(images)), key=key,
                             format_func=lambda i: f"{i + 1}/{len(images)} · {images[i].defect} · {images[i].name}")
    st.query_params[url_key] = str(index)
    return images[index]


def pick_dataset(datasets):
    if "dataset" not in st.query_params and st.query_params.get("model", "").isdigit():
        # Opened from a model (Models page link): its dataset, not the first one.
        try:
            linked = store.get_model(int(st.query_params["model"]))
        except StoreError:  # deleted since the link was made
            linked = None
        if linked is not None and linked.dataset_id is not None:
            st.query_params["dataset"] = str(linked.dataset_id)
    return ui.pick_from_url("Dataset", datasets, "dataset", lambda d: d.name)


def dataset_image():
    """A test image of a dataset, with previous/next buttons, and the dataset's id; None when there is none."""
    datasets = [d for d in store.list_datasets() if any(split == "test" for split, _ in store.dataset_counts(d.id))]
    if not datasets:
        st.info("No dataset has test images yet: upload an image, or add labelled test images on the Datasets page.")
        return None, None
    dataset = pick_dataset(datasets)
    return browse(image_refs.dataset_images(store, dataset.id), f"compare_image_{dataset.id}", "image"), dataset.id


def synthetic_image(models):
    """One of the synthetic defects a dataset's models were checked on (made from its hold-out normals)."""
    trained_on = {m.dataset_id for m in models}
    datasets = [d for d in store.list_datasets() if d.id in trained_on]
    if not datasets:
        st.info("Synthetic defects are made from a dataset's hold-out normals once a model is trained on it.")
        return None, None
    dataset = pick_dataset(datasets)
    newest = next(m for m in models if m.dataset_id == dataset.id)
    size, resize = newest.params.get("size", 256), newest.params.get("resize", "letterbox")
    with st.spinner("Making the synthetic defects (once per dataset)…"):
        images = image_refs.synthetic_images(store, dataset.id, size, resize)
    if not images:
        st.info(f"'{dataset.name}' has no hold-out normals to make synthetic defects from.")
        return None, None
    st.caption(f"The synthetic-defect check's images ({len(images)}, made at {size} px from the hold-out normals "
               "never trained on): texture patches, cut-paste, brightness changes and scratches, each with its "
               "mask. The models' synthetic AUROCs were measured on these, against the normals themselves.")
    return browse(images, f"compare_synthetic_{dataset.id}", "synthetic"), dataset.id


def uploaded_image():
    file = st.file_uploader("An image", type=ui.IMAGE_TYPES, key="compare_upload")
    if file is None:
        return None, None
    images, problems = image_refs.upload_images(store, [(file.name, file.getvalue())])
    for name, why in problems:
        st.error(f"{name}: {why}")
    return (images[0] if images else None), None


def default_models(models, dataset_id):
    """The models in the URL (?models=3,5), else the newest trained on the image's dataset (else the newest of
    all), at most MAX_MODELS."""
    known = {m.id for m in models}
    listed = [int(i) for i in st.query_params.get("models", "").split(",") if i.isdigit() and int(i) in known]
    if listed:
        return listed[:MAX_MODELS]
    own = [m for m in models if m.dataset_id == dataset_id]
    return [m.id for m in (own or models)[:MAX_MODELS]]


def slider_key(model) -> str:
    return f"compare_threshold_{model.id}"


def follow(moved, models) -> None:
    """With sync on, move every other threshold to the moved one's position on its own normalised scale."""
    if not st.session_state.get("compare_sync"):
        return
    position = thresholds.to_normalized(st.session_state[slider_key(moved)], moved)
    for model in models:
        low, high, _ = thresholds.threshold_range(model)
        st.session_state[slider_key(model)] = min(max(thresholds.from_normalized(position, model), low), high)


def reset(models) -> None:
    for model in models:
        st.session_state[slider_key(model)] = thresholds.saved_threshold(model)


def threshold_slider(model, models) -> float:
    low, high, step = thresholds.threshold_range(model)
    key = slider_key(model)
    # Clamped: a saved threshold may have moved the range since this session last set the slider.
    st.session_state[key] = min(max(st.session_state.get(key, thresholds.saved_threshold(model)), low), high)
    threshold = st.slider("Threshold", low, high, key=key, step=step, format="%.4g",
                          on_change=follow, args=(model, models))
    st.caption(f"normalised {thresholds.to_normalized(threshold, model):.2f} · saved "
               f"{thresholds.saved_threshold(model):.4g}")
    return threshold


def model_column(model, models, image, picture, mask, score) -> tuple:
    """One model's column; returns its overlay and its map at the display size, for the detail view."""
    st.markdown(f"**#{model.id} {model.method}** · {model.params['size']} px", help=ui.model_label(model))
    if evidence := evidence_line(model.metrics or {}):
        st.caption(evidence)
    image_slot, verdict_slot = st.empty(), st.empty()
    threshold = threshold_slider(model, models)  # drawn below the picture, but needed to draw it
    anomaly_map = heatmaps.resize_map(scoring.load_map(store, model, image), picture.shape[0])
    overlay = heatmaps.render(picture, anomaly_map, threshold, model, mask)
    image_slot.image(overlay, width="stretch")
    verdict_slot.markdown(f"Score **{score:.4g}** &nbsp; {ui.verdict_badge(verdicts.verdict(score, threshold))}")
    return overlay, anomaly_map


def evidence_line(metrics: dict) -> str:
    """The model's evaluation in one line: real test images first, synthetic defects otherwise."""
    for prefix, where in (("", "test set"), ("synthetic_", "synthetic defects")):
        values = [metrics.get(f"{prefix}{key}") for key in ("image_auroc", "pixel_auroc")]
        if values[0] is not None:
            return f"{where}: image AUROC {values[0]:.3f}" + (f", pixel {values[1]:.3f}" if values[1] is not None else "")
    return ""


def detail_view(models, overlays, maps) -> None:
    """Plotly subplots with matched axes: zooming or panning one model zooms them all."""
    # Square pictures side by side in the page's width (about 900 px): the height that leaves no blank bands.
    figure = ui.linked_pictures(list(overlays), [f"#{m.id} {m.method}" for m in models],
                                height=900 // len(models) + 60)
    for column, anomaly_map in enumerate(maps, start=1):  # invisible, for the map value under the pointer
        factor = max(1, anomaly_map.shape[0] // HOVER_CELLS)
        grid = anomaly_map[factor // 2::factor, factor // 2::factor]
        figure.add_trace(go.Heatmap(z=grid, x0=factor // 2, dx=factor, y0=factor // 2, dy=factor, opacity=0,
                                    showscale=False, hovertemplate="x %{x}, y %{y}<br>map %{z:.4g}<extra></extra>"),
                         1, column)
    figure.update_layout(uirevision="compare")  # a threshold move redraws the pictures but keeps the zoom
    st.plotly_chart(figure, key="compare_detail", config={"scrollZoom": True})


@st.fragment
def viewer(image, models, scores) -> None:
    """Sliders and pictures: a slider move reruns only this, from the cached maps."""
    sync_col, reset_col = st.columns([3, 1], vertical_alignment="center")
    if "compare_sync" not in st.session_state:  # kept in the URL over a reload
        st.session_state.compare_sync = st.query_params.get("sync") == "1"
    sync_col.toggle("Sync thresholds", key="compare_sync", on_change=follow, args=(models[0], models),
                    help="Move all thresholds together on each model's normalised scale (its hold-out score "
                         "range, with its saved threshold at 0.5, as anomalib normalises). Switching it on "
                         "aligns every column on the first.")
    st.query_params["sync"] = "1" if st.session_state.compare_sync else "0"
    reset_col.button("Reset to saved", on_click=reset, args=(models,), width="stretch",
                     help="Put every slider back on its model's saved threshold.")
    size = max(model.params["size"] for model in models)
    picture = data.read_image(image.path, size)
    mask = data.read_mask(image.mask_path, size) if image.mask_path else None
    columns = st.columns(len(models))
    shown = []
    for column, model in zip(columns, models):
        with column:
            shown.append(model_column(model, models, image, picture, mask, scores[model.id]))
    if st.toggle("Zoomable detail view", key="compare_detail_on",
                 help="Zoom or pan one picture (drag a box, scroll, double-click to reset): all follow."):
        detail_view(models, *zip(*shown))


models = ui.trained_models()

from_dataset, from_synthetic, from_upload = "A dataset's test image", "A synthetic defect", "An uploaded image"
source = st.radio("Image", [from_dataset, from_synthetic, from_upload], horizontal=True,
                  label_visibility="collapsed", key="compare_source")
if source == from_dataset:
    image, dataset_id = dataset_image()
elif source == from_synthetic:
    image, dataset_id = synthetic_image(models)
else:
    image, dataset_id = uploaded_image()
if image is None:
    st.stop()
by_id = {model.id: model for model in models}  # ids as options: widgets may return records of an earlier run
chosen = [by_id[i] for i in st.multiselect("Models (two to five)", list(by_id), max_selections=MAX_MODELS,
                                           default=default_models(models, dataset_id),
                                           format_func=lambda i: ui.model_label(by_id[i]), key="compare_models")]
st.query_params["models"] = ",".join(str(model.id) for model in chosen)
if not chosen:
    st.stop()
if len(chosen) == 1:
    st.caption("Add a second model to compare.")
scores = {model.id: scoring.score_images(store, model, [image], ui.load_method,
                                        ui.progress_bar(ui.model_label(model)))[0] for model in chosen}
viewer(image, chosen, scores)
