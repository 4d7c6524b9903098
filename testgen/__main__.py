from ctlesion_testgen.cli import main

raise SystemExit(main())
