import sys

from falconlm.cli import main

sys.exit(main())
