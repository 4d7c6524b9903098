from ctlesion_phantoms.cli import main

raise SystemExit(main())
