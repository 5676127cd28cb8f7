"""SimCLR (arXiv 2002.05709): learn an image encoder without labels."""

from simclr.errors import SimCLRError

__all__ = ["SimCLRError"]
