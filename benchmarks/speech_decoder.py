"""How well speech codecs' decoders say what the model is trained to say, on a built world:
each distinct spoken answer of the held-out spoken VQA (weighted by how often the first
N questions ask for it) and the held-out TTS captions, encoded, decoded (code-to-mel +
Griffin-Lim) and transcribed by Whisper tiny.en. The codes are the tokenizer's; only the
decoders differ between the folders compared. Prints, per folder, the share of answers
heard (the ceiling of the report's "spoken answer says it"), the words never heard, and
the captions' WER (the floor under the TTS figure), beside the captions' WER as
recorded and through Griffin-Lim from their true log-mel (what the decoder adds).

    .venv/bin/python benchmarks/speech_decoder.py --world runs/world \
        --codecs pretrained/tokenizers/speech runs/tokenizers/speech
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from omni_model.tokenizers.codec import SpeechCodec
from omni_model.tokenizers.mel import SAMPLE_RATE, log_mel, mel_to_waveform, resample, to_mono
from pipelines.data.manifest import parse_line, read_lines, resolve_media
from pipelines.data.media import load_audio
from pipelines.evaluation.asr import WhisperRecognizer
from pipelines.evaluation.scores import says
from pipelines.evaluation.standard import asr_scores


def clip(world: Path, rel: str) -> torch.Tensor:
    data, rate = load_audio(resolve_media(world, rel), 30.0)
    return resample(to_mono(data), rate, SAMPLE_RATE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", required=True, help="a built world (runs/world)")
    parser.add_argument("--codecs", nargs="+", required=True, help="speech codec folders to compare")
    parser.add_argument("--questions", type=int, default=100, help="held-out spoken VQA rows weighing the answers")
    parser.add_argument("--captions", type=int, default=48, help="held-out TTS captions")
    args = parser.parse_args()
    world = Path(args.world)
    torch.set_num_threads(2)
    rows = [parse_line(line, world) for _, line in read_lines(world / "manifests/sdvi_eval/svqa.jsonl")]
    answers = Counter((r.messages[1]["content"].replace("<|audio|>", "").strip(), r.spoken_outputs()[0])
                      for r in rows[: args.questions])
    tts = [parse_line(line, world) for _, line in read_lines(world / "manifests/eval/tts.jsonl")][: args.captions]
    captions = [(r.messages[0]["content"].splitlines()[-1], r.audios[0]) for r in tts]
    recognizer = WhisperRecognizer()
    texts = [text for text, _ in captions]
    waves = [clip(world, rel) for _, rel in captions]  # each clip read once, whatever the folders
    answer_waves = {key: clip(world, key[1]) for key in sorted(answers)}

    def caption_wer(decoded: list[torch.Tensor]) -> float:
        return round(asr_scores(texts, [recognizer.transcribe(w.numpy(), SAMPLE_RATE) for w in decoded])["wer"], 3)

    results = {"captions as recorded": {"caption_wer": caption_wer(waves)},
               "captions, true log-mel + Griffin-Lim": {"caption_wer": caption_wer(
                   [mel_to_waveform(log_mel(w[None]))[0] for w in waves])}}
    for name, value in results.items():
        print(f"{name}: caption WER {value['caption_wer']:.3f}")
    for folder in args.codecs:
        codec = SpeechCodec.from_pretrained(folder)

        def through(wave: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return codec.decode([codec.encode([wave], SAMPLE_RATE)[0]])[0]

        per_word = {word: (answers[(word, rel)],
                           says([word], [recognizer.transcribe(through(wave).numpy(), codec.sample_rate)]))
                    for (word, rel), wave in answer_waves.items()}
        share = sum(n * ok for n, ok in per_word.values()) / sum(n for n, _ in per_word.values())
        wer = caption_wer([through(w) for w in waves])
        results[folder] = {"answers_heard": round(share, 3),
                           "words_unheard": [w for w, (_, ok) in per_word.items() if not ok], "caption_wer": wer}
        print(f"{folder}: answers heard {share:.3f} ({len(per_word)} words; never heard: "
              f"{results[folder]['words_unheard']}), caption WER {wer:.3f}")
    recognizer.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
