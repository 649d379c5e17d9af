from xdlm_vision.cli import main

raise SystemExit(main())
