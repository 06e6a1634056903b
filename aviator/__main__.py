from aviator.cli import main

raise SystemExit(main())
