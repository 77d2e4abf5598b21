import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_model.batching import pack
from omni_model.transformer import Transformer, TransformerConfig
from omni_model.vocab_resize import resize_vocab


@pytest.fixture(scope="module")
def dream(fixtures_dir):
    return Transformer.from_pretrained(fixtures_dir / "dream_tiny_a").eval()


def test_dream_fixture_logits_match_reference(dream, fixtures_dir):
    ref = load_file(str(fixtures_dir / "dream_tiny_a" / "reference.safetensors"))
    with torch.no_grad():
        logits = dream(ref["input_ids"])
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max().item() <= 1e-4


def test_save_pretrained_round_trips_the_dream_layout(dream, fixtures_dir, tmp_path):
    dream.save_pretrained(tmp_path)
    original = load_file(str(fixtures_dir / "dream_tiny_a" / "model.safetensors"))
    written = load_file(str(tmp_path / "model.safetensors"))
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in original.items()}
    assert all(torch.equal(written[k], original[k]) for k in original)
    config = json.loads((tmp_path / "config.json").read_text())
    source = json.loads((fixtures_dir / "dream_tiny_a" / "config.json").read_text())
    assert {k: config[k] for k in source} == source  # every original key written back
    reloaded = Transformer.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), dream(ids))


def test_loading_is_strict(fixtures_dir, tmp_path):
    shutil.copy(fixtures_dir / "dream_tiny_a" / "config.json", tmp_path / "config.json")
    state = load_file(str(fixtures_dir / "dream_tiny_a" / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="up_proj"):
        Transformer.from_pretrained(tmp_path)


def test_sharded_checkpoint_loads(dream, fixtures_dir, tmp_path):
    state = load_file(str(fixtures_dir / "dream_tiny_a" / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(fixtures_dir / "dream_tiny_a" / "config.json", tmp_path / "config.json")
    model = Transformer.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), dream(ids))


def test_attention_is_bidirectional(dream):
    ids = torch.randint(0, 320, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 320
    with torch.no_grad():
        a, b = dream(ids), dream(changed)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4  # the first position sees the last


def test_logit_shift_predicts_from_previous_position(fixtures_dir, dream):
    shifted = Transformer.from_pretrained(fixtures_dir / "dream_tiny_a", shift_logits=True).eval()
    ids = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        raw, out = dream(ids), shifted(ids)
    assert torch.equal(out[:, 1:], raw[:, :-1])
    assert torch.equal(out[:, 0], raw[:, 0])


def test_document_mask_isolates_packed_samples(dream):
    a, b = torch.randint(0, 320, (7,)), torch.randint(0, 320, (5,))
    batch = pack([(a, torch.zeros(7, dtype=torch.bool)), (b, torch.zeros(5, dtype=torch.bool))],
                 max_len=16, pad_id=0)
    assert batch.input_ids.shape == (1, 16)
    with torch.no_grad():
        packed = dream(batch.input_ids, attention_mask=batch.attention_mask, doc_ids=batch.doc_ids)
        alone_a, alone_b = dream(a[None]), dream(b[None])
    assert (packed[0, :7] - alone_a[0]).abs().max() < 1e-5
    assert (packed[0, 7:12] - alone_b[0]).abs().max() < 1e-5


def test_left_padding_is_invisible(dream):
    ids = torch.randint(0, 320, (6,))
    padded = torch.cat([torch.zeros(3, dtype=torch.long), ids])[None]
    attn = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = dream(padded, attention_mask=attn)[0, 3:]
        ref = dream(ids[None])[0]
    assert (out - ref).abs().max() < 1e-5


def test_resize_vocab_keeps_rows_and_adds_average_ones(fixtures_dir):
    model = Transformer.from_pretrained(fixtures_dir / "dream_tiny_a").eval()
    old_embed = model.model.embed_tokens.weight.clone()
    old_head = model.lm_head.weight.clone()
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        before = model(ids)
    resize_vocab(model, 320 + 40)
    assert model.config.vocab_size == 360
    assert model.model.embed_tokens.weight.shape == (360, 64)
    assert torch.equal(model.model.embed_tokens.weight[:320], old_embed)
    assert torch.equal(model.lm_head.weight[:320], old_head)
    new = model.model.embed_tokens.weight[320:]
    assert torch.isfinite(new).all()
    # new rows sit near the mean of the old ones, closer than a typical old row does
    mean = old_embed.mean(0)
    assert (new - mean).norm(dim=1).mean() < (old_embed - mean).norm(dim=1).mean()
    with torch.no_grad():
        after = model(ids)
    assert torch.allclose(after[..., :320], before, atol=1e-5)  # old tokens' logits unchanged


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 10))

    def grads(checkpointing: bool):
        tiny_model.train().set_gradient_checkpointing(checkpointing)
        tiny_model.zero_grad()
        tiny_model(ids).logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in tiny_model.parameters()]

    for g1, g2 in zip(grads(False), grads(True)):
        assert torch.allclose(g1, g2, atol=1e-6)


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError):
        TransformerConfig(vocab_size=10, hidden_size=30, intermediate_size=8,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)


