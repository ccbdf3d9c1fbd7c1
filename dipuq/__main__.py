import sys

from dipuq.cli import main

sys.exit(main())
