"""kdcore web app: `streamlit run app.py` (or scripts/app). The pages are registered here, in order."""
import streamlit as st

import ui

st.set_page_config(page_title="kdcore · anomaly detection", page_icon="🔍", layout="wide")
# On every start and page view: jobs whose worker died are marked failed, waiting jobs get a worker.
worker_pid = ui.supervise()

page = st.navigation([
    st.Page("pages/home.py", title="Home", icon="🏠", default=True),
    st.Page("pages/datasets.py", title="Datasets", icon="🗂️"),
    st.Page("pages/train.py", title="Train", icon="🏋️"),
    st.Page("pages/models.py", title="Models", icon="📦"),
])
with st.sidebar:
    st.caption(f"Data: `{ui.get_store().root}`")
    st.caption("Worker: " + ("idle or stopped" if worker_pid is None else
                             "starting" if worker_pid < 0 else f"running (pid {worker_pid})"))
page.run()
