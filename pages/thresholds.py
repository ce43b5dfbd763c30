"""Thresholds (QA): choose a model's threshold on evidence, see what it does to the labelled images, save it."""
import numpy as np
import plotly.graph_objects as go
import streamlit as st

import ui
from kdcore import heatmaps, scoring, thresholds

GALLERY_COLUMNS = 6
GALLERY_MAX = 24  # per kind: the worst ones; more would only slow the page
PLOT_HEIGHT = 300
COLORS = {"hold-out normal": "#7f8c8d", "test good": "#2e86de", "test defective": "#e74c3c"}

store = ui.get_store()
st.title("Thresholds")
st.caption("An image is NG when its score is above the threshold. Choose the threshold from the evidence below, "
           "then save it: the Inspect page and `python -m kdcore predict` use the saved one.")


def choose(model, labelled) -> tuple[str, float | None, float]:
    """The mode, its parameter and the threshold they give; starts from how the saved threshold was chosen."""
    modes = [thresholds.SCORE, thresholds.PERCENTILE, thresholds.MAX_FPR]
    if labelled.n_defective and labelled.n_good:
        modes.append(thresholds.F1)
    saved = model.threshold
    mode = st.radio("Choose the threshold by", modes, format_func=thresholds.MODES.get, horizontal=True,
                    index=modes.index(saved["mode"]) if saved["mode"] in modes else 0, key=f"mode_{model.id}")
    if thresholds.F1 not in modes:
        st.caption("F1-optimal needs labelled good and defective test images (add them on the Datasets page).")
    same = saved["mode"] == mode and saved.get("parameter") is not None
    if mode == thresholds.SCORE:
        parameter = st.number_input("Threshold (raw score)", value=saved["value"], format="%.6g",
                                    key=f"score_{model.id}")
    elif mode == thresholds.PERCENTILE:
        parameter = st.slider("Percentile of the hold-out normal scores", 80.0, 100.0, step=0.1,
                              value=min(max(saved["parameter"], 80.0), 100.0) if same else 99.0,
                              key=f"percentile_{model.id}")
    elif mode == thresholds.MAX_FPR:
        percent = st.slider("Maximum false-positive rate on the hold-out normals (%)", 0.0, 20.0, step=0.5,
                            value=min(saved["parameter"] * 100, 20.0) if same else 1.0, key=f"fpr_{model.id}")
        parameter = percent / 100
    else:
        parameter = None
    threshold = thresholds.choose_threshold(mode, parameter, labelled.holdout, labelled.labels, labelled.scores)
    return mode, parameter, threshold


def honesty_notes(labelled) -> None:
    if not labelled.n_defective:
        st.warning("There are no labelled defective images, so every error rate shown is for **normal images "
                   "only**: nothing here says how many defects this threshold would miss. And hold-out images "
                   "taken the same day as the training images tend to be optimistic: expect more false positives "
                   "on parts from another day. Add labelled defect images on the Datasets page.")
    if not labelled.n_good:
        st.info("No good test images: false-positive rates come from the model's hold-out normals alone.")


def rates(labelled, threshold, mode, parameter) -> None:
    holdout = thresholds.operating_point(np.zeros(len(labelled.holdout)), labelled.holdout, threshold)
    test = thresholds.operating_point(labelled.labels, labelled.scores, threshold) if len(labelled.labels) else None
    for warning in thresholds.threshold_warnings(mode, parameter, holdout, test):
        st.warning(warning)
    shown = {"FP rate, hold-out": (thresholds.Rate(holdout.fp, holdout.fp + holdout.tn),
                                   "False positives among the normal images the model never trained on (the ones "
                                   "percentile and max-FPR thresholds are chosen on)")}
    if test is not None:
        shown["FP rate, test good"] = (thresholds.Rate(test.fp, labelled.n_good), "False positives among the good "
                                                                                 "test images")
        shown["Recall"] = (thresholds.Rate(test.tp, labelled.n_defective), "Defects caught among the defective "
                                                                           "test images")
        shown["Precision"] = (thresholds.Rate(test.tp, test.tp + test.fp), "Of the images judged NG, the "
                                                                           "defective share")
    cells = st.columns(1 + len(shown))
    cells[0].metric("Threshold", f"{threshold:.4g}")
    for cell, (label, (rate, meaning)) in zip(cells[1:], shown.items()):
        cell.metric(label, percent(rate.value), help=f"{meaning}: {rate}")
        cell.caption(f"{rate.k} of {rate.n}" + (f" · 95 %: {rate.interval[0]:.0%}-{rate.interval[1]:.0%}"
                                                 if rate.n else ""))


