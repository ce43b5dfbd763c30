"""Home: what the tool does and where to start."""
import streamlit as st

import ui

store = ui.get_store()
datasets, models = store.list_datasets(), store.list_models()

st.title("Anomaly detection for industrial images")
st.markdown(
    "Train **teacher-student** anomaly detectors on images of *good* parts only, then see where new parts "
    "differ. A pretrained network (the teacher) describes each image; a student network learns to reproduce "
    "that description on normal images. Where the student fails, something is unusual: that is the heatmap.")

st.subheader("Where to start")
steps = st.columns(4)
with steps[0], st.container(border=True):
    st.markdown("**1. Collect images**  \nCreate a dataset per product and add its normal images "
                "(a few dozen or more). Labelled defect images are optional; they let you measure models.")
    st.page_link("pages/datasets.py", label="Datasets", icon=ui.ICONS["datasets"])
with steps[1], st.container(border=True):
    st.markdown("**2. Train**  \nPick a dataset and one or several methods. Training runs in the background: "
                "you can close the tab and come back.")
    st.page_link("pages/train.py", label="Train", icon=ui.ICONS["train"])
with steps[2], st.container(border=True):
    st.markdown("**3. Measure**  \nSee every trained model with its hold-out scores, and evaluate it "
                "on the labelled test images.")
    st.page_link("pages/models.py", label="Models", icon=ui.ICONS["models"])
with steps[3], st.container(border=True):
    st.markdown("**4. Review**  \nCompare heatmaps of several models side by side, set each model's "
                "threshold on evidence, then inspect new images and mark the verdicts.")
    st.page_link("pages/compare.py", label="Compare", icon=ui.ICONS["compare"])
    st.page_link("pages/thresholds.py", label="Thresholds", icon=ui.ICONS["thresholds"])
    st.page_link("pages/inspect.py", label="Inspect", icon=ui.ICONS["inspect"])

st.subheader("Now")
counts = st.columns(3)
counts[0].metric("Datasets", len(datasets))
counts[1].metric("Models", len(models))
counts[2].metric("Jobs queued or running", store.count_active_jobs())