def test_bf16_autocast_modes(tiny_model):
    """`precision`: none keeps float32, bf16 computes the matmuls in bf16 (close to float32),
    auto follows the processor's bf16 flags; an unknown mode is refused."""
    from omni_model.precision import autocast, bf16_enabled, cpu_has_native_bf16

    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
    with torch.no_grad():
        with autocast("cpu", "none"):
            ref = tiny_model(ids)
        with autocast("cpu", "bf16"):
            low = tiny_model(ids)
    assert ref.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert not torch.equal(low.float(), ref)
    assert torch.allclose(low.float(), ref, atol=0.1, rtol=0.05)
    assert bf16_enabled("cpu", "auto") == cpu_has_native_bf16()
    assert not bf16_enabled("cpu", "none") and bf16_enabled("cpu", "bf16")
    with pytest.raises(ValueError, match="precision"):
        bf16_enabled("cpu", "fp8")


def test_a_span_against_a_fresh_cache_equals_the_full_pass_with_packed_documents():
    """`forward_span` reuses the full pass's keys, values, RoPE tables and attention mask
    (padding and the document mask of packed rows alike)."""
    from omni_model.transformer import Transformer, TransformerConfig

    for shift in (False, True):
        cfg = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, shift_logits=shift)
        model = Transformer.from_config(cfg, seed=3).eval()
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
        docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
        attn = torch.ones(2, 24, dtype=torch.long)
        attn[1, :5] = 0
        with torch.no_grad():
            full, cache = model(ids, attention_mask=attn, doc_ids=docs, return_cache=True)
            assert torch.equal(full, model(ids, attention_mask=attn, doc_ids=docs))
            for start, end in ((12, 24), (0, 7), (9, 13)):
                torch.testing.assert_close(model.forward_span(ids, cache, start, end), full[:, start:end])


def test_spans_of_several_cached_sequences_in_one_pass_equal_each_alone():
    """`forward_spans` (the step scheduler's shared span pass): sequences of different
    lengths, span widths and row counts (two rows: a guided request), with padding, give
    each the logits of its own `forward_span`, and update its cache the same way."""
    from omni_model.transformer import Transformer, TransformerConfig

    gen = torch.Generator().manual_seed(1)
    for shift in (False, True):
        cfg = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, shift_logits=shift)
        model = Transformer.from_config(cfg, seed=3).eval()
        sequences = []
        for rows, length, pad, (start, end) in ((1, 30, 0, (20, 30)), (2, 17, 3, (5, 9)), (1, 41, 6, (0, 41))):
            ids = torch.randint(0, 64, (rows, length), generator=gen)
            attn = torch.ones(rows, length, dtype=torch.long)
            attn[:, :pad] = 0
            sequences.append((ids, attn, start, end))
        with torch.no_grad():
            alone, together = [], []
            for ids, attn, start, end in sequences:
                changed = ids.clone()  # positions committed since the cache was made
                changed[:, start:end] = torch.randint(0, 64, (ids.shape[0], end - start), generator=gen)
                _, cache = model(ids, attention_mask=attn, return_cache=True)
                alone.append((model.forward_span(changed, cache, start, end), cache))
                _, cache = model(ids, attention_mask=attn, return_cache=True)
                together.append((changed, cache, start, end))
            for (logits, cache), shared, (_, shared_cache, _, _) in zip(alone, model.forward_spans(together),
                                                                        together):
                torch.testing.assert_close(shared, logits)
                for k, k_shared, v, v_shared in zip(cache.keys, shared_cache.keys, cache.values,
                                                    shared_cache.values):
                    torch.testing.assert_close(k_shared, k)
                    torch.testing.assert_close(v_shared, v)


