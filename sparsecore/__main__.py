import sys

from sparsecore.cli import main

sys.exit(main())
