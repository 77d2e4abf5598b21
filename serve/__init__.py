"""The Ray Serve application over the any-to-any sampler: `app.py` (deployment and
routes), `engine.py` (what a replica does with a request, without Ray), `schemas.py`,
`media.py`, `errors.py`, `config.py`, and `soak.py` (a bounded soak run over HTTP)."""
