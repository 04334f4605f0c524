"""``python -m tests.consul_agent``: run the Consul test agent on its own."""

import sys

from .core import main

if __name__ == "__main__":
    sys.exit(main())
