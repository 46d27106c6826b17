"""`python -m fedlink` is the same as the `fedlink` command."""

import sys

from fedlink.main import main

sys.exit(main())