def _image_model(positions: int = 4, shift: bool = False) -> Transformer:
    cfg = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, shift_logits=shift,
                            image_position_embeddings=positions, image_start_token_id=1, image_end_token_id=2)
    model = Transformer.from_config(cfg, seed=3).eval()
    with torch.no_grad():  # large enough to move the logits visibly
        model.model.embed_image_positions.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    return model


def test_image_position_embeddings_mark_each_code_by_its_place_in_its_image(tmp_path):
    """`image_position_embeddings`: a code's place in its image (counted from
    `<|begin_of_image|>`, none outside images) is added to its embedding, in the full
    pass, the span passes of the sampler's caches, and through save/load; off (0), the
    checkpoint keeps Dream's tensors exactly."""
    from omni_model.transformer import image_code_index

    # text, image of 4 codes, text, image of 3 codes (fewer than the table), text
    ids = torch.tensor([[5, 1, 9, 9, 9, 9, 2, 7, 7, 1, 9, 9, 9, 2, 3, 4]])
    index = image_code_index(ids, 1, 2)
    assert index.tolist() == [[-1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 0, 1, 2, -1, -1, -1]]
    model = _image_model()
    with torch.no_grad():
        full, cache = model(ids, return_cache=True)
        plain = Transformer(model.config.replace(image_position_embeddings=0))
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "image_positions" not in k})
        without = plain.eval()(ids)
        # the same code at another place of its image: other logits; outside images: the same inputs
        assert not torch.allclose(full[0, 2], full[0, 3], atol=1e-3)
        assert not torch.allclose(full, without, atol=1e-3)
        assert torch.equal(full, model(ids, image_index=index))
        torch.testing.assert_close(model.forward_span(ids, cache, 3, 11), full[:, 3:11])
        torch.testing.assert_close(model.forward_spans([(ids, cache, 9, 14)])[0], full[:, 9:14])
    model.save_pretrained(tmp_path / "with")
    assert torch.equal(Transformer.from_pretrained(tmp_path / "with").eval()(ids), full)
    plain.save_pretrained(tmp_path / "without")
    assert not any("image_positions" in k for k in load_file(tmp_path / "without" / "model.safetensors"))
    with pytest.raises(ValueError, match="image_start_token_id"):
        TransformerConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, image_position_embeddings=4)


def test_training_places_image_codes_by_the_clean_sequence_when_the_start_marker_is_masked():
    """A text-to-image response starts with `<|begin_of_image|>`, which training masks
    like any response token; the objective reads the codes' places from the clean
    sequence, as the sampler's layout (whose marker is fixed) gives them."""
    from omni_model.batching import collate
    from omni_model.objective import Objective, diffusion_loss_of_batch
    from omni_model.transformer import image_code_index
    from omni_model.vocab import Vocab

    model = _image_model()
    vocab = Vocab.fresh(40, 8, 8)
    model.config = model.config.replace(image_start_token_id=vocab.boi_id, image_end_token_id=vocab.eoi_id,
                                        vocab_size=64)
    codes = vocab.image_to_ids([0, 1, 2, 3]).tolist()
    ids = torch.tensor([5, 6, vocab.boi_id, *codes, vocab.eoi_id])
    response = torch.tensor([False, False] + [True] * 6)
    batch = collate([(ids, response)], vocab.pad_id)
    objective = Objective(pad_ratio=0.0, eps_t=1.0, schedule="uniform", weighting="none")  # t = 1: all masked
    out = diffusion_loss_of_batch(model, batch, vocab, objective, generator=torch.Generator().manual_seed(0))
    assert (out.noisy.noisy_ids[0, 2:] == vocab.mask_id).all()
    with torch.no_grad():
        clean = model(out.noisy.noisy_ids, image_index=image_code_index(batch.input_ids, vocab.boi_id, vocab.eoi_id))
        guessed = model(out.noisy.noisy_ids)
    masked = out.noisy.target_mask
    torch.testing.assert_close(out.logits.detach(), clean[masked])
    assert not torch.allclose(out.logits.detach(), guessed[masked], atol=1e-3)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("window", [(0, 37), (0, 5), (1, 9), (20, 37), (36, 37)])
