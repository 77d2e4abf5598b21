import pytest

from omni_model.templates import (Image, Message, Speech, Text, decode_response, encode_prompt,
                                  encode_sample, split_placeholders)


def _conversation():
    return [
        Message("system", (Text("Be brief."),)),
        Message("user", (Image((1, 2, 3, 4), (2, 2)), Text("What is it? Say it."))),
        Message("assistant", (Text("a cat"), Speech((5, 6, 7)))),
    ]


def test_sample_renders_chat_template_with_media_markers(tokenizer, vocab):
    enc = encode_sample(_conversation(), tokenizer, vocab)
    ids, resp = enc.ids, enc.response_mask
    assert len(ids) == len(resp)
    prompt, response = ids[: enc.prompt_length], ids[enc.prompt_length:]
    assert all(resp[enc.prompt_length:]) and not any(resp[: enc.prompt_length])
    # prompt: three headers (system, user, assistant), two closed turns
    assert prompt.count(vocab.im_start_id) == 3 and prompt.count(vocab.im_end_id) == 2
    assert prompt[-len(tokenizer.encode("assistant\n")) - 1] == vocab.im_start_id
    i = prompt.index(vocab.boi_id)
    assert prompt[i + 1:i + 5] == vocab.image_to_ids([1, 2, 3, 4]).tolist()
    assert prompt[i + 5] == vocab.eoi_id
    # response: text, then boa codes eoa, then im_end
    assert tokenizer.decode(response[:5]) == "a cat"
    assert response[5] == vocab.boa_id and response[-2] == vocab.eoa_id
    assert response[-1] == vocab.im_end_id
    assert vocab.ids_to_speech(response[6:9]).tolist() == [5, 6, 7]


def test_prompt_of_a_sample_equals_its_generation_prompt(tokenizer, vocab):
    conv = _conversation()
    enc = encode_sample(conv, tokenizer, vocab)
    assert encode_prompt(conv[:-1], tokenizer, vocab) == enc.ids[: enc.prompt_length]


def test_decode_response_round_trips_parts(tokenizer, vocab):
    conv = _conversation()
    enc = encode_sample(conv, tokenizer, vocab)
    response = enc.ids[enc.prompt_length:] + [vocab.pad_id] * 3 + tokenizer.encode("junk")
    parts = decode_response(response, tokenizer, vocab)
    assert parts == [Text("a cat"), Speech((5, 6, 7))]
    image = decode_response([vocab.boi_id, *vocab.image_to_ids([9, 8]).tolist(), vocab.eoi_id,
                             vocab.im_end_id], tokenizer, vocab)
    assert image == [Image((9, 8))]


def test_split_placeholders_takes_media_in_order():
    images = iter([Image((1,)), Image((2,))])
    audios = iter([Speech((3,))])
    parts = split_placeholders("A <|image|> and <|image|><|audio|>!", images, audios)
    assert parts == [Text("A "), Image((1,)), Text(" and "), Image((2,)), Speech((3,)), Text("!")]


def test_bad_samples_raise(tokenizer, vocab):
    with pytest.raises(ValueError, match="role"):
        Message("robot", (Text("hi"),))
    with pytest.raises(ValueError, match="assistant"):
        encode_sample([Message("user", (Text("hi"),))], tokenizer, vocab)
    with pytest.raises(ValueError):
        encode_sample([Message("user", (Image((10_000,)),)), Message("assistant", (Text("x"),))],
                      tokenizer, vocab)
