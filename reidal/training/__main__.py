import sys

from reidal.training.launch import main

sys.exit(main())
