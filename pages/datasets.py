"""Datasets: one per product. Add normal images (files, zips, a server folder) and labelled test images; browse."""
import math

import streamlit as st

import ui
from kdcore import ingest
from kdcore.data import IMAGE_EXTENSIONS
from kdcore.store import GOOD, StoreError

UPLOAD_TYPES = sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS) + ["zip"]
GALLERY_COLUMNS = 8
GALLERY_PAGE_SIZE = 4 * GALLERY_COLUMNS

store = ui.get_store()
st.title("Datasets")


def create_form(expanded: bool) -> None:
    with st.expander("New dataset", expanded=expanded), st.form("new_dataset", clear_on_submit=True):
        name = st.text_input("Name", placeholder="the product, e.g. 'bottle cap, line 3'")
        if st.form_submit_button("Create dataset", type="primary"):
            try:
                st.query_params["dataset"] = str(store.create_dataset(name).id)
                st.rerun()
            except StoreError as exc:
                st.error(str(exc))


def pick_dataset(datasets):
    """The selected dataset; the choice lives in the URL (?dataset=ID) so a reload or a shared link keeps it."""
    ids = [d.id for d in datasets]
    wanted = st.query_params.get("dataset", "")
    index = ids.index(int(wanted)) if wanted.isdigit() and int(wanted) in ids else 0
    dataset = st.selectbox("Dataset", datasets, index=index, format_func=lambda d: d.name)
    st.query_params["dataset"] = str(dataset.id)
    return dataset


def show_counts(dataset, counts: dict) -> None:
    defects = {defect: n for (split, defect), n in counts.items() if split == "test" and defect != GOOD}
    normal = counts.get(("train", GOOD), 0)
    masks = store.defect_mask_state(dataset.id)
    cols = st.columns(4)
    cols[0].metric("Normal training images", normal)
    cols[1].metric("Good test images", counts.get(("test", GOOD), 0))
    cols[2].metric("Defect test images", sum(defects.values()),
                   help=", ".join(f"{name}: {n}" for name, n in defects.items()) or None)
    cols[3].metric("Defect masks", {None: "–", True: "yes", False: "no"}[masks])
    if normal < 10:
        st.info("Training holds 10 % of the normal images out for calibration and needs at least 2; "
                "a few dozen or more give useful models.")
    if normal >= 2:
        st.page_link("pages/train.py", label="Train a model on this dataset", icon=ui.ICONS["train"],
                     query_params={"dataset": dataset.id})


def add_images(action) -> None:
    """Run an ingest call, keep its report for the next run, clear the uploaders (frees their memory)."""
    try:
        with st.spinner("Checking and adding images…"):
            st.session_state.ingest_result = action()
    except (ingest.RejectedUpload, StoreError) as exc:
        st.session_state.ingest_result = str(exc)
    st.session_state.upload_generation = st.session_state.get("upload_generation", 0) + 1
    st.rerun()


def uploads(files) -> list[ingest.SourceFile]:
    return ingest.from_uploads((f.name, f.getvalue()) for f in files or [])


def show_ingest_result() -> None:
    result = st.session_state.pop("ingest_result", None)
    if isinstance(result, str):
        st.error(f"Nothing was added: {result}")
    elif result is not None:
        # Green only when everything went in: a partial import must not read as a success.
        (st.success if result.added and not result.problems else st.warning)(result.summary())
        rows = [{"file": name, "not added because": why} for name, why in result.problems]
        rows += [{"file": name, "not added because": f"duplicate of {same}"} for name, same in result.duplicates]
        if rows:
            st.dataframe(rows, hide_index=True, width="stretch")


def add_section(dataset, existing_defects: list[str]) -> None:
    generation = st.session_state.get("upload_generation", 0)
    # Tracked by key, so an upload's rerun lands on the same tab.
    normal_tab, test_tab, folder_tab = st.tabs(
        ["Add normal images", "Add labelled test images", "Import a folder on the server"], key="add_tab",
        on_change="rerun")
    with normal_tab:
        files = st.file_uploader("Images of good parts, or zips of them", type=UPLOAD_TYPES,
                                 accept_multiple_files=True, key=f"normal_{generation}")
        if st.button("Add normal images", disabled=not files, type="primary"):
            add_images(lambda: ingest.add_normal_images(store, dataset.id, uploads(files)))
    with test_tab:
        st.caption("Optional: test images with known labels let you evaluate models. Add one defect type at a "
                   "time ('good' for normal test images). Masks are optional, but within a dataset either all "
                   "defect images have one or none has.")
        defect = st.text_input("Defect type", value=GOOD,
                               help="Existing: " + (", ".join(existing_defects) or "none yet"))
        images = st.file_uploader("Test images, or zips of them", type=UPLOAD_TYPES, accept_multiple_files=True,
                                  key=f"test_{generation}")
        masks = st.file_uploader("Masks: named like their image, or <image name>_mask", type=UPLOAD_TYPES,
                                 accept_multiple_files=True, key=f"masks_{generation}")
        if st.button("Add test images", disabled=not images, type="primary"):
            add_images(lambda: ingest.add_test_images(store, dataset.id, defect, uploads(images), uploads(masks)))
    with folder_tab:
        roots = ingest.import_roots(store)
        folder = st.text_input("Folder path on the server", placeholder=str(roots[0] / "bottle"))
        st.caption("Folders under " + ", ".join(f"`{root}`" for root in roots) + " (KDCORE_IMPORT_ROOTS). "
                   "A folder in MVTec AD layout (train/good, test/<defect>, ground_truth/<defect>) is imported "
                   "with all its splits; otherwise the images directly inside it are added as normal images.")
        if st.button("Import folder", disabled=not folder.strip(), type="primary"):
            add_images(lambda: ingest.import_folder(store, dataset.id, folder.strip(), roots))


