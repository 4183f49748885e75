import sys

from kvbm.cli import main

sys.exit(main())
