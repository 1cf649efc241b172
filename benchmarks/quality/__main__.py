import sys

from benchmarks.quality import main

sys.exit(main())
