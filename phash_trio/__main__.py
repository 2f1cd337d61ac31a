from phash_trio.cli import main

raise SystemExit(main())
