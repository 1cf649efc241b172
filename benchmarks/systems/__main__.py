import sys

from benchmarks.systems import main

sys.exit(main())
