import sys

from smoothsmoe_server.cli import main

sys.exit(main())
