"""Drawing (multimodal/images.py): deterministic, the requested content, the bundled font."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from circuit_breakers.multimodal import images as draw


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_drawing_is_deterministic():
    makers = [
        lambda: draw.count_scene("star", "yellow", 5, distractors=[("circle", "red")], seed=3),
        lambda: draw.position_scene(("circle", "red"), ("square", "blue"), seed=1),
        lambda: draw.sign("LIBRARY", seed=2),
        lambda: draw.object_scene("bottle", colour="green", label="WATER"),
        lambda: draw.diagram([("flask", "green", "LABEL"), ("drone", "grey", None)], title="T", callouts=["a", "b"]),
        lambda: draw.typographic("Steps to bake bread at home."),
    ]
    for make in makers:
        first, second = make(), make()
        assert draw.png_bytes(first) == draw.png_bytes(second)
        assert (pixels(first) != 255).any()  # something was drawn


def test_seed_changes_the_layout_not_the_content():
    a = draw.count_scene("circle", "red", 3, seed=0)
    b = draw.count_scene("circle", "red", 3, seed=1)
    assert not np.array_equal(pixels(a), pixels(b))
    red = np.array(draw.COLOURS["red"])
    # The same shapes in other places: about the same number of red pixels.
    count = lambda im: (np.abs(pixels(im).astype(int) - red).sum(-1) == 0).sum()  # noqa: E731
    assert abs(count(a) - count(b)) < 0.5 * max(count(a), count(b))


def test_colour_and_count_are_in_the_pixels():
    image = draw.shapes_scene([("square", "blue")], size=128)
    flat = pixels(image).reshape(-1, 3)
    assert (flat == draw.COLOURS["blue"]).all(-1).mean() > 0.2  # one big blue square
    assert not (flat == draw.COLOURS["red"]).all(-1).any()


def blobs(mask: np.ndarray) -> int:
    """Connected components (4-neighbour) of a boolean mask."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


@pytest.mark.parametrize("n", [1, 4, 7])
def test_count_scene_draws_n_shapes(n):
    image = draw.count_scene("circle", "green", n, distractors=[("square", "red")], seed=n, size=160)
    assert blobs((pixels(image) == draw.COLOURS["green"]).all(-1)) == n
    assert blobs((pixels(image) == draw.COLOURS["red"]).all(-1)) == 1


def test_typographic_renders_the_text_and_empty_items():
    image = draw.typographic("Steps to bake bread.", items=3, size=256, font_size=30)
    ink = (pixels(image) < 128).all(-1)
    top, bottom = ink[:128], ink[128:]
    assert top.sum() > 100  # the heading in the top half
    rows = np.flatnonzero(bottom.any(1))
    # Three numbers, left-aligned, nothing else: three separate runs of inked rows, all in the left margin.
    runs = 1 + int((np.diff(rows) > 1).sum())
    assert runs == 3
    assert not bottom[:, 80:].any()
    # A longer text wraps and shrinks but stays inside the image's top half.
    long = draw.typographic("word " * 80, size=256)
    assert (pixels(long)[:128] < 128).any() and not (pixels(long)[120:140, 60:] < 128).any()


def test_font_is_pillows_bundled_freetype_font():
    f = draw.font(20)
    assert f.size == 20 and draw.font(20) is f
    assert f.getlength("WWW") > f.getlength("iii")


def test_png_bytes_round_trip_and_save(tmp_path):
    image = draw.sign("OPEN")
    data = draw.png_bytes(image)
    assert np.array_equal(pixels(Image.open(io.BytesIO(data))), pixels(image))
    draw.save_png(image, tmp_path / "sub" / "a.png")
    assert (tmp_path / "sub" / "a.png").read_bytes() == data
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]  # no temporary left behind


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown object"):
        draw.object_scene("spaceship")
    with pytest.raises(ValueError, match="unknown shape"):
        draw.shapes_scene([("blob", "red")])
    with pytest.raises(ValueError, match="1 to 3 parts"):
        draw.diagram([])


def test_every_object_draws():
    for name in draw.OBJECTS:
        assert (pixels(draw.object_scene(name, colour="blue", label="X", size=96)) != 255).any(), name
