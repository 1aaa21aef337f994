from pertflow.cli import main

raise SystemExit(main())
