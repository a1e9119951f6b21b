import sys

from aligndistil.cli import main

sys.exit(main())
