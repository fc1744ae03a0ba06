import sys

from mixdit.cli import main

sys.exit(main())
