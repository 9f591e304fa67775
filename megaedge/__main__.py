import sys

from megaedge.cli.main import console

sys.exit(console())
