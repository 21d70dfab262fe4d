import sys

from hatlm.cli import main

sys.exit(main())
