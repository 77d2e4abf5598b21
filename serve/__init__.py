"""The Ray Serve application over the any-to-any sampler: `app.py` (deployment and
routes), `engine.py` and `release_engine.py` (what a replica does with a request, without
Ray), `scheduler.py` (step-level batching), `schemas.py`, `media.py`, `errors.py`,
`config.py`, `threads.py`. Its load clients live in benchmarks/ (`_soak.py`)."""
