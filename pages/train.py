"""Train: queue one training job per chosen method; the worker runs them one at a time and this page follows them."""
import dataclasses
import json
from pathlib import Path

import streamlit as st

import ui
from kdcore.backbones import DEFAULT_BACKBONE
from kdcore.registry import (get_method_class, list_trainable_methods, method_options, option_help,
                             parse_param_value)
from kdcore.store import GOOD, TRAIN

SIZES = list(range(64, 513, 32))  # methods need multiples of 32
RECOMMENDED_METHOD = "stpm"  # preselected: the simplest and fastest to train
WEIGHTS = {
    "default": "ImageNet, offline (default backbone)",
    "imagenet": "ImageNet from the timm hub (internet)",
    "file": "A weights file on the server",
    "none": "None: random teacher (tests only)",
}

# Settings one click shares between the jobs it queues (the rest, epochs and batch size, are per method).
SHARED_KEYS = ("size", "backbone", "weights", "device", "seed")
QUEUED_MESSAGE = "train_queued_message"  # session state: what the last click of Train queued

store = ui.get_store()
st.title("Train")


def method_defaults(name: str) -> dict:
    """Defaults of a method's Config dataclass, e.g. {'epochs': None, 'batch_size': 16, 'size': 256, ...}."""
    return {f.name: f.default for f in dataclasses.fields(get_method_class(name).Config)}


def choose_dataset():
    datasets = store.list_datasets()
    normal = {d.id: store.dataset_counts(d.id).get(("train", GOOD), 0) for d in datasets}
    trainable = [d for d in datasets if normal[d.id] >= 2]
    if not trainable:
        st.info("No dataset with at least 2 normal images yet.")
        st.page_link("pages/datasets.py", label="Add images on the Datasets page", icon=ui.ICONS["datasets"])
        return None
    wanted = st.query_params.get("dataset", "")  # in the URL: kept over a reload, set by other pages' links
    index = next((i for i, d in enumerate(trainable) if str(d.id) == wanted), 0)
    dataset = st.selectbox("Dataset", trainable, index=index,
                           format_func=lambda d: f"{d.name} ({normal[d.id]} normal images)")
    st.query_params["dataset"] = str(dataset.id)
    return dataset


def last_settings(dataset) -> tuple[dict, dict[str, dict]]:
    """Shared and per-method settings of the last click of Train on this dataset (its jobs, newest first,
    share ``SHARED_KEYS``): the form opens as it was last used, after a reload too, since they live in the store."""
    jobs = [job for job in store.list_jobs(TRAIN) if job.dataset_id == dataset.id]
    if not jobs:
        return {}, {}
    shared = {key: jobs[0].params.get(key) for key in SHARED_KEYS}
    per_method = {}
    for job in jobs:
        if {key: job.params.get(key) for key in SHARED_KEYS} != shared or job.method in per_method:
            break
        own_keys = ("epochs", "batch_size", *method_options(job.method))
        per_method[job.method] = {key: job.params[key] for key in own_keys if key in job.params}
    return shared, dict(reversed(per_method.items()))  # in the order they were chosen


def common_settings(last: dict) -> dict | None:
    """Settings shared by all chosen methods; None (with the reason shown) when they are incomplete."""
    size_col, backbone_col, weights_col = st.columns(3)
    size = size_col.select_slider("Image size (pixels, square)", SIZES, value=last.get("size") or 256,
                                  help="Images are resized to this. Larger finds smaller defects but trains slower.")
    backbone = backbone_col.text_input("Teacher backbone", value=last.get("backbone") or DEFAULT_BACKBONE,
                                       help="Any timm CNN with features_only support.").strip()
    last_weights = last.get("weights") or "default"
    choice = last_weights if last_weights in WEIGHTS else "file"
    weights = weights_col.selectbox("Teacher weights", list(WEIGHTS), index=list(WEIGHTS).index(choice),
                                    format_func=WEIGHTS.get)
    if weights == "file":
        weights = weights_col.text_input("Weights file path", value="" if choice != "file" else last_weights).strip()
        if not Path(weights).expanduser().is_file():
            weights_col.warning("Enter the path of a weights file that exists on the server.")
            return None
    with st.expander("Advanced"):
        device_col, seed_col = st.columns(2)
        devices = ["auto", "cpu", "cuda"]
        device = device_col.selectbox("Device", devices, index=devices.index(last.get("device") or "auto"),
                                      help="auto: a GPU if there is one")
        seed = int(seed_col.number_input("Random seed", min_value=0, value=last.get("seed") or 0))
    return {"size": size, "backbone": backbone, "weights": weights, "device": device, "seed": seed}


