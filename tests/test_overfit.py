"""The honest end-to-end check of objective plus sampler: a tiny model trained with the
diffusion loss memorises a handful of multimodal-shaped samples, and the sampler then
regenerates every response exactly from its prompt alone (after a save/load round trip)."""

from omni_model.toy import FitConfig, fit, regenerate, same_parts, toy_model, toy_samples
from omni_model.transformer import Transformer
from omni_model.vocab import Vocab


def test_tiny_model_overfits_and_sampler_regenerates_responses(tokenizer, vocab, tmp_path):
    model = toy_model(vocab, seed=0)
    samples = toy_samples(vocab, seed=0)
    losses = fit(model, samples, tokenizer, vocab, FitConfig(steps=400, log_every=0))
    assert sum(losses[:10]) / 10 > 5.0
    assert sum(losses[-10:]) / 10 < 0.05  # near zero

    model.save_pretrained(tmp_path)
    vocab.save(tmp_path)
    model, vocab = Transformer.from_pretrained(tmp_path), Vocab.load(tmp_path)
    outputs = regenerate(model, samples, tokenizer, vocab, max_pads=4)
    tasks = ["caption", "t2i", "caption", "t2i", "tts", "asr", "tts", "asr"]
    mismatched = [t for t, s, o in zip(tasks, samples, outputs) if not same_parts(s[-1].parts, o)]
    assert mismatched == []


def test_untrained_model_does_not_regenerate(tokenizer, vocab):
    # the same check fails without training: it is not passing trivially
    samples = toy_samples(vocab, seed=0)
    outputs = regenerate(toy_model(vocab, seed=0), samples, tokenizer, vocab, max_pads=4)
    assert not any(same_parts(s[-1].parts, o) for s, o in zip(samples, outputs))
