from kubemeter_cli.main import main

raise SystemExit(main())
