"""What the pages share: the store, the job panel, and formatting. Pages keep no state of their own that matters.

All durable state lives in ``kdcore.store`` (an SQLite database and files in the data directory), so a page
reload or a second browser shows the same datasets, jobs and models. ``st.session_state`` only holds UI
details such as a pending "really delete?" question.
"""
from __future__ import annotations

import math
import threading
import time
from datetime import datetime

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from kdcore import data, heatmaps, qa_regions, thresholds, verdicts, worker
from kdcore.registry import list_trainable_methods
from kdcore.store import CANCELLED, DONE, FAILED, QUEUED, RUNNING, TRAIN, Job, Model, Store, default_data_dir

JOB_POLL_SECONDS = 2.0
# How often review pages look for new or deleted models: one cheap query, the page reruns only on a change.
MODEL_POLL_SECONDS = 5.0
FINISHED_JOBS_SHOWN = 6
REGION_CELLS = 48  # QA marks a defect region in cells of a grid this many cells across the longer side
# Material icons ship with Streamlit's font, so unlike emoji they render on machines without an emoji font.
ICONS = {"home": ":material/home:", "datasets": ":material/photo_library:", "train": ":material/model_training:",
         "models": ":material/inventory_2:", "compare": ":material/compare:", "thresholds": ":material/tune:",
         "inspect": ":material/fact_check:"}
_STATUS_ICONS = {QUEUED: ":material/schedule:", RUNNING: ":material/autorenew:", DONE: ":material/check_circle:",
                 FAILED: ":material/error:", CANCELLED: ":material/cancel:"}


@st.cache_resource(show_spinner=False)
def _store_at(root: str) -> Store:
    return Store(root)


@st.cache_resource(show_spinner=False)
def preload_engine() -> threading.Thread:
    """Import torch, timm and the methods in the background, once per server process. Pages import them only
    when they need them (the Train page's method list, a model's first run), and the first user to get there
    would wait for the imports: 3-4 s measured on the 2-core machine (``bench.page_speed``)."""
    thread = threading.Thread(target=list_trainable_methods, name="kdcore-preload", daemon=True)
    thread.start()
    return thread


def get_store() -> Store:
    """The store of ``$KDCORE_DATA_DIR`` (or ./kdcore_data), opened once per app process."""
    return _store_at(str(default_data_dir()))


def supervise() -> int | None:
    """Fail jobs whose worker died and start a worker if jobs are waiting; returns its pid (-1: starting)."""
    return worker.ensure_worker(get_store())


# ------------------------------------------------------------------------------------------- formatting
def when(timestamp: float | None) -> str:
    return "–" if timestamp is None else datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def confirm_delete(label: str, question: str, key: str) -> bool:
    """A two-step button: clicking ``label`` asks ``question``; returns True when the user says yes.

    The question stays up after "yes" (the caller reruns on success), so a refused delete can be retried.
    """
    if not st.session_state.get(key):
        if st.button(label, key=f"{key}_ask"):
            st.session_state[key] = True
            st.rerun()
        return False
    st.warning(question)
    yes, no = st.columns(2)
    if no.button("No, keep it", key=f"{key}_no", width="stretch"):
        st.session_state[key] = False
        st.rerun()
    return yes.button("Yes, delete", key=f"{key}_yes", type="primary", width="stretch")


# ------------------------------------------------------------------------------------------- jobs
def job_panel(kind: str) -> None:
    """Live list of the jobs of ``kind``: polls the store while any is queued or running, stops when none is."""
    store = get_store()
    polling = store.count_active_jobs(kind) > 0

    @st.fragment(run_every=JOB_POLL_SECONDS if polling else None)
    def panel() -> None:
        pid = supervise()  # also restarts a worker that stopped while jobs still wait
        jobs = store.list_jobs(kind)
        if polling and not any(job.active for job in jobs):
            st.rerun()  # the last job just ended: refresh the whole page (model lists) and stop polling
        st.caption("Worker: " + ("not running (it starts when a job is queued)" if pid is None else
                                 "starting…" if pid < 0 else f"running, pid {pid}"))
        if not jobs:
            st.caption("No jobs yet.")
        active = [job for job in jobs if job.active]
        finished = [job for job in jobs if not job.active][:FINISHED_JOBS_SHOWN]
        for job in active + finished:
            _job_card(store, job)

    panel()


