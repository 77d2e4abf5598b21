"""The configuration of the tokenizers' training: the data folder, and each tokenizer's
model and training settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni_model.tokenizers.image import MagVitConfig, TrunkConfig
from omni_model.tokenizers.train_image import ImageTrainConfig
from omni_model.tokenizers.train_speech import DecoderTrainConfig, SpeechTrainConfig


@dataclass(frozen=True)
class DataConfig:
    dir: str = "runs/world/train"  #: folder of images, audio (+ .txt transcripts) and text
    #: more folders whose audio also trains the speech codec (transcripts optional), e.g.
    #: SDVI's spoken questions and answers: other voices, single words
    audio_dirs: tuple[str, ...] = ()
    #: manifests whose spoken outputs (the audio of assistant turns: TTS targets, SDVI's
    #: spoken answers) are the voice the model speaks in; the frozen-code decoder is
    #: fitted to those training clips only, so it speaks in that one voice whatever voice
    #: the codes came from, as GLM-4-Voice's decoder does. Empty: every training clip.
    voice_manifests: tuple[str, ...] = ()
    voice_root: str = ""  #: the data root the voice manifests' media paths are relative to
    #: how often the decoder sees each voice clip: "clips" equally; "rows" as often as the
    #: voice manifests' rows say it (SDVI's 21 answer words, 2,400 rows, then weigh twice
    #: what the 1,200 captions do); "sqrt" in proportion to the square root of that (each
    #: answer ~10x a caption, the captions still most of the draws). A clip said by more
    #: than one row trains the decoder even where the split held it out of the codec's
    #: training: the model says it again and again, so the decoder must know it
    voice_draw: str = "sqrt"
    holdout: float = 0.1  #: share of each kind kept out of training for the quality report
    max_images: int | None = None  #: cap on images read (None: all)
    max_audio: int | None = None  #: cap on audio files read (None: all)
    max_audio_seconds: float = 30.0  #: longer files are skipped


@dataclass(frozen=True)
class TextTokenizerConfig:
    vocab_size: int = 1024
    min_frequency: int = 2


@dataclass(frozen=True)
class ImageTokenizerConfig:
    resolution: int = 32  #: square input size
    ch: int = 32  #: trunk width (a multiple of 32: GroupNorm has 32 groups)
    ch_mult: tuple[int, ...] = (1, 2, 2)  #: one entry per level; grid = resolution / 2^(levels-1)
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    attn_resolutions: tuple[int, ...] = ()
    codebook_dim: int = 10  #: 2^codebook_dim codes
    train: ImageTrainConfig = field(default_factory=ImageTrainConfig)

    def model_config(self) -> MagVitConfig:
        trunk = TrunkConfig(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                            attn_resolutions=self.attn_resolutions, resolution=self.resolution,
                            z_channels=self.codebook_dim)
        return MagVitConfig(encoder=trunk, decoder=trunk, codebook_dim=self.codebook_dim,
                            resolution=self.resolution)


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    codebook_size: int = 512
    d_model: int = 128
    layers: int = 4  #: encoder layers (pooled after layer 2, quantized after the last)
    pooling: int = 4  #: 50 Hz frames pooled by this: 4 -> 12.5 codes/s (GLM-4-Voice), 2 -> 25
    attention: str = "causal"  #: the encoder's mask: causal, block_causal (GLM-4-Voice's) or full
    train: SpeechTrainConfig = field(default_factory=SpeechTrainConfig)
    decoder: DecoderTrainConfig = field(default_factory=DecoderTrainConfig)  #: refit on frozen codes
    asr: bool = True  #: score decoded speech with the offline recogniser
    asr_utterances: int | None = 100  #: ... on at most this many held-out clips (each costs ~0.4 s)
    examples: int = 3  #: decoded WAV examples written to the output folder


@dataclass(frozen=True)
class TokenizersConfig:
    out_dir: str = "runs/tokenizers"
    seed: int = 0
    threads: int = 2
    #: a folder of tokenizers trained before (the project ships `pretrained/tokenizers`):
    #: used instead of training when its `trained_on.json` equals what this config would
    #: train on (`training_settings`), else the job trains and says why. None: always train
    shipped: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    text: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    image: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    speech: SpeechTokenizerConfig = field(default_factory=SpeechTokenizerConfig)
