from soak.runner import main

raise SystemExit(main())
