"""GLM-4-Voice's speech decoder (flow matching + HiFT vocoder), re-implemented in PyTorch."""
