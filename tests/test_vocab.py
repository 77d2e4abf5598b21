import pytest
import torch

from omni_model.vocab import REQUIRED_SPECIALS, IdRange, Vocab


def test_fresh_layout_is_text_specials_image_speech():
    v = Vocab.fresh(text_size=100, image_codes=32, speech_codes=16)
    assert v.text_range == IdRange(0, 100)
    assert sorted(v.specials.values()) == list(range(100, 100 + len(REQUIRED_SPECIALS)))
    assert v.image_range.start == 100 + len(REQUIRED_SPECIALS)
    assert v.speech_range.start == v.image_range.stop
    assert v.size == v.speech_range.stop
    assert v.mask_id == v.special("mask") and v.boa_id == v.specials["boa"]
    assert len(set(v.specials.values())) == len(v.specials)


def test_published_checkpoint_layout_on_the_dream_backbone():
    # Dream-7B: Qwen2.5 text ids and specials up to the mask id 151666 (151,667 ids);
    # the published Omni-Diffusion checkpoint appends 21 specials, then speech, then image.
    dream = {"eot": 151643, "pad": 151643, "im_start": 151644, "im_end": 151645, "mask": 151666}
    new_required = [n for n in REQUIRED_SPECIALS if n not in dream]
    extra = [f"reserved_{i}" for i in range(21 - len(new_required))]
    v = Vocab.extend_backbone(151667, dream, image_codes=8192, speech_codes=16384,
                              code_order=("speech", "image"), extra_specials=extra)
    assert (v.speech_range.start, v.speech_range.stop - 1) == (151688, 168071)
    assert (v.image_range.start, v.image_range.stop - 1) == (168072, 176263)
    assert v.size == 176264
    assert v.mask_id == 151666 and v.eot_id == 151643 and v.pad_id == 151643
    assert min(v.specials[n] for n in new_required) == 151667


def test_code_conversions_round_trip_and_reject_out_of_range():
    v = Vocab.fresh(50, 8, 4)
    codes = torch.tensor([0, 7, 3])
    ids = v.image_to_ids(codes)
    assert all(int(i) in v.image_range for i in ids)
    assert torch.equal(v.ids_to_image(ids), codes)
    assert torch.equal(v.ids_to_speech(v.speech_to_ids([3, 0])), torch.tensor([3, 0]))
    with pytest.raises(ValueError):
        v.image_to_ids([8])
    with pytest.raises(ValueError):
        v.ids_to_speech(ids)  # image ids are not speech ids
    assert v.modality_of(int(ids[0])) == "image"
    assert v.modality_of(v.mask_id) == "special"
    assert v.modality_of(10) == "text"


def test_save_load_round_trip(tmp_path):
    v = Vocab.extend_backbone(300, {"mask": 299, "eot": 298}, 16, 8, code_order=("speech", "image"))
    v.save(tmp_path)
    assert Vocab.load(tmp_path) == v
    assert Vocab.load(tmp_path / "vocab.json").speech_range == v.speech_range


def test_allowed_mask_per_modality():
    v = Vocab.extend_backbone(300, {"mask": 299, "eot": 298}, 16, 8)
    text = v.allowed_mask("text")
    assert not text[v.mask_id] and not text[v.eot_id] and text[5]
    assert int(text.sum()) == 298  # text range minus the two backbone specials inside it
    text_end = v.allowed_mask("text", ["pad", "im_end"])
    assert text_end[v.pad_id] and text_end[v.im_end_id]
    image = v.allowed_mask("image")
    assert int(image.sum()) == 16 and image[v.image_range.start] and not image[v.speech_range.start]


def test_invalid_layouts_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        Vocab(size=20, ranges={"text": IdRange(0, 10), "image": IdRange(5, 5),
                               "speech": IdRange(15, 5)},
              specials={n: 10 + i for i, n in enumerate(REQUIRED_SPECIALS)})
    with pytest.raises(ValueError, match="lacks the special"):
        Vocab(size=30, ranges={"text": IdRange(0, 10), "image": IdRange(10, 5),
                               "speech": IdRange(15, 5)}, specials={"mask": 20})
