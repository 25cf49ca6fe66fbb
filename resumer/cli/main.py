"""The ``resumer`` command: a click group and the table of its commands.

Each command lives in a module of its own family (checkpoints, prune, watch, history, jobs) and imports only
``resumer.cli.common`` and ``resumer.cli.output``; this module imports the commands, never the reverse.
"""

from __future__ import annotations

import logging
import sys

import click

from resumer.cli import checkpoints, convert, history, jobs, output, prune, watch

# name -> command, in the order ``resumer --help`` lists them (sorted by click)
COMMANDS: dict[str, click.Command] = {
    "inspect": checkpoints.inspect, "plan": checkpoints.plan, "resume": checkpoints.resume,
    "list": checkpoints.list_, "demo": checkpoints.demo, "prune": prune.prune, "watch": watch.watch_command,
    "history": history.history_command, "submit": jobs.submit, "status": jobs.status, "stop": jobs.stop,
    "logs": jobs.logs, "convert": convert.convert, "export": convert.export,
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="resumer")
def cli(verbose: int) -> None:
    """Plan and apply resumes of PyTorch training across code changes."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    # Only resumer's own loggers get more verbose: botocore's DEBUG records print signed request headers
    # (the access key id), and other libraries are noise here.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("resumer").setLevel(level)
    logging.getLogger(__name__).debug("debug logging on for resumer's loggers only (storage options redacted)")


for _name, _command in COMMANDS.items():
    cli.add_command(_command, _name)


def main() -> None:
    """The ``resumer`` entry point: this process is the command."""
    output.keep_redirected_at_exit = True  # late prints (Ray threads, exit handlers) never follow the JSON
    cli(prog_name="resumer")


if __name__ == "__main__":
    main()
