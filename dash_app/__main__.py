from dash_app import main

raise SystemExit(main())
