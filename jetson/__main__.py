import sys

from jetson.cli import main

sys.exit(main())
