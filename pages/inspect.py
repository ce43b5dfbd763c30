"""Inspect: run a model with its saved threshold on new images; QA marks the verdicts; export; learn from mistakes."""
import math

import streamlit as st

import ui
from kdcore import heatmaps, image_refs, ingest, review, verdicts
from kdcore.data import DataError
from kdcore.store import StoreError

ROWS_PER_PAGE = 20
NOT_REVIEWED = "not reviewed"
FILTERS = {"all": lambda row: True, "NG": lambda row: row.verdict == verdicts.NG,
           "OK": lambda row: row.verdict == verdicts.OK, "not reviewed": lambda row: row.qa_mark is None,
           "marked wrong": lambda row: row.qa_mark == "wrong"}

store = ui.get_store()
st.title("Inspect")


def run(model, images, problems, source: str, note: str | None = None) -> None:
    """Score the images into an inspection and show it (its id goes in the URL, so a reload keeps it).

    ``note`` replaces the run when there is nothing to inspect: one plain line saying what was found.
    """
    st.session_state.inspect_problems = problems
    st.session_state.inspect_note = note
    if images:
        inspection_id = review.run_inspection(store, model, images, source, ui.load_method,
                                              ui.progress_bar(ui.model_label(model)))
        st.query_params["inspection"] = str(inspection_id)
    st.session_state.inspect_uploads = st.session_state.get("inspect_uploads", 0) + 1  # a new, empty uploader
    st.rerun()


def inputs(model) -> None:
    folder_tab, upload_tab = st.tabs(["A folder on the server", "Upload images"], key="source_tab",
                                    on_change="rerun")
    # A form: typing the path and pressing Enter or clicking the button is one action (a bare text input
    # commits on Enter or blur, so the first click would only commit the text).
    with folder_tab, st.form("inspect_folder", border=False):
        roots = ingest.import_roots(store)
        folder = st.text_input("Folder path", placeholder=str(roots[0] / "line3" / "2026-11-23")).strip()
        recursive = st.checkbox("Include subfolders", value=False)
        st.caption("Folders under " + ", ".join(f"`{root}`" for root in roots) + " (KDCORE_IMPORT_ROOTS)")
        if st.form_submit_button("Inspect folder", type="primary") and folder:
            try:
                images, problems = image_refs.folder_images(folder, roots, recursive)
                note = None if images else image_refs.describe_empty_folder(folder, roots, recursive, len(problems))
            except ingest.RejectedUpload as exc:  # missing, not a folder, or outside the import roots
                images, problems, note = [], [], str(exc)
            run(model, images, problems, folder, note)
    with upload_tab:
        files = st.file_uploader("Images", type=ui.IMAGE_TYPES, accept_multiple_files=True,
                                 key=f"inspect_upload_{st.session_state.get('inspect_uploads', 0)}")
        if st.button("Inspect uploaded images", type="primary", disabled=not files):
            run(model, *image_refs.upload_images(store, [(f.name, f.getvalue()) for f in files]), "upload")


def show_problems() -> None:
    if note := st.session_state.pop("inspect_note", None):
        st.error(note)
    problems = st.session_state.pop("inspect_problems", [])
    if problems:
        st.warning(f"{len(problems)} file(s) skipped")
        st.dataframe([{"file": name, "why": why} for name, why in problems], hide_index=True)


def inspection_label(inspection) -> str:
    source = "uploaded images" if inspection.source == "upload" else inspection.source
    return f"#{inspection.id} · {source} · {inspection.n_images} images · {ui.when(inspection.created_at)}"


def threshold_note(model, inspection) -> None:
    if inspection.threshold == model.threshold:
        return
    st.info(f"This inspection used the threshold then saved, {ui.threshold_label(inspection.threshold)}; "
            f"the saved one is now {ui.threshold_label(model.threshold)}.")
    if st.button("Inspect these images again with the saved threshold"):
        run(model, review.inspection_images(store, inspection), [], inspection.source)


def summary(rows) -> None:
    counts = {"Images": len(rows), "NG": sum(row.verdict == verdicts.NG for row in rows),
              "Reviewed": sum(row.qa_mark is not None for row in rows),
              "False positives": sum(row.outcome == "FP" for row in rows),
              "False negatives": sum(row.outcome == "FN" for row in rows)}
    for cell, (label, value) in zip(st.columns(len(counts)), counts.items()):
        cell.metric(label, value)


