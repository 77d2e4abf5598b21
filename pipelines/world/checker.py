"""The world's attribute checker: `check_image` reads an image and returns its `Scene`.

It is how generated images are scored (the analogue of GenEval), and it agrees with the
ground truth on clean renders (tested). `Agreement` counts, per attribute, how often
checked scenes agree with their ground truth.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipelines.world.scenes import BACKGROUND, COLOURS, GROUP_POSITIONS, POSITIONS, Obj, Scene


@dataclass(frozen=True)
class CheckerConfig:
    background_distance: float = 60.0  #: RGB distance from the background that is "ink"
    min_area: float = 0.004  #: smallest blob, as a fraction of the image area
    large_extent: float = 0.32  #: blobs wider/taller than this fraction of the side are "large"
    square_fill: float = 0.86  #: bounding-box fill above which a blob is a square
    triangle_fill: float = 0.64  #: ... below which it is a triangle (circles: ~0.79)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        queue, pixels = deque([(r0, c0)]), []
        seen[r0, c0] = True
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        out.append(np.array(pixels))
    return out


def check_image(image: Image.Image, config: CheckerConfig = CheckerConfig()) -> Scene:
    """Read the scene description back from an image (clean or generated)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = rgb.shape
    ink = np.linalg.norm(rgb - np.array(BACKGROUND, dtype=np.float32), axis=-1) > config.background_distance
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    names = list(COLOURS)
    objects = []
    for pixels in _components(ink):
        area = len(pixels) / (h * w)
        if area < config.min_area:
            continue
        rows, cols = pixels[:, 0], pixels[:, 1]
        colour = names[int(np.linalg.norm(palette - np.median(rgb[rows, cols], axis=0), axis=1).argmin())]
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = len(pixels) / box
        shape = ("square" if fill >= config.square_fill else
                 "triangle" if fill < config.triangle_fill else "circle")
        cy, cx = (rows.min() + rows.max() + 1) / 2 / h, (cols.min() + cols.max() + 1) / 2 / w
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
        extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) / max(h, w)
        size = "large" if extent > config.large_extent else "small"
        objects.append(Obj(position, shape, colour, size))
    return Scene(tuple(sorted(objects)))


@dataclass
class Agreement:
    """Per-attribute agreement of checked scenes with their ground truth.

    `described_only` scores what a caption states, for images generated from one: a
    group's caption ("three blue squares") names its count, colour and shape but not
    its places, so any distinct group places agree. Off, every attribute must equal the
    truth's (a decoded image against its original).
    """

    n: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {k: 0 for k in
                                                          ("colour", "shape", "position", "size", "count",
                                                                  "overall")})
    described_only: bool = False

    def add(self, truth: Scene, found: Scene) -> None:
        self.n += 1
        t, f = truth.canonical(), found.canonical()
        places = [o.position for o in f.objects]
        if self.described_only and t.is_group:
            position = (f.count == t.count and len(set(places)) == f.count
                        and all(p in GROUP_POSITIONS for p in places))
        else:
            position = [o.position for o in t.objects] == places
        agree = {
            "count": t.count == f.count,
            "colour": sorted(o.colour for o in t.objects) == sorted(o.colour for o in f.objects),
            "shape": sorted(o.shape for o in t.objects) == sorted(o.shape for o in f.objects),
            "position": position,
            "size": [o.size for o in t.objects] == [o.size for o in f.objects],
        }
        agree["overall"] = all(agree.values()) if self.described_only else t == f
        for key, ok in agree.items():
            self.hits[key] += ok

    def rates(self) -> dict[str, float]:
        return {k: v / max(1, self.n) for k, v in self.hits.items()}
