"""kdcore web app: `streamlit run app.py` (or scripts/app). The pages are registered here, in order."""
import streamlit as st

import ui
from kdcore.store import StoreError

st.set_page_config(page_title="kdcore · anomaly detection", page_icon=":material/troubleshoot:", layout="wide")
if ui.login_configured() and not ui.logged_in():  # serving a team: nothing without a login
    st.title("kdcore")
    st.write("Log in to review models and images.")
    st.button("Log in", on_click=st.login, type="primary")
    st.stop()
try:
    # On every start and page view: jobs whose worker died are marked failed, waiting jobs get a worker.
    ui.supervise()
except StoreError as exc:  # a damaged or mismatched database: say so in one line, touch nothing
    st.error(f"The data directory cannot be opened: {exc}")
    st.stop()
ui.preload_engine()

page = st.navigation([
    st.Page("pages/home.py", title="Home", icon=ui.ICONS["home"], default=True),
    st.Page("pages/datasets.py", title="Datasets", icon=ui.ICONS["datasets"]),
    st.Page("pages/train.py", title="Train", icon=ui.ICONS["train"]),
    st.Page("pages/models.py", title="Models", icon=ui.ICONS["models"]),
    st.Page("pages/compare.py", title="Compare", icon=ui.ICONS["compare"]),
    st.Page("pages/thresholds.py", title="Thresholds", icon=ui.ICONS["thresholds"]),
    st.Page("pages/inspect.py", title="Inspect", icon=ui.ICONS["inspect"]),
])
st.sidebar.caption(f"Data: `{ui.get_store().root}`")
if ui.current_user():
    st.sidebar.caption(f"Logged in as {ui.current_user()}")
    st.sidebar.button("Log out", on_click=st.logout)
page.run()
