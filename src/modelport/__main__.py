import sys

from modelport.entrypoints.cli import main

sys.exit(main())
