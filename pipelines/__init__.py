"""Ray Data and Ray Train stages of the Omni-Diffusion pipeline (reusable; no argument parsing)."""
