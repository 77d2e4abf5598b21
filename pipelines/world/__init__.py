"""The synthetic world of the embedded default: scenes, their checker, speech, SDVI, and building its data."""
