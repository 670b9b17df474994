import sys

from pulsar_rest.cli import main

sys.exit(main())
