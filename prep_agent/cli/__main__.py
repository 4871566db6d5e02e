"""``python -m prep_agent.cli``: the ``prep-agent`` command."""

import sys

from prep_agent.cli.main import main

sys.exit(main())
