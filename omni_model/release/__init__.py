"""The released Omni-Diffusion model's own formats: its tokenizer files and id table,
its chat prompts, its checkpoint folder and its sampler, so the authors' checkpoint runs
here exactly as their code runs it. The project's own models use `omni_model.vocab`,
`omni_model.templates` and `omni_model.sampler` instead; a model folder says which kind
it is (`omni_model.release.model.is_release_folder`)."""