def learn_from_review(model, rows) -> None:
    """Offer to send what QA found back to the model's dataset: false positives to the normal images (the next
    training learns them), missed defects to the labelled test images (the next evaluation counts them)."""
    if result := st.session_state.pop("review_added", None):
        show, message = result
        getattr(st, show)(message)
    false_positives, false_negatives = review.false_positives(rows), review.false_negatives(rows)
    if model.dataset_id is None or not (false_positives or false_negatives):
        return
    where = f"'{model.dataset_name}'"
    if false_positives and st.button(
            f"Add the {len(false_positives)} false positive(s) to the normal images of {where}",
            help="They are good parts the model found suspicious: training on them teaches it otherwise. "
                 "Train a new model afterwards."):
        add_to_dataset(lambda: review.add_to_normal_images(store, model.dataset_id, false_positives), where)
    if false_negatives:
        name_col, button_col = st.columns([2, 3], vertical_alignment="bottom")
        defect = name_col.text_input("Defect type of the missed defects", value="missed", key="missed_defect")
        if button_col.button(f"Add the {len(false_negatives)} missed defect(s) to the test images of {where}",
                             disabled=not defect.strip(),
                             help="Evaluations of the dataset's models then count them. Where its defect "
                                  "images have masks, mark each one's region first (Full size, 'Mark the "
                                  "defect region'): it becomes the mask."):
            add_to_dataset(lambda: review.add_to_test_images(store, model.dataset_id, defect, false_negatives), where)


def add_to_dataset(action, where: str) -> None:
    """Run an ingest call; its outcome (green only when all went in, with every refusal's reason) is shown
    after the rerun."""
    try:
        report = action()
        reasons = "".join(f"\n- {name}: {why}" for name, why in report.problems)
        st.session_state.review_added = ("success" if report.added and not report.problems else "warning",
                                         f"{where}: {report.summary()}.{reasons}")
    except (ingest.RejectedUpload, StoreError) as exc:
        st.session_state.review_added = ("error", f"Nothing was added: {exc}")
    st.rerun()


def save_mark(row, key: str) -> None:
    value = st.session_state[key]
    review.set_qa_mark(store, row, None if value == NOT_REVIEWED else value, by=ui.current_user())


def save_comment(row, key: str) -> None:
    store.set_qa_comment(row.image.sha256, st.session_state[key], by=ui.current_user())


def comment_box(container, row, key: str) -> None:
    container.text_input(f"Comment on {row.image.name}", value=row.qa_comment or "", key=key, max_chars=500,
                         placeholder="Comment (what the defect is, why the verdict is wrong)",
                         label_visibility="collapsed", on_change=save_comment, args=(row, key))


def mark_and_advance(row, mark: str | None, key: str, count: int) -> None:
    review.set_qa_mark(store, row, mark, by=ui.current_user())
    st.session_state[key] = min(st.session_state.get(key, 0) + 1, count - 1)


def move(key: str, delta: int, count: int) -> None:
    st.session_state[key] = min(max(st.session_state.get(key, 0) + delta, 0), count - 1)


