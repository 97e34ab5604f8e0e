import sys

from smoothsmoe_server.commands.cli import main

sys.exit(main())
