import sys

from raylign.cli import main

sys.exit(main())