@st.fragment
def one_by_one(model, inspection, rows) -> None:
    """Keyboard review: one image large; 1 = verdict correct, 2 = wrong (each saves and shows the next),
    N next, B back. Only this part reruns, so a mark costs a database write and one picture."""
    key = f"one_by_one_{inspection.id}"
    index = min(st.session_state.get(key, 0), len(rows) - 1)
    shown = rows[index]
    # Marks made here since the page last ran are in the store, not in ``rows``.
    sha = shown.image.sha256
    row = review.Row(shown.image, shown.score, shown.verdict, store.qa_labels([sha]).get(sha),
                     store.qa_comments([sha]).get(sha))
    threshold = inspection.threshold["value"]
    picture, side = st.columns([3, 2])
    try:
        picture.image(heatmaps.render_image(store, model, row.image, threshold, size=max(384, model.params["size"])),
                      width="stretch")
    except DataError:
        picture.caption("file gone")
    side.markdown(f"**{index + 1} of {len(rows)}** · {row.image.name}")
    side.markdown(f"Score **{row.score:.4g}** &nbsp; {ui.verdict_badge(row.verdict)}")
    side.markdown(f"QA: **{row.qa_mark or NOT_REVIEWED}**")
    correct, wrong = side.columns(2)
    correct.button("Correct", key="key_correct", shortcut="1", icon=":material/check:", width="stretch",
                   on_click=mark_and_advance, args=(row, "correct", key, len(rows)), type="primary")
    wrong.button("Wrong", key="key_wrong", shortcut="2", icon=":material/close:", width="stretch",
                 on_click=mark_and_advance, args=(row, "wrong", key, len(rows)))
    back, forward = side.columns(2)
    back.button("Back", key="key_back", shortcut="B", icon=":material/chevron_left:", width="stretch",
                on_click=move, args=(key, -1, len(rows)), disabled=index == 0)
    forward.button("Next", key="key_next", shortcut="N", icon=":material/chevron_right:", width="stretch",
                   on_click=move, args=(key, 1, len(rows)), disabled=index == len(rows) - 1)
    comment_box(side, row, f"key_comment_{inspection.id}_{sha}")
    side.caption("Keys: 1 correct · 2 wrong (both save and go on) · N next · B back (not while typing a "
                 "comment; Enter saves it). The counts above update when you leave this mode.")


def table(model, inspection, rows) -> None:
    shown = st.radio("Show", list(FILTERS), horizontal=True, key="inspect_filter")
    rows = [row for row in rows if FILTERS[shown](row)]
    pages = max(1, math.ceil(len(rows) / ROWS_PER_PAGE))
    page = st.pagination(pages, key=f"inspect_page_{inspection.id}_{shown}") if pages > 1 else 1
    threshold = inspection.threshold["value"]
    for row in rows[(page - 1) * ROWS_PER_PAGE:page * ROWS_PER_PAGE]:
        with st.container(border=True):
            picture, name, score, verdict, mark = st.columns([1, 3, 1, 1, 3], vertical_alignment="center")
            try:
                picture.image(heatmaps.render_image(store, model, row.image, threshold), width=96)
            except DataError:  # the folder was cleaned up since: the score and verdict still stand
                picture.caption("file gone")
            name.markdown(f"**{row.image.name}**")
            # An upload's file is named by its content hash: where it came from says more.
            name.caption("uploaded" if inspection.source == "upload" else str(row.image.path))
            if name.button("Full size", key=f"full_{row.image.sha256}", icon=":material/zoom_in:"):
                ui.full_size_view(model, row.image, threshold, row.score)
            score.metric("Score", f"{row.score:.4g}", label_visibility="collapsed")
            verdict.markdown(ui.verdict_badge(row.verdict))
            key = f"qa_{inspection.id}_{row.image.sha256}"
            options = [NOT_REVIEWED, *review.QA_MARKS]
            mark.radio(f"QA mark for {row.image.name}", options, index=options.index(row.qa_mark or NOT_REVIEWED),
                       key=key, horizontal=True, label_visibility="collapsed", on_change=save_mark, args=(row, key))
            comment_box(mark, row, f"comment_{inspection.id}_{row.image.sha256}")
    if not rows:
        st.caption("No images match.")


models = ui.trained_models()

model = ui.pick_from_url("Model", models, "model", ui.model_label)
st.markdown(f"Verdicts use the model's saved threshold: **{ui.threshold_label(model.threshold)}**")
st.page_link("pages/thresholds.py", label="Change it on the Thresholds page", icon=ui.ICONS["thresholds"],
             query_params={"model": model.id})
inputs(model)
show_problems()
inspections = store.list_inspections(model.id)
if not inspections:
    st.caption("No inspections with this model yet: give it a folder or some images above.")
    st.stop()
st.divider()
inspection = ui.pick_from_url("Inspection", inspections, "inspection", inspection_label)
threshold_note(model, inspection)
rows = review.inspection_rows(store, inspection)
summary(rows)
st.download_button("Download CSV", review.rows_csv(rows, inspection, model), type="primary",
                   file_name=f"inspection-{inspection.id}-{model.method}.csv", mime="text/csv",
                   icon=":material/download:")
learn_from_review(model, rows)
if rows and st.toggle("Review one by one, at the keyboard", key="one_by_one"):
    one_by_one(model, inspection, rows)
else:
    table(model, inspection, rows)
