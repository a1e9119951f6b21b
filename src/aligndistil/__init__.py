"""aligndistil: token-level preference alignment of causal language models.

The package is layered: ``aligndistil.losses`` holds the mathematics as pure tensor
functions; ``aligndistil.model.outputs`` aligns model outputs to the response tokens they
predict; everything that touches models, data or the file system builds on those two.
"""

__version__ = "0.1.0"
