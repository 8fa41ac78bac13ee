import sys

from tmpq.cli import main

sys.exit(main())
