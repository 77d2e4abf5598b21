"""The synthetic world: determinism, language, and the attribute checker."""

import random

from PIL import Image, ImageFilter

from pipelines.world.checker import Agreement, check_image
from pipelines.world.scenes import ANSWERS, Obj, Scene, captions, make_scene, questions, render


def test_scenes_are_deterministic_and_varied():
    assert make_scene(3, 17) == make_scene(3, 17)
    scenes = [make_scene(0, i) for i in range(400)]
    assert len(set(scenes)) > 150
    groups = [s for s in scenes if s.is_group]
    assert 0.2 < len(groups) / len(scenes) < 0.4
    assert all(len({o.position for o in s.objects}) == s.count for s in scenes)
    assert {o.shape for s in scenes for o in s.objects} == {"circle", "square", "triangle"}


def test_checker_agrees_with_ground_truth_on_clean_renders():
    for size in (32, 64):
        agreement = Agreement()
        for i in range(600):
            scene = make_scene(1, i)
            agreement.add(scene, check_image(render(scene, size)))
        assert agreement.rates()["overall"] >= 0.99, (size, agreement.rates())


def test_a_groups_places_count_only_where_the_truth_is_compared_exactly():
    """A caption of a group names count, colour and shape, not places: an image drawn
    from it agrees wherever its objects stand (`described_only`), unless it is a decoded
    image compared with its original; everything else must still agree."""
    truth = Scene((Obj("left", "square", "blue", "small"), Obj("top", "square", "blue", "small")))
    moved = Scene((Obj("bottom", "square", "blue", "small"), Obj("right", "square", "blue", "small")))
    wrong = [Scene((Obj("left", "square", "red", "small"), Obj("top", "square", "red", "small"))),
             Scene((Obj("left", "square", "blue", "small"),)),
             Scene((Obj("center", "square", "blue", "small"), Obj("top", "square", "blue", "small")))]
    single = Scene((Obj("left", "circle", "red", "large"),))
    described, exact = Agreement(described_only=True), Agreement()
    for agreement in (described, exact):
        agreement.add(truth, moved)
    assert described.rates()["position"] == described.rates()["overall"] == 1.0
    assert exact.rates()["position"] == exact.rates()["overall"] == 0.0
    for found in wrong:
        one = Agreement(described_only=True)
        one.add(truth, found)
        assert one.rates()["overall"] == 0.0, found
    one = Agreement(described_only=True)
    one.add(single, Scene((Obj("right", "circle", "red", "large"),)))  # a single's place is stated
    assert one.rates()["position"] == one.rates()["overall"] == 0.0


def test_checker_reads_a_mild_blur_but_not_an_empty_image():
    scene = Scene((Obj("left", "square", "red", "large"),))
    blurred = render(scene, 64).filter(ImageFilter.GaussianBlur(0.6))
    assert check_image(blurred) == scene
    assert check_image(Image.new("RGB", (32, 32), (242, 240, 235))).count == 0


def test_captions_and_answers_describe_the_scene():
    scene = Scene((Obj("top", "circle", "blue", "small"),))
    caps = captions(scene)
    assert len(set(caps)) == 3 and all("blue circle" in c and "top" in c for c in caps)
    qa = dict(questions(scene, random.Random(0)))
    assert qa["what colour is the shape?"] == "blue"
    assert qa["where is the shape?"] == "top"
    assert qa["how many shapes are there?"] == "one"
    group = make_scene(0, next(i for i in range(100) if make_scene(0, i).is_group))
    n = {2: "two", 3: "three"}[group.count]
    assert captions(group)[0].startswith(n)
    assert all(a in ANSWERS for _, a in questions(group))