def _run_again(store: Store, job: Job) -> None:
    again = store.enqueue_job(job.kind, job.method, job.params, job.dataset_id, model_id=None if job.kind == TRAIN
                              else job.model_id)
    supervise()
    st.toast(f"Queued job #{again.id}: {job.kind} {job.method} with {job.params or 'its defaults'}.")


def _job_card(store: Store, job: Job) -> None:
    title = f"{_STATUS_ICONS[job.status]} **#{job.id} {job.method}** on *{job.dataset_name}* · {job.status}"
    with st.container(border=True, key=f"job_{job.id}"):
        head, button = st.columns([5, 1], vertical_alignment="center")
        head.markdown(title)
        if job.active:
            # A callback runs before the rerun it triggers, so this very rerun already shows the cancellation.
            button.button("Cancel", key=f"cancel_{job.id}", width="stretch", disabled=job.cancel_requested,
                          on_click=store.request_cancel, args=(job.id,))
        if job.executor:
            st.caption(f"Runs on: {job.executor}" + (f" · node {job.node}" if job.node else ""))
        if job.status == QUEUED:
            st.caption(f"Waiting: place {store.queue_position(job)} in the queue of its kind "
                       f"(queued {when(job.created_at)}).")
        elif job.status == RUNNING:
            _running(store, job)
        elif job.status == DONE:
            st.caption(f"{job.message} · took {duration(job.finished_at - job.started_at)} · {when(job.finished_at)}")
            if job.kind == TRAIN:
                st.page_link("pages/models.py", label="See it on the Models page", icon=ICONS["models"])
        elif job.status == FAILED:
            st.error(job.message or "failed")
        else:
            st.caption(job.message)
        if job.status in (FAILED, CANCELLED) and job.dataset_id is not None:
            st.button("Run again with these settings", key=f"rerun_{job.id}", on_click=_run_again, args=(store, job))
        if job.status != QUEUED:
            with st.expander("Loss curve and log" if job.kind == TRAIN else "Log", expanded=job.status == RUNNING):
                if job.kind == TRAIN:
                    _loss_chart(store, job)
                st.code(store.job_log_tail(job.id) or "(no log yet)", language=None, wrap_lines=True)


def _running(store: Store, job: Job) -> None:
    parts = [job.stage]
    if job.epochs:
        parts.append(f"epoch {job.epoch}/{job.epochs}")
    if job.loss is not None:
        parts.append(f"loss {job.loss:.4g}")
    parts.append(f"ETA {duration(job.eta_seconds)}")
    if job.cancel_requested:
        parts.append("stopping…")
    st.progress(min(max(job.progress, 0.0), 1.0), text=" · ".join(parts))
    silent = time.time() - (job.heartbeat_at or job.started_at)
    if silent > 3 * worker.HEARTBEAT_SECONDS:
        st.warning(f"No heartbeat from the worker for {duration(silent)}; it may be stuck.")


def _loss_chart(store: Store, job: Job) -> None:
    points = store.job_points(job.id)
    steps = [p for p in points if p["holdout_score"] is None]
    epochs = [p for p in points if p["holdout_score"] is not None]
    if not steps:
        return
    # Markers too while the curve is short: a single point drawn as a line is invisible.
    figure = go.Figure(go.Scatter(x=[p["step"] for p in steps], y=[p["loss"] for p in steps],
                                  mode="lines" if len(steps) > 30 else "lines+markers", name="training loss"))
    if epochs:
        figure.add_trace(go.Scatter(x=[p["step"] for p in epochs], y=[p["holdout_score"] for p in epochs],
                                    mode="lines+markers", name="mean hold-out score", yaxis="y2"))
    figure.update_layout(height=240, margin=dict(l=10, r=10, t=10, b=10), xaxis_title="step",
                         yaxis_title="loss", yaxis2=dict(title="hold-out score", overlaying="y", side="right"),
                         legend=dict(orientation="h", y=1.15))
    st.plotly_chart(figure, key=f"loss_{job.id}")


# ------------------------------------------------------------------------------------------- review pages
IMAGE_TYPES = sorted(ext.lstrip(".") for ext in data.IMAGE_EXTENSIONS)  # for file uploaders of images
@st.cache_resource(max_entries=8, show_spinner="Loading the model…")
def _loaded_method(model_id: int, created_at: float, path: str):
    # created_at is part of the key: SQLite may give a deleted model's id to a new one.
    from kdcore import load
    return load(path)


