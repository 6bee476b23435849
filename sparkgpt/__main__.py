import sys

from sparkgpt.cli import main

sys.exit(main())
