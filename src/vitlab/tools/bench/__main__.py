from vitlab.tools.bench.cli import main

main()
