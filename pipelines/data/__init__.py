"""The data path: manifests, media probing, tokenization into shards, the shard format, imports."""
