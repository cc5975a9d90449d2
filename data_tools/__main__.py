"""`python -m data_tools ...` is `clip-data ...`."""

from data_tools.cli import main

raise SystemExit(main())