def load_method(model: Model):
    """The model, loaded once per app process and shared by all sessions (``kdcore.scoring`` locks inference).

    A model file that cannot be loaded (damaged, removed) stops the page with one line saying which and why.
    """
    try:
        return _loaded_method(model.id, model.created_at, str(get_store().model_file(model)))
    except (ValueError, FileNotFoundError) as exc:
        st.error(f"Model #{model.id} ({model.method}) cannot be loaded: {exc}. Train it again, or delete it on "
                 "the Models page.")
        st.stop()


def trained_models() -> list[Model]:
    """All models, newest first; with none, says where to get one and stops the page. The page reruns by
    itself when a model appears or goes (a training finishes, another user deletes one)."""
    models = get_store().list_models()
    rerun_when_models_change(models)
    if not models:
        st.info("No trained models yet.")
        st.page_link("pages/train.py", label="Train one on the Train page", icon=ICONS["train"])
        st.stop()
    return models


def rerun_when_models_change(shown: list[Model]) -> None:
    """Rerun the page when the store's models differ from ``shown`` (polled every ``MODEL_POLL_SECONDS``)."""
    _watch_models([model.id for model in shown])


@st.fragment(run_every=MODEL_POLL_SECONDS)
def _watch_models(shown_ids: list[int]) -> None:
    if [model.id for model in get_store().list_models()] != shown_ids:
        st.rerun(scope="app")


def model_label(model: Model) -> str:
    return f"#{model.id} {model.method} on {model.dataset_name} ({model.params.get('size')} px)"


def threshold_label(threshold: dict) -> str:
    """E.g. "6.813 (percentile 99 of the hold-out normals, set 2026-11-23 by qa@plant.example)"."""
    by = f" by {threshold['by']}" if threshold.get("by") else ""
    return f"{threshold['value']:.4g} ({thresholds.describe_threshold(threshold)}, set {threshold['date'][:10]}{by})"


# ------------------------------------------------------------------------------------------- login
def login_configured() -> bool:
    """Whether ``.streamlit/secrets.toml`` configures Streamlit's OIDC login (an ``[auth]`` section)."""
    try:
        return "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets file, or an unreadable one: no login configured
        return False


def logged_in() -> bool:
    return bool(st.user.get("is_logged_in", False))


def current_user() -> str | None:
    """The logged-in user's e-mail (or name), recorded with what they save; None without a login."""
    if not login_configured() or not logged_in():
        return None
    return st.user.get("email") or st.user.get("name")


def verdict_badge(verdict: str) -> str:
    """Markdown for an OK/NG badge, to put in a line of text."""
    if verdict == verdicts.NG:
        return ":red-badge[:material/error: NG]"
    return ":green-badge[:material/check_circle: OK]"


def pick_from_url(label: str, items: list, param: str, format_func) -> object:
    """A selectbox of records (with an ``id``) whose choice lives in the URL (?param=ID), so a reload or a
    shared link keeps it.

    The options are the ids, not the records: a selectbox may hand back the record it returned on an earlier
    run, which would be stale after a change (e.g. a model's threshold just saved).
    """
    by_id = {item.id: item for item in items}
    wanted = st.query_params.get(param, "")
    ids = list(by_id)
    index = ids.index(int(wanted)) if wanted.isdigit() and int(wanted) in by_id else 0
    choice = st.selectbox(label, ids, index=index, format_func=lambda item_id: format_func(by_id[item_id]))
    st.query_params[param] = str(choice)
    return by_id[choice]


def linked_pictures(pictures: list, titles: list[str], height: int) -> go.Figure:
    """Pictures side by side in one plotly figure whose axes are matched: zooming or panning one moves all."""
    figure = make_subplots(1, len(pictures), shared_xaxes=True, shared_yaxes=True, horizontal_spacing=0.01,
                           subplot_titles=titles)
    for column, picture in enumerate(pictures, start=1):
        figure.add_trace(go.Image(source=heatmaps.png_data_url(picture), hoverinfo="skip"), 1, column)
    figure.update_xaxes(matches="x", showticklabels=False)
    figure.update_yaxes(matches="y", showticklabels=False, autorange="reversed", scaleanchor="x")
    # The top margin keeps the titles clear of the chart toolbar that appears on hover.
    figure.update_layout(height=height, margin=dict(l=0, r=0, t=50, b=0), dragmode="zoom")
    return figure


