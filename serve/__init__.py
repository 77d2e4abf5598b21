"""The Ray Serve application over the any-to-any sampler (a later issue)."""
