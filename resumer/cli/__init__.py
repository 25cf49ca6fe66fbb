"""The ``resumer`` command line: a click group (``resumer.cli.main``) and one module per command family."""