@st.dialog("Full size", width="large")
def full_size_view(model: Model, image, threshold: float, score: float) -> None:
    """The original at its own resolution beside the heatmap with the threshold region (white) and the ground
    truth (magenta), zoomed and panned together (drag a box, scroll; double-click resets)."""
    original, overlay = heatmaps.full_size_pictures(get_store(), model, image, threshold)
    height, width = original.shape[:2]
    # Two pictures side by side in the dialog's width (about 700 px), never taller than a laptop screen.
    figure = linked_pictures([original, overlay], ["original", f"#{model.id} {model.method} · score {score:.4g}"],
                             height=min(620, round(350 * height / width) + 60))
    st.plotly_chart(figure, key="full_size", config={"scrollZoom": True})
    verdict = verdict_badge(verdicts.verdict(score, threshold))
    st.caption(f"{image.name} · {width}×{height} px · threshold {threshold:.4g} · {verdict} · white: above the "
               "threshold" + (" · magenta: ground truth" if image.mask_path else ""))
    if st.toggle("Mark the defect region", key="mark_region",
                 help="For a defect the model missed: the region becomes its mask when Inspect adds it to the "
                      "dataset's test images."):
        region_editor(image, original)


def region_editor(image, picture) -> None:
    """The original with a selectable grid: a box or lasso drawn over the defect is saved as the image's QA
    region (``kdcore.qa_regions``), at the image's own resolution."""
    store = get_store()
    height, width = picture.shape[:2]
    full_width, full_height = data.probe_image(image.path)
    cell = max(width, height) / REGION_CELLS
    saved = qa_regions.load_region(store, image.sha256)
    shown = picture if saved is None else heatmaps.with_qa_region(picture, saved)
    xs, ys = np.meshgrid(np.arange(cell / 2, width, cell), np.arange(cell / 2, height, cell))
    figure = go.Figure([go.Image(source=heatmaps.png_data_url(shown), hoverinfo="skip"),
                        go.Scatter(x=xs.ravel(), y=ys.ravel(), mode="markers", hoverinfo="skip",
                                   marker=dict(size=max(2.0, cell), opacity=0, symbol="square"))])
    figure.update_xaxes(showticklabels=False, range=[0, width])
    figure.update_yaxes(showticklabels=False, range=[height, 0], scaleanchor="x")
    figure.update_layout(height=min(620, round(700 * height / width) + 20), margin=dict(l=0, r=0, t=10, b=0),
                         dragmode="select", showlegend=False)
    version = st.session_state.setdefault(f"region_version_{image.sha256}", 0)  # a new chart forgets a selection
    event = st.plotly_chart(figure, key=f"region_{image.sha256}_{version}", on_select="rerun",
                            selection_mode=("box", "lasso"))
    points = event.selection.points if event else []
    scale = full_width / width
    if points:
        mask = qa_regions.region_from_cells([(p["x"] * scale, p["y"] * scale) for p in points], cell * scale,
                                            full_width, full_height)
        if saved is None or not np.array_equal(mask, saved):  # a selection stays in the chart on every rerun
            qa_regions.save_region(store, image.sha256, mask)
            saved = mask
    if saved is None:
        st.caption("Drag a box (or choose the lasso in the chart's toolbar) over the defect.")
        return
    st.caption(f"Region saved: {saved.mean():.1%} of the image (cyan once redrawn). Draw again to replace it.")

    def clear() -> None:
        qa_regions.save_region(store, image.sha256, np.zeros((1, 1), dtype=bool))
        st.session_state[f"region_version_{image.sha256}"] += 1

    st.button("Clear the region", on_click=clear, key=f"clear_region_{image.sha256}")


def progress_bar(text: str):
    """An ``on_progress(done, total)`` for ``kdcore.scoring`` that shows a bar only while a model runs."""
    bar = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or st.empty()
        if done < total:
            bar.progress(done / total, text=f"{text}: scoring {total} new image(s)…")
        else:
            bar.empty()

    return on_progress
