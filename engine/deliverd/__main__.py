from __future__ import annotations

from deliverd.cli.main import main

raise SystemExit(main())
