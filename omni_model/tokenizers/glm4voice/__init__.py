"""GLM-4-Voice's speech decoder (codes -> 22,050 Hz audio), written for this project.

`GLM4VoiceDecoder.from_folder("/models/glm-4-voice-decoder")` loads the released folder
(`config.yaml`, `flow.pt`, `hift.pt`) without the GLM-4-Voice repository: `config.py`
reads the HyperPyYAML config without executing it; `conformer.py`, `estimator.py` and
`flow.py` make mel frames by flow matching; `hift.py` is the vocoder; `decoder.py` runs
them in one pass or in chunks (`stream`).
"""

from omni_model.tokenizers.glm4voice.decoder import GLM4VoiceDecoder, SpeechStream

__all__ = ["GLM4VoiceDecoder", "SpeechStream"]
