"""What the review pages draw: a model's cached anomaly map over its image, at the model's size or the image's own.

Colours sit on the model's normalised scale around the threshold (``kdcore.calibration``), the region above the
threshold is outlined in white and the ground truth in magenta. Maps come from ``kdcore.scoring``'s cache, so
drawing never runs a model.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from kdcore import calibration, data, imaging, visualize
from kdcore.image_refs import ImageRef
from kdcore.scoring import load_map
from kdcore.store import Model, Store

GT_COLOR = (255, 0, 255)  # ground-truth outline: magenta is not in the heatmap's colour scale
QA_REGION_COLOR = (0, 255, 255)  # a region QA marked: cyan, apart from the truth's magenta and the region's white
# Longest side of a full-size view sent to the browser: more pixels than a screen shows even zoomed in twice.
FULL_VIEW_MAX_SIDE = 2048


def resize_map(anomaly_map: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """The map (in the image frame) at height×width (default square): the picture's own shape."""
    width = height if width is None else width
    if anomaly_map.shape == (height, width):
        return anomaly_map
    return np.asarray(Image.fromarray(anomaly_map.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR))


def render(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, model: Model,
           gt_mask: np.ndarray | None = None) -> np.ndarray:
    """RGB overlay: the map coloured on the model's normalised scale around ``threshold`` (anomalib style:
    the threshold is the middle colour), the outline of the region above it in white, the ground truth's in
    magenta. ``image`` (H×W×3 uint8) sets the size; the map is resized to it."""
    height, width = image.shape[:2]
    # The region is cut at the map's own resolution, where the score (its maximum) was taken, and any of its
    # pixels marks the display pixel it falls in: an NG verdict always shows an outline, however small.
    region = Image.fromarray(np.uint8(anomaly_map > threshold) * 255).resize((width, height), Image.Resampling.BOX)
    anomaly_map = resize_map(anomaly_map, height, width)
    cal = model.calibration
    shown = calibration.normalize(anomaly_map, threshold, cal["min"], cal["max"])
    picture = visualize.overlay(image, shown, outline=np.asarray(region) > 0)
    if gt_mask is not None:
        picture[visualize.contour(gt_mask)] = GT_COLOR
    return picture


def render_image(store: Store, model: Model, image: ImageRef, threshold: float, size: int | None = None
                 ) -> np.ndarray:
    """``render`` for a scored image read from disk, at ``size`` (default: the model's input size)."""
    size = size or model.params["size"]
    mask = data.read_mask(image.mask_path, size) if image.mask_path else None
    return render(data.read_image(image.path, size), load_map(store, model, image), threshold, model, mask)


def full_size_pictures(store: Store, model: Model, image: ImageRef, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The image at its own resolution and aspect ratio (longest side at most ``FULL_VIEW_MAX_SIDE``), and the
    same picture with the map, the region above ``threshold`` and the ground truth over it (``render``)."""
    img = imaging.open_upright(image.path)
    try:
        scale = min(1.0, FULL_VIEW_MAX_SIDE / max(img.size))
        width, height = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        picture = np.asarray(imaging.to_8bit(img).resize((width, height), Image.Resampling.BILINEAR).convert("RGB"))
    finally:
        img.close()
    mask = data.read_mask_at(image.mask_path, width, height) if image.mask_path else None
    return picture, render(picture, load_map(store, model, image), threshold, model, mask)


def png_data_url(picture: np.ndarray) -> str:
    """An RGB uint8 picture as a PNG ``data:`` URL (what plotly's Image trace takes as its source)."""
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def with_qa_region(picture: np.ndarray, region: np.ndarray) -> np.ndarray:
    """A copy of the RGB ``picture`` with the outline of a QA region (a mask of any resolution) drawn on it."""
    height, width = picture.shape[:2]
    shown = np.asarray(Image.fromarray(np.uint8(region) * 255).resize((width, height), Image.Resampling.NEAREST)) > 0
    outlined = picture.copy()
    outlined[visualize.contour(shown)] = QA_REGION_COLOR
    return outlined
