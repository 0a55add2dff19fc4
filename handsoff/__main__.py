from handsoff.cli import main

raise SystemExit(main())
