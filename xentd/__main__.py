import sys

from xentd.cli import main

sys.exit(main())
