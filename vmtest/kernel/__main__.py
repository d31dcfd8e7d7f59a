import sys

from vmtest.kernel import main

sys.exit(main(sys.argv[1:]))
