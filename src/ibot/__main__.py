import sys

from ibot.cli import main

sys.exit(main())
