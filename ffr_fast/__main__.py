import sys

from ffr_fast.study.cli import main

sys.exit(main())
