"""The version of this resumer (``resumer.__version__``); written into every manifest."""

__version__ = "0.1.0"
