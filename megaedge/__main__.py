import sys

from megaedge.cli.main import main

sys.exit(main())
