import sys

from dsv3_rt.cli import main

sys.exit(main())