def per_method_settings(methods: list[str], last: dict[str, dict]) -> dict[str, dict]:
    if methods:
        st.caption("Per method (preset to each method's own defaults)")
    settings = {}
    for name in methods:
        defaults = {**method_defaults(name), **last.get(name, {})}
        label, epochs_col, batch_col = st.columns([2, 1, 1], vertical_alignment="bottom")
        label.markdown(f"**{name}**")
        # Empty means the method's own default: per device for epochs, a preset's value for US.
        method_class = get_method_class(name)
        by_device = method_class.default_epochs
        epochs = epochs_col.number_input(
            "Epochs", min_value=1, value=defaults["epochs"], key=f"epochs_{name}",
            placeholder=f"auto: {by_device['cpu']} CPU, {by_device['cuda']} GPU",
            help=f"Empty: {by_device['cpu']} on a CPU, {by_device['cuda']} on a GPU, but at least "
                 f"{method_class.min_default_steps} training steps, so that a small dataset gets more epochs.")
        batch = batch_col.number_input("Batch size", min_value=1, value=defaults["batch_size"], key=f"batch_{name}",
                                       placeholder="auto")
        settings[name] = {key: int(value) for key, value in (("epochs", epochs), ("batch_size", batch))
                          if value is not None}
        settings[name].update(option_settings(name, last.get(name, {})))
    return settings


def as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def option_settings(name: str, last: dict) -> dict:
    """The method's options changed from their defaults (the same as ``--set KEY=VALUE``): a checkbox for a
    switch, else text read as JSON (``800``, ``[8, 16]``) or as words (``cosine``); empty is the default."""
    options, helps = method_options(name), option_help(name)
    changed = {key: last[key] for key in options if key in last}
    with st.expander(f"{name} options"):
        st.caption("Empty: the default, shown greyed. Each option's question mark says what it does; the method's docstring "
                   "and the README say more.")
        columns = st.columns(3)
        overrides = {}
        for i, (key, default) in enumerate(options.items()):
            column, widget_key = columns[i % 3], f"option_{name}_{key}"
            if isinstance(default, bool):
                value = column.checkbox(key, value=changed.get(key, default), key=widget_key, help=helps.get(key))
                if value != default:
                    overrides[key] = value
                continue
            text = column.text_input(key, value=as_text(changed[key]) if key in changed else "", key=widget_key,
                                     placeholder="auto" if default is None else as_text(default),
                                     help=helps.get(key)).strip()
            if text:
                overrides[key] = parse_param_value(text)
    if overrides:  # visible with the expander closed, as after a reload
        listed = ", ".join(f"{key}={as_text(value)}" for key, value in overrides.items())
        st.caption(f"{name}, changed from its defaults: {listed}")
    return overrides


def queue_jobs(dataset, common: dict, per_method: dict[str, dict]) -> None:
    params = {name: {**common, **own} for name, own in per_method.items()}
    try:  # validate all before queueing any, so a bad value never leaves half the jobs queued
        for name, values in params.items():
            get_method_class(name).Config(**values)
    except ValueError as exc:
        st.error(f"Not queued: {exc}")
        return
    jobs = [store.enqueue_job(TRAIN, name, values, dataset.id) for name, values in params.items()]
    ui.supervise()
    # Kept in the session: a job that ends within one poll reruns the whole page, which would wipe a plain message.
    st.session_state[QUEUED_MESSAGE] = f"Queued {len(jobs)} job(s): " + ", ".join(f"#{job.id} {job.method}"
                                                                                  for job in jobs)


dataset = choose_dataset()
if dataset is not None:
    available = list_trainable_methods()
    last_shared, last_per_method = last_settings(dataset)
    chosen_before = [name for name in last_per_method if name in available]
    methods = st.multiselect("Methods", available, default=chosen_before or (
                             [RECOMMENDED_METHOD] if RECOMMENDED_METHOD in available else available[:1]),
                             format_func=lambda name: f"{name} · {get_method_class(name).summary}")
    common = common_settings(last_shared)
    per_method = per_method_settings(methods, last_per_method)
    if st.button("Train", type="primary", disabled=not methods or common is None):
        st.session_state.pop(QUEUED_MESSAGE, None)
        queue_jobs(dataset, common, per_method)
    if QUEUED_MESSAGE in st.session_state:
        st.success(st.session_state[QUEUED_MESSAGE])

st.subheader("Jobs")
ui.job_panel(TRAIN)
