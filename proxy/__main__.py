"""`python -m proxy` is the same as the `tlsproxy` command."""
import sys

from proxy.cli import main

sys.exit(main())
