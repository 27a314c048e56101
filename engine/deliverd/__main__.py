from __future__ import annotations

from deliverd.cli import main

raise SystemExit(main())
