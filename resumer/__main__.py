"""``python -m resumer``: the same command as the ``resumer`` entry point."""

import os
import sys

# ``python -m`` put the working directory first on sys.path: take it off, so that a file there (a netrc.py,
# a json.py) cannot shadow a module the CLI imports later. Only --model MODULE may come from it.
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from resumer.cli.main import main  # noqa: E402

main()