def gallery(dataset, counts: dict) -> None:
    split = st.radio("Show", ["train", "test"], horizontal=True, key="gallery_split",
                     format_func={"train": "Normal training images", "test": "Test images"}.get)
    total = sum(n for (s, _), n in counts.items() if s == split)
    if not total:
        st.caption("No images here yet.")
        return
    pages = math.ceil(total / GALLERY_PAGE_SIZE)
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="gallery_page") if pages > 1 else 1
    images = store.list_images(dataset.id, split, limit=GALLERY_PAGE_SIZE, offset=(page - 1) * GALLERY_PAGE_SIZE)
    folder = store.dataset_dir(dataset.id)
    for row in range(0, len(images), GALLERY_COLUMNS):
        for column, image in zip(st.columns(GALLERY_COLUMNS), images[row:row + GALLERY_COLUMNS]):
            label = image.path.rsplit("/", 1)[-1]
            if split == "test":
                label = f"{image.defect}{' · mask' if image.mask_path else ''} · {label}"
            column.image(str(folder / image.thumb_path), caption=label, width="stretch")
            column.checkbox("Select", key=f"pick_{image.id}", label_visibility="collapsed",
                            help=f"Select {label} to move, relabel or delete it")
    chosen = [image.id for image in images if st.session_state.get(f"pick_{image.id}")]
    if chosen:
        edit_selection(dataset, chosen, counts)


def edit_selection(dataset, chosen: list[int], counts: dict) -> None:
    """Move (normal <-> test, defect type) or delete the images ticked on this gallery page."""
    st.markdown(f"**{len(chosen)} selected**")
    places = {"train/good": "Normal training images", "test/good": "Good test images"}
    places |= {f"test/{d}": f"Test images: {d}" for (s, d) in counts if s == "test" and d != GOOD}
    places["new"] = "Test images of a new defect type…"
    move_col, name_col, button_col = st.columns([3, 2, 1], vertical_alignment="bottom")
    target = move_col.selectbox("Move to", list(places), format_func=places.get, key="move_target")
    split, defect = ("test", name_col.text_input("New defect type", key="move_new_defect")) if target == "new" \
        else target.split("/")
    if button_col.button("Move", type="primary", disabled=not defect.strip()):
        try:
            moved = store.move_images(dataset.id, chosen, split, defect, by=ui.current_user())
            finish_edit(f"{moved} image(s) moved to {places.get(target, f'test images: {defect}')}.")
        except StoreError as exc:
            st.error(str(exc))
    if ui.confirm_delete(f"Delete {len(chosen)} selected image(s)…", f"Delete {len(chosen)} image(s) (and their "
                         "masks) from this dataset? Models trained on it are kept.", key="delete_selected"):
        try:
            finish_edit(f"{store.delete_images(dataset.id, chosen, by=ui.current_user())} image(s) deleted.")
        except StoreError as exc:
            st.error(str(exc))


def finish_edit(message: str) -> None:
    for key in [k for k in st.session_state if str(k).startswith("pick_")] + ["delete_selected"]:
        st.session_state.pop(key, None)
    st.session_state.edit_result = message
    st.rerun()


datasets = store.list_datasets()
create_form(expanded=not datasets)
if not datasets:
    st.info("No datasets yet: create one per product, then add images of good parts.")
    st.stop()

dataset = pick_dataset(datasets)
counts = store.dataset_counts(dataset.id)
show_counts(dataset, counts)
show_ingest_result()
add_section(dataset, sorted({defect for (split, defect) in counts if split == "test"}))
st.subheader("Images")
if message := st.session_state.pop("edit_result", None):
    st.success(message)
gallery(dataset, counts)
st.divider()
n_images = sum(counts.values())
if ui.confirm_delete("Delete this dataset…", f"Delete dataset '{dataset.name}' and its {n_images} images? "
                     "Models trained on it are kept.", key=f"delete_dataset_{dataset.id}"):
    try:
        store.delete_dataset(dataset.id, by=ui.current_user())
        del st.query_params["dataset"]
        st.rerun()
    except StoreError as exc:
        st.error(str(exc))
