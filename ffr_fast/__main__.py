import sys

from ffr_fast.cli import main

sys.exit(main())
