"""`python -m node.master` runs `cpnode-master`."""

from node.master.cli import main

main()
