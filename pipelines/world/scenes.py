"""The synthetic world of the embedded default: scenes of coloured shapes with known
descriptions, their captions and question/answer pairs.

No data set can be downloaded here, so the default run builds its own. Every scene is a
deterministic function of (seed, index). Two kinds of scene keep the ground truth
recoverable from pixels at small sizes:

* a single object: shape, colour, size (small/large) and position (left, right, top,
  bottom, centre) - "a large red circle on the left";
* a group: 2 or 3 identical small objects at distinct positions among left, right, top
  and bottom - "three blue squares" (counting).

Questions cover colour, shape, position, count and yes/no. `checker.py` reads a scene
back from an image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 75, 215),
    "yellow": (235, 200, 30), "purple": (140, 50, 180), "orange": (240, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.21, 0.5), "right": (0.79, 0.5), "top": (0.5, 0.21), "bottom": (0.5, 0.79),
    "center": (0.5, 0.5),
}
GROUP_POSITIONS = ("left", "right", "top", "bottom")
BACKGROUND = (242, 240, 235)
RADIUS = {"small": 0.11, "large": 0.19}  #: half-extent as a fraction of the image side
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True, order=True)
class Obj:
    position: str
    shape: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    @property
    def count(self) -> int:
        return len(self.objects)

    @property
    def is_group(self) -> bool:
        return self.count > 1

    def canonical(self) -> "Scene":
        return Scene(tuple(sorted(self.objects)))

    def to_dict(self) -> dict:
        return {"objects": [o.__dict__ for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        return cls(tuple(Obj(**o) for o in data["objects"]))


def make_scene(seed: int, index: int, group_share: float = 0.3) -> Scene:
    """The scene number `index` of the world `seed` (deterministic)."""
    rng = random.Random(f"{seed}:{index}")
    if rng.random() < group_share:
        n = rng.choice((2, 3))
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        places = rng.sample(GROUP_POSITIONS, n)
        return Scene(tuple(sorted(Obj(p, shape, colour, "small") for p in places)))
    return Scene((Obj(rng.choice(list(POSITIONS)), rng.choice(SHAPES), rng.choice(list(COLOURS)),
                      rng.choice(SIZES)),))


def render(scene: Scene, size: int = 32) -> Image.Image:
    """Draw the scene on a plain background (no anti-aliasing: crisp, checkable edges)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = (v * size for v in POSITIONS[o.position])
        r = RADIUS[o.size] * size
        box = [round(cx - r), round(cy - r), round(cx + r) - 1, round(cy + r) - 1]
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return img


# ---------------------------------------------------------------------- language
def _plural(shape: str) -> str:
    return shape + "s"


def captions(scene: Scene) -> list[str]:
    """Several wordings of the scene's description."""
    if scene.is_group:
        o = scene.objects[0]
        n = NUMBERS[scene.count]
        return [f"{n} {o.colour} {_plural(o.shape)}", f"there are {n} {o.colour} {_plural(o.shape)}",
                f"a picture of {n} {o.colour} {_plural(o.shape)}"]
    o = scene.objects[0]
    where = "in the center" if o.position == "center" else f"on the {o.position}"
    return [f"a {o.size} {o.colour} {o.shape} {where}",
            f"there is a {o.size} {o.colour} {o.shape} {where}",
            f"{where}, a {o.size} {o.colour} {o.shape}"]


def questions(scene: Scene, rng: random.Random | None = None) -> list[tuple[str, str]]:
    """(question, answer) pairs about colour, shape, position, count and yes/no."""
    rng = rng or random.Random(repr(scene))
    o = scene.objects[0]
    qa = [("what colour is the shape?" if not scene.is_group else "what colour are the shapes?", o.colour),
          ("what shape is it?" if not scene.is_group else "what shape are they?", o.shape),
          ("how many shapes are there?", NUMBERS[scene.count])]
    if not scene.is_group:
        qa.append(("where is the shape?", o.position))
        qa.append(("is the shape large or small?", o.size))
    other = rng.choice([c for c in COLOURS if c != o.colour])
    asked = rng.choice([o.colour, other])
    qa.append((f"is there a {asked} shape?", "yes" if asked == o.colour else "no"))
    other_shape = rng.choice([s for s in SHAPES if s != o.shape])
    asked_shape = rng.choice([o.shape, other_shape])
    qa.append((f"is there a {asked_shape}?", "yes" if asked_shape == o.shape else "no"))
    return qa


ANSWERS = sorted({*COLOURS, *SHAPES, *POSITIONS, *SIZES, *NUMBERS.values(), "yes", "no"})