def test_logits_of_a_range_equal_those_positions_of_the_full_pass(fixtures_dir, shift, window):
    model = Transformer.from_pretrained(fixtures_dir / "dream_tiny_a", shift_logits=shift).eval()
    ids = load_file(fixtures_dir / "dream_tiny_a" / "reference.safetensors")["input_ids"]
    with torch.no_grad():
        full = model(ids)
        part = model(ids, logits_range=window)
        cached, _ = model(ids, return_cache=True, logits_range=window)
    assert part.shape == (2, window[1] - window[0], full.shape[-1])
    torch.testing.assert_close(part, full[:, window[0]:window[1]], atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, part, atol=0, rtol=0)


@pytest.mark.parametrize("shift", [False, True])
def test_logits_at_chosen_positions_equal_those_of_the_full_pass_and_train_alike(fixtures_dir, shift):
    model = Transformer.from_pretrained(fixtures_dir / "dream_tiny_a", shift_logits=shift)
    ids = load_file(fixtures_dir / "dream_tiny_a" / "reference.safetensors")["input_ids"]
    chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    chosen[0, 0] = True  # position 0 too (with the shift it keeps its own hidden state)
    full = model(ids)
    part = model(ids, logits_at=chosen)
    assert part.shape == (int(chosen.sum()), full.shape[-1])
    torch.testing.assert_close(part, full[chosen], atol=1e-5, rtol=0)
    # the same loss and the same gradients as through the full logits
    target = torch.randint(0, full.shape[-1], (int(chosen.sum()),))
    grads = []
    for scored in (lambda: model(ids)[chosen], lambda: model(ids, logits_at=chosen)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(scored(), target).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for through_full, through_part in zip(*grads):
        torch.testing.assert_close(through_part, through_full, atol=1e-6, rtol=1e-4)


def test_flex_attention_over_packed_documents_equals_the_dense_mask(tiny_model):
    """The block-sparse FlexAttention mask (GPU training) gives the dense SDPA mask's
    logits: three documents and right padding in a row, two rows. (FlexAttention has no
    backward pass on the CPU: its gradients are compared by benchmarks/gpu_check.py.)"""
    torch.manual_seed(4)
    ids = torch.randint(0, 200, (2, 150))
    doc_ids = torch.cat([torch.zeros(2, 40), torch.ones(2, 70), torch.full((2, 40), 2)], 1).long()
    attention = torch.ones(2, 150, dtype=torch.long)
    attention[1, 130:] = 0
    with torch.no_grad():
        dense = tiny_model.set_attention("sdpa")(ids, attention_mask=attention, doc_ids=doc_ids)
        flex = tiny_model.set_attention("flex")(ids, attention_mask=attention, doc_ids=doc_ids)
    tiny_model.set_attention("sdpa")
    keep = attention.bool()
    torch.testing.assert_close(flex[keep], dense[keep], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="attention 'xla'"):
        tiny_model.set_attention("xla")
    from pipelines.train.config import ModelConfig

    with pytest.raises(ValueError, match="model.attention 'xla'"):
        ModelConfig(attention="xla")


@pytest.mark.parametrize("shift", [False, True])
def test_logits_of_some_columns_are_those_columns_of_the_whole_row(shift):
    """`logits_columns`: the output layer's rows of those ids only (a sampler's step over
    a t2i answer's image codes), equal to the same columns of the whole row's logits, in
    a full pass, with its cache, and in a span pass against that cache."""
    from omni_model.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, shift_logits=shift)).eval()
    ids = torch.randint(0, 97, (2, 12))
    columns = torch.tensor([3, 10, 11, 40, 96])
    with torch.no_grad():
        whole = model(ids, logits_range=(5, 12))
        some = model(ids, logits_range=(5, 12), logits_columns=columns)
        assert some.shape == (2, 7, 5)
        torch.testing.assert_close(some, whole[..., columns])
        _, cache = model(ids, return_cache=True, logits_range=(5, 12), logits_columns=columns)
        span = model.forward_span(ids, cache, 6, 9, logits_columns=columns)
        torch.testing.assert_close(span, model.forward_span(ids, cache, 6, 9)[..., columns])
