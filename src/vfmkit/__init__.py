"""vfmkit: train small, fast vision and vision-language models by transferring knowledge from big ones."""

__version__ = "0.1.0"
