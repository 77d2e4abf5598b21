"""Evaluation of a trained model on held-out examples (never seen in training).

Every task goes through the any-to-any API (`omni_model.any_to_any.AnyToAny`), the same
object the server uses, batched the way the server batches (`batch_key`):

- t2i and s2i: the world's attribute checker reads the generated image back (colour,
  shape, position, size, count, overall agreement with the scene that was asked for);
- caption and VQA: exact match of the normalised answer (a caption matches any of the
  world's wordings of its scene);
- ASR: word error rate; TTS: intelligibility, the WER of Whisper's transcript of the
  generated speech;
- spoken VQA: exact match of the text answer and, with a recogniser, whether the spoken
  answer says it, beside the same for the reference answer audio and for that audio
  passed through the speech tokenizer (the ceiling the speech codes allow);
- t2i accuracy against the number of sampler steps, with and without the position penalty.

Modules: `tasks` (the table of tasks: outputs, reference, scorer, prior guess), `scores`
(pure scoring functions), `cases` (manifests into cases), `calibrate` (response lengths
from the training shards), `report` (the report folder and its charts), `run` (the driver),
`asr` (the offline recogniser that transcribes speech).
"""

from pipelines.evaluation.calibrate import calibrate_presets
from pipelines.evaluation.cases import load_cases
from pipelines.evaluation.report import format_report
from pipelines.evaluation.run import EvalConfig, evaluate, run_cases
from pipelines.evaluation.scores import chance_levels, exact_match, says, score_images
from pipelines.evaluation.tasks import EVAL_TASKS, Case, Prediction, TaskSpec, prior_guess

__all__ = ["EVAL_TASKS", "Case", "EvalConfig", "Prediction", "TaskSpec", "calibrate_presets", "chance_levels",
           "evaluate", "exact_match", "format_report", "load_cases", "prior_guess", "run_cases", "says",
           "score_images"]
