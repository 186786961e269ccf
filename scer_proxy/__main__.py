from scer_proxy.cli import main

raise SystemExit(main())