def percent(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def histogram(labelled, threshold, saved) -> go.Figure:
    groups = {"hold-out normal": labelled.holdout, "test good": labelled.scores[labelled.labels == 0],
              "test defective": labelled.scores[labelled.labels == 1]}
    everything = np.concatenate([*groups.values(), [threshold]])
    bins = dict(start=everything.min(), end=everything.max(), size=np.ptp(everything) / 40 or 1.0)  # shared
    figure = go.Figure([go.Histogram(x=values, name=f"{name} ({len(values)})", marker_color=COLORS[name],
                                     opacity=0.65, xbins=bins) for name, values in groups.items() if len(values)])
    # Labels above the plotting area, never over the bars: left and right of their lines, so they never meet.
    figure.add_vline(x=threshold, line_color="black", annotation_text="threshold",
                     annotation=dict(yref="paper", y=1.0, yanchor="bottom", xanchor="right"))
    if saved != threshold:
        figure.add_vline(x=saved, line_dash="dot", line_color="gray", annotation_text="saved",
                         annotation=dict(yref="paper", y=1.0, yanchor="bottom", xanchor="left"))
    figure.update_layout(barmode="overlay", title="Scores", xaxis_title="image score", yaxis_title="images",
                         **layout())
    return figure


def confusion_matrix(point) -> go.Figure:
    counts = [[point.tn, point.fp], [point.fn, point.tp]]
    names = [["true OK", "false NG"], ["missed (false OK)", "true NG"]]
    figure = go.Figure(go.Heatmap(z=counts, x=["judged OK", "judged NG"], y=["good", "defective"],
                                  text=[[f"{n}<br>{c}" for n, c in zip(row_names, row)]
                                        for row_names, row in zip(names, counts)],
                                  texttemplate="%{text}", colorscale="Blues", showscale=False))
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(title="Test images at this threshold", **layout())
    return figure


def curve(x, y, point_x, point_y, title, x_title, y_title) -> go.Figure:
    figure = go.Figure(go.Scatter(x=x, y=y, mode="lines", name="curve"))
    figure.add_trace(go.Scatter(x=[point_x], y=[point_y], mode="markers", marker=dict(size=12, color="red"),
                                name="this threshold"))
    figure.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, showlegend=False, **layout())
    figure.update_xaxes(range=[-0.02, 1.02])
    figure.update_yaxes(range=[-0.02, 1.02])
    return figure


def layout() -> dict:
    return dict(height=PLOT_HEIGHT, margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.25))


def charts(labelled, threshold, saved) -> None:
    left, right = st.columns(2)
    left.plotly_chart(histogram(labelled, threshold, saved), key="histogram")
    if not len(labelled.labels):
        return
    point = thresholds.operating_point(labelled.labels, labelled.scores, threshold)
    right.plotly_chart(confusion_matrix(point), key="confusion")
    if labelled.n_defective and labelled.n_good:
        lines = thresholds.curves(labelled.labels, labelled.scores)
        left, right = st.columns(2)
        left.plotly_chart(curve(lines["fpr"], lines["tpr"], point.fpr, point.recall, "ROC", "false-positive rate",
                                "true-positive rate (recall)"), key="roc")
        right.plotly_chart(curve(lines["recall"], lines["precision"], point.recall, point.precision or 1.0,
                                 "Precision-recall", "recall", "precision"), key="pr")


def gallery(model, labelled, threshold) -> None:
    """Thumbnails of the false positives and false negatives at ``threshold``, most wrong first."""
    judged_ng = labelled.scores > threshold
    order = np.argsort(-labelled.scores)
    kinds = {"False positives (good, judged NG)": [i for i in order if judged_ng[i] and labelled.labels[i] == 0],
             "False negatives (defective, judged OK)": [i for i in order[::-1]
                                                        if not judged_ng[i] and labelled.labels[i] == 1]}
    for tab, indices in zip(st.tabs([f"{name}: {len(ix)}" for name, ix in kinds.items()]), kinds.values()):
        with tab:
            if not indices:
                st.caption("None at this threshold.")
            for row in range(0, min(len(indices), GALLERY_MAX), GALLERY_COLUMNS):
                for column, i in zip(st.columns(GALLERY_COLUMNS), indices[row:row + GALLERY_COLUMNS]):
                    image = labelled.images[i]
                    column.image(heatmaps.render_image(store, model, image, threshold), width="stretch",
                                 caption=f"{image.defect} · {labelled.scores[i]:.4g}")
                    if column.button("Enlarge", key=f"enlarge_{image.sha256}", width="stretch"):
                        ui.full_size_view(model, image, threshold, labelled.scores[i])
            if len(indices) > GALLERY_MAX:
                st.caption(f"The {GALLERY_MAX} most wrong of {len(indices)} shown.")


def save(model, mode, parameter, threshold) -> None:
    if st.button("Save threshold", type="primary", disabled=threshold == thresholds.saved_threshold(model)):
        saved = scoring.save_threshold(store, model, ui.load_method(model), threshold, mode, parameter,
                                     by=ui.current_user())
        st.session_state.threshold_saved = f"Saved for {ui.model_label(model)}: {ui.threshold_label(saved)}."
        st.rerun()


models = ui.trained_models()

model = ui.pick_from_url("Model", models, "model", ui.model_label)
if message := st.session_state.pop("threshold_saved", None):
    st.success(message)
st.markdown(f"Saved threshold: **{ui.threshold_label(model.threshold)}**")
labelled = scoring.labelled_set(store, model, ui.load_method, ui.progress_bar(ui.model_label(model)))
st.caption(f"Judged on {len(labelled.holdout)} hold-out normal images (never trained on) and "
           f"{labelled.n_good} good and {labelled.n_defective} defective test images of "
           f"'{model.dataset_name}'.")
mode, parameter, threshold = choose(model, labelled)
save(model, mode, parameter, threshold)
honesty_notes(labelled)
rates(labelled, threshold, mode, parameter)
charts(labelled, threshold, thresholds.saved_threshold(model))
if len(labelled.labels):
    st.subheader("Mistakes at this threshold")
    gallery(model, labelled, threshold)
