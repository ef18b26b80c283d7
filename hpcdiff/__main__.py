import sys

from hpcdiff.cli import main

sys.exit(main())
