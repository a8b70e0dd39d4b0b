"""``python -m anomaly``: see anomaly.cli."""
from .cli import main

raise SystemExit(main())
