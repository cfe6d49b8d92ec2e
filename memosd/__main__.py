from memosd.daemon import main

raise SystemExit(main())
