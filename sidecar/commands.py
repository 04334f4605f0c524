"""The CLI's look-and-call commands beside the sidecar itself: `services`, `call`, `status`.

`micro-sidecar services|call|status ...` is dispatched here by `cli.main`; everything else
on the command line runs the sidecar.
"""

from __future__ import annotations

import click

COMMANDS: dict[str, click.Command] = {}
