"""Training the small tokenizers of the embedded default: config, data, train, quality, shipped."""
