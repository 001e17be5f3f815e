from kdeval.cli import main

main()
